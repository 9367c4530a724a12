/*
 * A minimal edgepipe subscriber in C, against the system's libzmq: it connects to a daemon's
 * zmq_pub sink, subscribes to "detections/" and prints each detection message's JSON on its own
 * line (the same bare JSON that `edgepipe subscribe` prints, so it pipes into jq).
 *
 * Every message is two frames: the topic ("detections/<source>") and the JSON document described
 * by `edgepipe schema detections`. Parsing the JSON is left to the reader's favourite library.
 *
 * Build:  cc subscriber.c -lzmq        (Debian: apt install gcc libzmq3-dev)
 * Run:    ./a.out [ENDPOINT [COUNT [TIMEOUT_S]]]
 *         ENDPOINT   default tcp://127.0.0.1:5556
 *         COUNT      stop after this many messages (0, the default: run until killed)
 *         TIMEOUT_S  give up, exit 1, when no message came for this many seconds (0: wait forever)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <zmq.h>

#define TOPIC "detections/"
#define MAX_MESSAGE_BYTES (1 << 20) /* what edgepipe's own clients accept per message */

/* Receive one frame into msg; -1 on a timeout or an error. */
static int receive(void *socket, zmq_msg_t *msg)
{
    zmq_msg_init(msg);
    if (zmq_msg_recv(msg, socket, 0) < 0) {
        zmq_msg_close(msg);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *endpoint = argc > 1 ? argv[1] : "tcp://127.0.0.1:5556";
    long count = argc > 2 ? strtol(argv[2], NULL, 10) : 0;
    int timeout_ms = argc > 3 ? (int)(strtod(argv[3], NULL) * 1000) : -1;
    int64_t max_size = MAX_MESSAGE_BYTES;
    int code = 0;

    void *context = zmq_ctx_new();
    void *socket = zmq_socket(context, ZMQ_SUB);
    /* A peer sending more than this is disconnected instead of filling our memory. */
    zmq_setsockopt(socket, ZMQ_MAXMSGSIZE, &max_size, sizeof max_size);
    if (timeout_ms > 0)
        zmq_setsockopt(socket, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    zmq_setsockopt(socket, ZMQ_SUBSCRIBE, TOPIC, sizeof TOPIC - 1);
    if (zmq_connect(socket, endpoint) != 0) {
        fprintf(stderr, "subscriber: cannot connect to %s: %s\n", endpoint, zmq_strerror(zmq_errno()));
        code = 1;
    }

    for (long received = 0; code == 0 && (count == 0 || received < count);) {
        zmq_msg_t topic, body;
        if (receive(socket, &topic) != 0) {
            if (zmq_errno() == EAGAIN)
                fprintf(stderr, "subscriber: no message on %s for %s s\n", endpoint, argv[3]);
            else
                fprintf(stderr, "subscriber: %s\n", zmq_strerror(zmq_errno()));
            code = 1;
            break;
        }
        int more = zmq_msg_more(&topic);
        zmq_msg_close(&topic);
        if (!more)
            continue; /* not a [topic, json] message */
        if (receive(socket, &body) != 0) {
            fprintf(stderr, "subscriber: %s\n", zmq_strerror(zmq_errno()));
            code = 1;
            break;
        }
        fwrite(zmq_msg_data(&body), 1, zmq_msg_size(&body), stdout);
        putchar('\n');
        fflush(stdout);
        more = zmq_msg_more(&body);
        zmq_msg_close(&body);
        while (more) { /* frames beyond the two we know: skip them */
            zmq_msg_t extra;
            if (receive(socket, &extra) != 0)
                break;
            more = zmq_msg_more(&extra);
            zmq_msg_close(&extra);
        }
        received++;
    }

    zmq_close(socket);
    zmq_ctx_term(context);
    return code;
}
