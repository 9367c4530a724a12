"""First-party sinks with real sockets and files: zmq_pub read by a real SUB socket (detections
and annotated JPEGs), jsonl rotation and its pre-flight, zmq_push read by a real PULL socket."""

from __future__ import annotations

import json
import os
import threading
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
    assert took < 1.5  # bounded by the linger


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
    assert sink.published.value == 40 and sink.detections.value == 80


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


def test_jsonl_cuts_a_partial_last_line_at_start_and_syncs_to_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """A worker killed in the middle of a write leaves half a line: the next start cuts it, so
    every line parses. Data is fsync-ed before a rotation and when the sink stops."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"frame_id": 0}\n{"frame_id": 1}\n{"frame_id": 2, "detec')
    synced: List[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the real call, recorded
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    sink = JsonlSink(JsonlConfig(path=str(path), max_bytes=1500, backups=1), StageContext("log"))
    sink.start()
    assert "Removed a partial last line (22 bytes)" in caplog.text
    sink.process([det_frame("cam", 3)])
    assert [json.loads(x)["frame_id"] for x in path.read_text().splitlines()] == [0, 1, 3]
    assert synced == []
    for k in range(4, 10):
        sink.process([det_frame("cam", k)])  # 333 bytes each: rotates once, before frame 7
    assert (tmp_path / "d.jsonl.1").exists()
    assert synced[:2] == [str(path), str(tmp_path)]  # the file, then the renames in its directory
    sink.stop()
    assert synced[-1] == str(path)
    ids = [json.loads(x)["frame_id"] for name in ("d.jsonl.1", "d.jsonl") for x in (tmp_path / name).read_text().splitlines()]
    assert ids == [0, 1] + list(range(3, 10))


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
    assert sink.published.value == 3


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
    assert sink.published.value == 1
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
    assert sink.published.value == 0
    outage = [r.getMessage() for r in caplog.records if "Cannot write" in r.getMessage()]
    assert len(outage) == 1 and "No space left on device" in outage[0]
