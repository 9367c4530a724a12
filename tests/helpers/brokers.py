"""Real message brokers for tests: Debian's Mosquitto and nats-server (with JetStream), each a
subprocess on a free loopback port with its files in a test directory, plus clients that read
what the broker sinks published. A missing broker binary is a failure (make deps installs it).

Typical use (module-scoped, one broker per module)::

    @pytest.fixture(scope="module")
    def mosquitto(tmp_path_factory):
        with Mosquitto(tmp_path_factory.mktemp("mqtt")) as broker:
            yield broker

    with MqttReader(mosquitto.port, "edgepipe/#") as reader:
        ...
        reader.wait_for(lambda msgs: len(msgs) >= 10)

:meth:`Mosquitto.kill` / :meth:`NatsServer.kill` end the server at once (SIGKILL by default) and
:meth:`start` brings it back on the same port with the same files (Mosquitto's persistence,
JetStream's store), for outage tests. :func:`tls_files` makes a CA, a server certificate for
127.0.0.1 and a client certificate with openssl.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from .net import free_port

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"
NATS_SERVER = "/usr/sbin/nats-server"


def _binary(path: str, package: str) -> str:
    found = shutil.which(Path(path).name) or (path if Path(path).exists() else None)
    if found is None:
        pytest.fail(f"{Path(path).name} not found: install the Debian package {package!r} (make deps)")
    return found


def wait_port(port: int, timeout: float = 20.0, proc: Optional[subprocess.Popen] = None, log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s:\n{log.read_text() if log else ''}")


class _Server:
    """A broker subprocess: start, kill, stop, restart on the same port and files."""

    name = "server"

    def __init__(self, workdir: Path, port: Optional[int] = None, env: Optional[Dict[str, str]] = None) -> None:
        self.env = None if env is None else dict(os.environ, **env)
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.dir / f"{self.name}.log"

    def command(self) -> List[str]:
        raise NotImplementedError

    def start(self) -> _Server:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=self.env,
            )
        wait_port(self.port, proc=self.proc, log=self.log)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Mosquitto(_Server):
    """Mosquitto on 127.0.0.1:port. ``users`` (name -> password) turns anonymous access off;
    ``tls`` (from :func:`tls_files`) makes the listener TLS-only, requiring a client certificate
    when ``require_certificate``. ``persistence`` keeps sessions and queued messages on disk,
    saved every second, so a persistent subscriber survives a kill."""

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        port: Optional[int] = None,
        users: Optional[Dict[str, str]] = None,
        tls: Optional[Dict[str, Path]] = None,
        require_certificate: bool = False,
        persistence: bool = False,
    ) -> None:
        super().__init__(workdir, port)
        _binary(MOSQUITTO, "mosquitto")
        # Run as whoever runs the tests: Mosquitto started as root otherwise drops to its own user,
        # which cannot read the test's files.
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", f"allow_anonymous {'false' if users else 'true'}",
                 "max_queued_messages 0", "max_inflight_messages 0", "log_dest stdout",
                 "log_type error", "log_type warning", "log_type notice", "log_type information"]
        if users:
            pw = self.dir / "passwords"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run([_binary(MOSQUITTO_PASSWD, "mosquitto"), "-b", str(pw), user, password], check=True)
            pw.chmod(0o600)
            lines.append(f"password_file {pw}")
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['server_cert']}", f"keyfile {tls['server_key']}"]
            if require_certificate:
                lines.append("require_certificate true")
        if persistence:
            (self.dir / "db").mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.dir / 'db'}/", "autosave_interval 1"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def command(self) -> List[str]:
        return [MOSQUITTO, "-c", str(self.conf)]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class NatsServer(_Server):
    """nats-server on 127.0.0.1:port with JetStream (file store in the work directory).
    ``users`` (name -> password) requires authentication; ``extra`` is appended to the config."""

    name = "nats-server"

    def __init__(
        self, workdir: Path, port: Optional[int] = None, jetstream: bool = True,
        users: Optional[Dict[str, str]] = None, extra: str = "", env: Optional[Dict[str, str]] = None,
        conf: Optional[Path] = None,
    ) -> None:
        super().__init__(workdir, port, env)
        _binary(NATS_SERVER, "nats-server")
        lines = [f"listen: 127.0.0.1:{self.port}", f'server_name: "test-{self.port}"']
        if jetstream:
            lines.append(f'jetstream {{ store_dir: "{self.dir / "js"}", max_file_store: 100G, max_memory_store: 64M }}')
        if users:
            entries = ", ".join(f'{{user: "{u}", password: "{p}"}}' for u, p in users.items())
            lines.append(f"authorization {{ users: [{entries}] }}")
        self.conf = self.dir / "nats.conf"
        if conf is not None:
            self.conf = conf  # a config of its own (the deploy/ examples)
        else:
            self.conf.write_text("\n".join(lines) + "\n" + extra)

    def command(self) -> List[str]:
        return [NATS_SERVER, "-c", str(self.conf)]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


# -- readers -------------------------------------------------------------------------------------


class MqttReader:
    """A paho subscriber collecting ``(topic, payload bytes, retain)``; QoS 1 subscriptions.
    With ``client_id`` it keeps a persistent session (clean_session false), so a broker with
    persistence queues messages for it while it is away and it resubscribes on reconnecting."""

    def __init__(self, port: int, topic: str = "#", client_id: Optional[str] = None, **connect: Any) -> None:
        import paho.mqtt.client as mqtt

        self.topic = topic
        self.messages: List[Tuple[str, bytes, bool]] = []
        self.qos: Dict[str, int] = {}  # topic -> QoS of the last message received on it
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=client_id is None
        )
        self.client.reconnect_delay_set(0.1, 0.5)
        if connect.get("username"):
            self.client.username_pw_set(connect["username"], connect.get("password"))
        if connect.get("tls"):
            self.client.tls_set_context(connect["tls"])
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.port = port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.qos[msg.topic] = msg.qos

    def __enter__(self) -> MqttReader:
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(20), "the test subscriber could not subscribe"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def snapshot(self) -> List[Tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def json(self, suffix: str = "") -> List[Tuple[str, Any]]:
        """(topic, parsed JSON) of the non-retained messages whose topic ends with ``suffix``."""
        return [(t, json.loads(p)) for t, p, r in self.snapshot() if t.endswith(suffix) and p and not r]

    def wait_for(self, cond: Callable[[List[Tuple[str, bytes, bool]]], Any], timeout: float = 60.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = cond(self.snapshot())
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what or 'messages'}; got {len(self.snapshot())}")
            time.sleep(0.05)


def retained(port: int, topic: str, settle: float = 1.0, **connect: Any) -> Dict[str, bytes]:
    """Topic -> payload of the retained messages under ``topic`` as a new subscriber sees them
    (empty payloads are deletions and do not show)."""
    reader = MqttReader(port, topic, **connect)
    with reader:
        time.sleep(settle)  # retained messages arrive right after the subscription
        return {t: p for t, p, r in reader.snapshot() if r}


def stream_messages(url: str, stream: str, timeout: float = 30.0) -> List[Dict[str, Any]]:
    """Every message stored in a JetStream stream, in stream order: ``{"seq", "subject",
    "id" (Nats-Msg-Id), "data" (parsed JSON)}``."""

    async def main() -> List[Dict[str, Any]]:
        import nats

        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=10)
            info = await js.stream_info(stream)
            out: List[Dict[str, Any]] = []
            if info.state.messages == 0:
                return out
            sub = await js.pull_subscribe(">", stream=stream)
            while len(out) < info.state.messages:
                for m in await sub.fetch(1000, timeout=timeout):
                    out.append({"seq": m.metadata.sequence.stream, "subject": m.subject,
                                "id": (m.headers or {}).get("Nats-Msg-Id"), "data": json.loads(m.data)})
                    await m.ack()
            await sub.unsubscribe()
            return sorted(out, key=lambda m: m["seq"])
        finally:
            await nc.close()

    return asyncio.run(main())


def tls_files(directory: Path) -> Dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (PEM), made with
    openssl: keys ``ca``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``, and
    ``other_ca`` (a CA that signed nothing here, for refusals)."""
    openssl = shutil.which("openssl") or pytest.fail("openssl not found")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    for ca in ("ca", "other_ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
            "-days", "2", "-subj", f"/CN=edgepipe test {ca}")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
            "-subj", f"/CN=edgepipe test {who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{who}.pem", "-days", "2", *ext)
    return {"ca": d / "ca.pem", "other_ca": d / "other_ca.pem", "server_cert": d / "server.pem",
            "server_key": d / "server.key", "client_cert": d / "client.pem", "client_key": d / "client.key"}


