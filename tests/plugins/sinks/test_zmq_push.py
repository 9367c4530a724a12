"""The ``zmq_push`` sink driven directly (start/process/flush/stop) against a real ZeroMQ PULL
socket on ipc://: frames in the wire format arrive whole, followed by the end marker of their
source, also at a receiver that is behind when the stream ends (the sink stays connected until
it disconnects, at most ``end_wait``), and without a receiver frames beyond the high-water mark
are dropped after the send timeout and counted."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from edgepipe_plugins.sinks.zmq_push import ZmqPushConfig, ZmqPushSink

from edgepipe.messages import EndMarker, Frame, decode
from edgepipe.stage import StageContext


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
        pull.close(linger=0)  # the receiver is done: stop() need not wait for it
        sink.stop()
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
    assert time.monotonic() - t0 < 10  # two 0.2 s timeouts, not a wait for a receiver


def _slow_reader(pull: zmq.Socket, close_on_end: bool) -> list:
    """Read one message every 10 ms until the end marker (then close, as a zmq source with
    stop_on_eos does, if asked) or until nothing comes for 10 s."""
    got: list = []
    while pull.poll(10000):
        item = decode(pull.recv_multipart(copy=False))
        got.append(item)
        time.sleep(0.01)
        if isinstance(item, EndMarker):
            break
    if close_on_end:
        pull.close(linger=0)
    return got


def test_a_receiver_that_is_behind_still_gets_the_last_frames_and_the_end_marker(tmp_path: Path):
    # Small frames and a high-water mark of 1: when the sink ends, most of the stream is still in
    # the kernel's socket buffer on the receiving side. ZeroMQ drops that once the sending side
    # closes the connection (without the wait, 3 to 6 of these 61 messages arrived), so the sink
    # stays connected until the receiver has read the marker and disconnected.
    address = f"ipc://{tmp_path}/slow.sock"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1)
    pull.bind(address)
    sink = ZmqPushSink(ZmqPushConfig(inputs=["prep"], connect=address, hwm=1, end_wait=60), StageContext("forward"))
    sink.start()

    def send() -> None:
        sink.process([Frame("cam", k, 1.0 + k, image=np.full((8, 8), k, np.uint8)) for k in range(60)])
        sink.flush()
        sink.stop()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        got = _slow_reader(pull, close_on_end=True)
        sender.join(60)  # a bound for a hang: stop() returns once the receiver has gone
        assert not sender.is_alive(), "stop() kept waiting after the receiver disconnected"
    finally:
        pull.close(linger=0)
        ctx.term()
    assert [f.frame_id for f in got[:-1]] == list(range(60)), [getattr(f, "frame_id", f) for f in got]
    assert isinstance(got[-1], EndMarker) and got[-1].source == "cam"
    np.testing.assert_array_equal(got[59].image, np.full((8, 8), 59, np.uint8))


def test_stop_waits_at_most_end_wait_for_a_receiver_that_stays(tmp_path: Path, caplog):
    address = f"ipc://{tmp_path}/stays.sock"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(address)
    sink = ZmqPushSink(ZmqPushConfig(inputs=["prep"], connect=address, end_wait=0.5), StageContext("forward"))
    sink.start()
    try:
        sink.process([Frame("cam", 0, 1.0, image=np.zeros((8, 8), np.uint8))])
        sink.flush()
        got = _slow_reader(pull, close_on_end=False)  # reads everything, then stays connected
        with caplog.at_level(logging.INFO):
            t0 = time.monotonic()
            sink.stop()
            waited = time.monotonic() - t0
    finally:
        pull.close(linger=0)
        ctx.term()
    assert len(got) == 2 and isinstance(got[1], EndMarker)
    assert 0.4 < waited < 30, waited  # the wait ran its course (the upper bound catches a hang)
    assert any("1 receiver(s) still connected after 0.5 s (end_wait)" in r.getMessage() for r in caplog.records), caplog.text
