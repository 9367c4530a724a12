"""The ``zmq_push`` sink driven directly (start/process/flush/stop) against a real ZeroMQ PULL
socket on ipc://: frames in the wire format arrive whole, followed by the end marker of their
source, and without a receiver frames beyond the high-water mark are dropped after the send
timeout and counted."""

from __future__ import annotations

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
    assert time.monotonic() - t0 < 10  # two 0.2 s timeouts, not a wait for a receiver
