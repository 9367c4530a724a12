"""The ``zmq`` source driven directly (start/read/stop) against a real ZeroMQ PUSH producer on
ipc:// sockets, binding or connecting: frames in the wire format are renumbered under the stage's
name (or keep their source), malformed messages are counted and dropped, an end marker ends the
stream, and the bind rules of its config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zmq
from edgepipe_plugins.sources.zmq import ZmqConfig, ZmqSource
from helpers.sources import read_all
from pydantic import ValidationError

from edgepipe.messages import Frame, encode, encode_eos
from edgepipe.stage import StageContext


def test_zmq_source_receives_renumbers_and_counts_malformed(tmp_path: Path):
    address = f"ipc://{tmp_path}/frames.sock"
    src = ZmqSource(ZmqConfig(bind=address, stop_on_eos=True), StageContext("remote"))
    src.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    try:
        image = np.arange(64 * 32, dtype=np.uint8).reshape(32, 64)
        for k in (5, 6):
            push.send_multipart(
                encode(Frame("cam7", k, 1000.0 + k, image=image, width=128, height=64, ratio=(0.5, 0.5), pad=(0.0, 0.0)))
            )
        push.send_multipart([b"\x93garbage"])
        push.send_multipart(encode_eos("cam7"))
        frames = read_all(src, timeout=10)
    finally:
        push.close(linger=0)
        ctx.term()
        src.stop()
    assert [(f.source, f.frame_id) for f in frames] == [("remote", 0), ("remote", 1)]
    assert [f.meta["upstream"] for f in frames] == [{"source": "cam7", "frame_id": 5}, {"source": "cam7", "frame_id": 6}]
    assert frames[1].timestamp == 1006.0 and frames[1].ratio == (0.5, 0.5)
    assert (frames[0].width, frames[0].height) == (128, 64)
    np.testing.assert_array_equal(frames[0].image, image)
    assert src.metrics.errors.labels("decode").value == 1


def test_zmq_source_keeps_source_and_connects(tmp_path: Path):
    address = f"ipc://{tmp_path}/producer.sock"
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(address)
    src = ZmqSource(ZmqConfig(connect=address, keep_source=True, live=False), StageContext("relay"))
    assert not src.live
    src.start()
    try:
        for source, k in (("a", 3), ("b", 9)):
            push.send_multipart(encode(Frame(source, k, 1.0, image=np.zeros((4, 4), np.uint8))))
        frames = read_all(src, limit=2, timeout=10)
    finally:
        push.close(linger=0)
        ctx.term()
        src.stop()
    assert [(f.source, f.frame_id) for f in frames] == [("a", 3), ("b", 9)]


def test_zmq_source_config_rules():
    with pytest.raises(ValidationError, match="exactly one of 'bind' and 'connect'"):
        ZmqConfig()
    with pytest.raises(ValidationError, match="refusing to bind 'tcp://0.0.0.0:5560'"):
        ZmqConfig(bind="tcp://0.0.0.0:5560")
    assert ZmqConfig(bind="tcp://0.0.0.0:5560", insecure=True).insecure
    assert ZmqConfig(connect="tcp://10.0.0.5:5560").connect == "tcp://10.0.0.5:5560"
    assert ZmqSource(ZmqConfig(bind="ipc:///x", carries="letterboxed"), StageContext("z")).output_kind() == "letterboxed"