# -- feeding a daemon ------------------------------------------------------------------------------


def event(source: str, event_id: str, track_id: int, kind: str = "update", zones: Optional[List[str]] = None) -> Dict[str, Any]:
    """An event message as the tracking stages raise them (schema tag, source, unique event_id)."""
    return {"schema": "edgepipe.events/v1", "source": source, "event_id": event_id, "type": kind,
            "track_id": track_id, "label": "person", "zones": list(zones or []), "timestamp": time.time()}


class Feeder:
    """A PUSH socket feeding frames in edgepipe's wire format to a daemon's ``zmq`` source
    (``bind`` on ``endpoint``, ``keep_source: true`` keeps these sources and frame ids). Keep it
    open until the daemon has what it needs: ZeroMQ drops unsent messages on disconnect."""

    NAMES = ["person", "car"]

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100000)
        self.sock.connect(endpoint)

    def send(self, source: str, frame_id: int, labels: Tuple[int, ...] = (0, 1), events: Optional[List[Dict[str, Any]]] = None,
             timestamp: Optional[float] = None) -> None:
        import numpy as np

        from edgepipe.messages import Frame, encode

        dets = np.array([[10 + i, 20, 30 + i, 40, 0.9, c] for i, c in enumerate(labels)], np.float32).reshape(-1, 6)
        frame = Frame(source=source, frame_id=frame_id, timestamp=time.time() if timestamp is None else timestamp,
                      width=160, height=120, detections=dets, names=list(self.NAMES), events=list(events or []))
        self.sock.send_multipart(encode(frame), copy=False)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> Feeder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TcpProxy:
    """A TCP forwarder on a free loopback port in front of a server, for faults a server cannot
    make by itself: :meth:`hold_replies` stops passing what the server sends back (a link that
    loses acknowledgements while requests still arrive), :meth:`release` passes it again (what
    was held is discarded, as a lost link would), :meth:`cut` closes every connection. Made with
    ``accepting=False`` it closes every connection at once until :meth:`accept` (a server that
    must not be reached before the test is ready for it)."""

    def __init__(self, target_port: int, accepting: bool = True) -> None:
        self.target = target_port
        self.port = free_port()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._holding = threading.Event()
        self._accepting = threading.Event()
        if accepting:
            self._accepting.set()
        self._stop = threading.Event()
        self._conns: List[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._accepting.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if reply and self._holding.is_set():
                    continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def accept(self) -> None:
        self._accepting.set()

    def hold_replies(self) -> None:
        self._holding.set()

    def release(self) -> None:
        self._holding.clear()

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def feed_config(name: str, feed_port: int, sinks: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """A pipeline of a ``zmq`` source named ``feed`` (frames from a :class:`Feeder`, sources and
    frame ids kept, lossless 'block' links) into the given sinks (name -> settings)."""
    import tempfile

    stages: Dict[str, Any] = {
        "feed": {"type": "zmq", "bind": f"tcp://127.0.0.1:{feed_port}", "carries": "detections",
                 "live": False, "keep_source": True},
    }
    for sink, settings in sinks.items():
        stages[sink] = {"inputs": ["feed"], **settings}
    # Short ipc paths: a pytest tmp dir can be too deep for sun_path.
    return {"name": name, "stages": stages, "runtime": {"dir": tempfile.mkdtemp(prefix="ep-", dir="/tmp")}}


def warm_up(feeder: Feeder, subscriber: Any, timeout: float = 30.0) -> int:
    """Send frames of a source named ``warm`` until a ZeroMQ :class:`helpers.daemon.Subscriber`
    sees one (a SUB socket that connected before the daemon bound its PUB misses the first
    messages); how many were sent. Every sink of the pipeline gets them too."""
    deadline = time.monotonic() + timeout
    sent = 0
    while not any(t == "detections/warm" for t, _ in subscriber.snapshot()):
        if time.monotonic() > deadline:
            raise AssertionError("the ZeroMQ subscriber never received the warm-up frames")
        feeder.send("warm", sent, labels=())
        sent += 1
        time.sleep(0.1)
    return sent
