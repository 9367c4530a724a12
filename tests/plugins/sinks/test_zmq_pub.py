"""The ``zmq_pub`` sink driven directly (start/process/stop) and read by a real ZeroMQ SUB socket
over tcp on 127.0.0.1: detection messages in the published schema on ``detections/<source>``,
its last messages delivered when it stops, annotated JPEGs on ``frames/<source>`` at a capped
rate with the boxes drawn in their class colours, a public bind without keys refused, and a
port in use named in one error."""

from __future__ import annotations

import json
import threading
import time
from typing import List, Tuple

import cv2
import numpy as np
import pytest
import zmq
from edgepipe_plugins.sinks.zmq_pub import ZmqPubConfig, ZmqPubSink
from helpers.frames import det_frame
from pydantic import ValidationError

from edgepipe.messages import DETECTIONS_SCHEMA
from edgepipe.stage import StageContext, StageError


def receive(sub: zmq.Socket, timeout: float = 5.0) -> Tuple[bytes, bytes]:
    assert sub.poll(int(timeout * 1000)), "nothing received"
    topic, body = sub.recv_multipart()
    return topic, body


@pytest.fixture
def sub_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def subscribed(sink: ZmqPubSink, ctx: zmq.Context, rcvhwm: int = 1000) -> zmq.Socket:
    """A SUB socket on the sink's address whose subscription has reached the publisher: PUB
    drops until then (slow joiner), so publish until one arrives, then drain."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, rcvhwm)
    sub.setsockopt(zmq.SUBSCRIBE, b"detections/")
    sub.connect(sink._endpoint.address)
    frame_id = 0
    while not sub.poll(50):
        sink.process([det_frame("warmup", frame_id)])
        frame_id += 1
        assert frame_id < 200, "subscriber never received anything"
    while sub.poll(50):
        sub.recv_multipart()
    return sub


def test_zmq_pub_detection_messages_reach_a_subscriber(sub_ctx: zmq.Context):
    sink = ZmqPubSink(ZmqPubConfig(inputs=["post"], bind="tcp://127.0.0.1:*"), StageContext("publish"))
    assert not sink.needs_original
    sink.start()
    try:
        sub = subscribed(sink, sub_ctx)
        published_before = sink.published.value

        sink.process([det_frame("cam1", 0), det_frame("cam2", 0, n=0), det_frame("cam1", 1, n=3)])
        got: List[Tuple[bytes, dict]] = []
        for _ in range(3):
            topic, body = receive(sub)
            got.append((topic, json.loads(body)))
    finally:
        sink.stop()
    assert [t for t, _ in got] == [b"detections/cam1", b"detections/cam2", b"detections/cam1"]
    first = got[0][1]
    assert first["schema"] == DETECTIONS_SCHEMA and first["source"] == "cam1" and first["frame_id"] == 0
    assert (first["width"], first["height"]) == (160, 120)
    assert first["detections"][1] == {"bbox": [55.0, 30.0, 85.0, 70.0], "confidence": 0.8, "class_id": 1, "label": "square", "track_id": None}
    assert got[1][1]["detections"] == [] and len(got[2][1]["detections"]) == 3
    assert 0.04 < first["timing"]["latency"] < 5
    assert sink.published.value - published_before == 3
    assert sink.frame_age.count >= 3 and sink.frame_age.sum > 0
    assert sink.detections.value >= 5


def test_zmq_pub_delivers_its_last_messages_when_it_stops(sub_ctx: zmq.Context):
    """Messages still queued when the sink stops (a drained pipeline's last ones) reach a
    connected subscriber: the socket lingers up to ``linger`` (1 s) instead of dropping them.
    The subscriber holds off reading until the stop, so the queue is surely not empty: 40
    messages of about 300 kB fill the kernel's buffers (up to 4 MB here) and the rest waits in
    the socket (without linger the subscriber got about 11 of them)."""
    sink = ZmqPubSink(ZmqPubConfig(inputs=["post"], bind="tcp://127.0.0.1:*"), StageContext("publish"))
    sink.start()
    stopping = threading.Event()
    got: List[bytes] = []

    def read() -> None:
        stopping.wait()
        while sub.poll(2000):
            got.append(sub.recv_multipart()[1])

    reader = threading.Thread(target=read)
    try:
        sub = subscribed(sink, sub_ctx, rcvhwm=1)  # what it does not read stays with the sender
        reader.start()
        sink.process([det_frame("cam", k, n=3000) for k in range(40)])
    finally:
        stopping.set()
        t0 = time.monotonic()
        sink.stop()
        took = time.monotonic() - t0
    reader.join()
    assert [json.loads(body)["frame_id"] for body in got] == list(range(40))
    assert took < 10  # bounded by the linger (1 s), not by the subscriber that stopped reading


def test_zmq_pub_annotated_frames_at_a_capped_rate(sub_ctx: zmq.Context):
    sink = ZmqPubSink(ZmqPubConfig(inputs=["post"], bind="tcp://127.0.0.1:*", frames_fps=2), StageContext("publish"))
    assert sink.needs_original
    sink.start()
    try:
        sub = sub_ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"frames/")
        sub.connect(sink._endpoint.address)
        time.sleep(0.3)  # let the subscription reach the publisher
        t0 = time.monotonic()
        for k in range(10):  # 10 frames in a burst: at 2 fps the first gets a picture
            sink.process([det_frame("cam1", k, with_picture=True)])
        took = time.monotonic() - t0  # on a busy machine the burst may span several 0.5 s periods
        topic, jpeg = receive(sub)
        more = 0
        while sub.poll(200):
            sub.recv_multipart()
            more += 1
        assert more <= int(took / 0.5), f"{1 + more} pictures for a burst of {took:.2f} s at 2 fps"
        time.sleep(0.5)
        sink.process([det_frame("cam1", 10, with_picture=True)])
        receive(sub)
    finally:
        sink.stop()
    assert topic == b"frames/cam1"
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (120, 160, 3)
    # Both boxes are drawn on the gray picture in their class colours: class 0 red, class 1
    # green (tolerant thresholds: JPEG subsamples colour).
    b, g, r = (image[:, :, i].astype(int) for i in range(3))
    red = (r - g > 60) & (r - b > 60)
    green = (g - r > 60) & (g - b > 60)
    assert red.sum() > 30 and green.sum() > 30
    assert np.median(np.nonzero(red)[1]) < 45 < np.median(np.nonzero(green)[1])  # left box red, right green
    assert not red[90:].any() and not green[90:].any()  # nothing below the boxes


def test_zmq_pub_refuses_a_public_bind_without_keys():
    with pytest.raises(ValidationError, match="refusing to bind 'tcp://0.0.0.0:5556'"):
        ZmqPubConfig(bind="tcp://0.0.0.0:5556")
    assert ZmqPubConfig().bind == "tcp://127.0.0.1:5556"


def test_zmq_pub_port_in_use_is_one_line_error():
    ctx = zmq.Context()
    taken = ctx.socket(zmq.PUB)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        sink = ZmqPubSink(ZmqPubConfig(bind=f"tcp://127.0.0.1:{port}"), StageContext("p"))
        with pytest.raises(StageError, match=f"cannot bind 'tcp://127.0.0.1:{port}'"):
            sink.start()
    finally:
        taken.close(linger=0)
        ctx.term()
