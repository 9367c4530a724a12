"""First-party sinks with real sockets and files: zmq_pub read by a real SUB socket (detections
and annotated JPEGs), jsonl rotation and its pre-flight, zmq_push read by a real PULL socket."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np
import pytest
import zmq
from edgepipe_plugins.sinks.jsonl import JsonlConfig, JsonlSink
from edgepipe_plugins.sinks.zmq_pub import ZmqPubConfig, ZmqPubSink
from edgepipe_plugins.sinks.zmq_push import ZmqPushConfig, ZmqPushSink
from pydantic import ValidationError

from edgepipe.messages import DETECTIONS_SCHEMA, EndMarker, Frame, decode
from edgepipe.stage import StageContext, StageError

NAMES = ["circle", "square", "triangle", "cross"]


def det_frame(source: str, frame_id: int, n: int = 2, with_picture: bool = False) -> Frame:
    boxes = [[10 + 45 * i, 20 + 10 * i, 40 + 45 * i, 60 + 10 * i, 0.9 - 0.1 * i, i % 4] for i in range(n)]
    dets = np.array(boxes, np.float32).reshape(-1, 6)
    frame = Frame(source, frame_id, time.time() - 0.05, width=160, height=120, detections=dets, names=NAMES)
    if with_picture:
        frame.original = np.full((120, 160), 90, np.uint8)
    return frame


def receive(sub: zmq.Socket, timeout: float = 5.0) -> Tuple[bytes, bytes]:
    assert sub.poll(int(timeout * 1000)), "nothing received"
    topic, body = sub.recv_multipart()
    return topic, body


# ------------------------------------------------------------------------------------ zmq_pub


@pytest.fixture
def sub_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_zmq_pub_detection_messages_reach_a_subscriber(sub_ctx: zmq.Context):
    sink = ZmqPubSink(ZmqPubConfig(inputs=["post"], bind="tcp://127.0.0.1:*"), StageContext("publish"))
    assert not sink.needs_original
    sink.start()
    try:
        sub = sub_ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"detections/")
        sub.connect(sink._endpoint.address)
        # PUB drops until the subscription has propagated (slow joiner): publish until one arrives.
        frame_id = 0
        while not sub.poll(50):
            sink.process([det_frame("warmup", frame_id)])
            frame_id += 1
            assert frame_id < 200, "subscriber never received anything"
        while sub.poll(50):
            sub.recv_multipart()
        published_before = sink.metrics.published.value

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
    assert first["detections"][1] == {"bbox": [55.0, 30.0, 85.0, 70.0], "confidence": 0.8, "class_id": 1, "label": "square"}
    assert got[1][1]["detections"] == [] and len(got[2][1]["detections"]) == 3
    assert 0.04 < first["timing"]["latency"] < 5
    assert sink.metrics.published.value - published_before == 3
    assert sink.metrics.frame_age.count >= 3 and sink.metrics.frame_age.sum > 0
    assert sink.metrics.detections.value >= 5


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
        for k in range(10):  # 10 frames within ~0.1 s: at 2 fps only the first gets a picture
            sink.process([det_frame("cam1", k, with_picture=True)])
        assert time.monotonic() - t0 < 0.45
        topic, jpeg = receive(sub)
        assert not sub.poll(200), "more than one picture within the 0.5 s cap"
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


# ------------------------------------------------------------------------------------ jsonl


def test_jsonl_lines_and_rotation(tmp_path: Path):
    path = tmp_path / "detections.jsonl"
    sink = JsonlSink(JsonlConfig(inputs=["post"], path=str(path), max_bytes=2000, backups=2), StageContext("log"))
    sink.check()
    sink.start()
    try:
        for k in range(40):
            sink.process([det_frame("cam", k)])
    finally:
        sink.stop()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["detections.jsonl", "detections.jsonl.1", "detections.jsonl.2"]
    ids: List[int] = []
    for name in ("detections.jsonl.2", "detections.jsonl.1", "detections.jsonl"):
        text = (tmp_path / name).read_text()
        assert len(text.encode()) <= 2000 and text.endswith("\n")
        lines = [json.loads(line) for line in text.splitlines()]
        assert all(m["schema"] == DETECTIONS_SCHEMA and len(m["detections"]) == 2 for m in lines)
        ids += [m["frame_id"] for m in lines]
    # The newest messages survive, in order, none twice; the oldest went with the dropped backup.
    assert ids == list(range(40 - len(ids), 40)) and len(ids) < 40
    assert sink.metrics.published.value == 40 and sink.metrics.detections.value == 80


def test_jsonl_appends_and_truncates_without_backups(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"old": 1}\n')
    sink = JsonlSink(JsonlConfig(path=str(path), max_bytes=600, backups=0), StageContext("log"))
    sink.start()
    sink.process([det_frame("cam", 0, n=0)])
    assert path.read_text().splitlines()[0] == '{"old": 1}'
    for k in range(1, 10):
        sink.process([det_frame("cam", k, n=0)])
    sink.stop()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines and "old" not in lines[0] and lines[-1]["frame_id"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_jsonl_check_refuses_unwritable_paths(tmp_path: Path):
    cases = {
        str(tmp_path / "missing" / "d.jsonl"): "does not exist",
        str(tmp_path): "is a directory",
        "/sys/edgepipe-test.jsonl": "is not writable",  # sysfs refuses new files, even to root
    }
    for path, message in cases.items():
        with pytest.raises(StageError, match=message):
            JsonlSink(JsonlConfig(path=path), StageContext("log")).check()
    assert not list(tmp_path.iterdir()), "check() must not create anything"


# ------------------------------------------------------------------------------------ zmq_push


def test_zmq_push_forwards_frames_and_end_markers(tmp_path: Path):
    address = f"ipc://{tmp_path}/chain.sock"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(address)
    sink = ZmqPushSink(ZmqPushConfig(inputs=["prep"], connect=address), StageContext("forward"))
    sink.start()
    try:
        image = np.arange(32 * 64, dtype=np.uint8).reshape(32, 64)
        sent = [Frame("cam", k, 100.0 + k, image=image, width=128, height=64, ratio=(0.5, 0.5), pad=(0.0, 0.0)) for k in range(3)]
        sink.process(sent)
        assert sink.flush() == []
        got = []
        for _ in range(4):
            assert pull.poll(5000), f"only {len(got)} messages arrived"
            got.append(decode(pull.recv_multipart(copy=False)))
    finally:
        sink.stop()
        pull.close(linger=0)
        ctx.term()
    frames, eos = got[:3], got[3]
    assert [f.frame_id for f in frames] == [0, 1, 2] and isinstance(eos, EndMarker) and eos.source == "cam"
    np.testing.assert_array_equal(frames[2].image, image)
    assert frames[0].ratio == (0.5, 0.5) and (frames[0].width, frames[0].height) == (128, 64)
    assert sink.metrics.published.value == 3


def test_zmq_push_drops_after_send_timeout_without_a_receiver(tmp_path: Path):
    cfg = ZmqPushConfig(connect=f"ipc://{tmp_path}/nobody.sock", send_timeout=0.2, hwm=1)
    sink = ZmqPushSink(cfg, StageContext("forward"))
    sink.start()
    t0 = time.monotonic()
    try:
        sink.process([Frame("cam", k, 1.0, image=np.zeros((8, 8), np.uint8)) for k in range(3)])
    finally:
        sink.stop()
    # hwm 1: the first frame waits in the socket's queue; the other two time out and are dropped.
    assert sink.metrics.dropped.labels("queue_full").value == 2
    assert sink.metrics.published.value == 1
    assert time.monotonic() - t0 < 3


def test_jsonl_full_disk_drops_and_counts_without_failing(caplog: pytest.LogCaptureFixture):
    # /dev/full accepts the open and fails every write with ENOSPC, like a full disk.
    sink = JsonlSink(JsonlConfig(path="/dev/full"), StageContext("log"))
    sink.check()
    sink.start()
    try:
        for k in range(5):
            sink.process([det_frame("cam", k)])
    finally:
        sink.stop()
    assert sink.metrics.errors.labels("process").value == 5
    assert sink.metrics.published.value == 0
    outage = [r.getMessage() for r in caplog.records if "Cannot write" in r.getMessage()]
    assert len(outage) == 1 and "No space left on device" in outage[0]
