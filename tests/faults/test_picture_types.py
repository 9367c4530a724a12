"""Frames that are not 8-bit pictures, sent to a `zmq` source by an outside producer: a float64
and a uint16 image (well-formed messages in every other way) must not come out as detection
messages with empty detections. They are refused where they enter (counted as decode errors,
one log line per cause however many arrive), while the uint8 frames sent around them go through.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import zmq
from helpers.daemon import Daemon, Subscriber
from helpers.net import free_port

from edgepipe.messages import Frame, encode, encode_eos


def frame(i: int, image: np.ndarray) -> List[Any]:
    return encode(Frame(source="producer", frame_id=i, timestamp=time.time(), image=image))


def test_float_and_16_bit_pictures_are_refused_where_they_enter(tmp_path: Path):
    port, pub = free_port(), free_port()
    config: Dict[str, Any] = {
        "name": "pictures",
        "stages": {
            "remote": {"type": "zmq", "bind": f"tcp://127.0.0.1:{port}", "live": False, "stop_on_eos": True},
            "prep": {"type": "letterbox", "inputs": ["remote"], "imgsz": 64},
            "det": {"type": "yolov5", "inputs": ["prep"], "cfg": "yolov5n", "imgsz": 64, "device": "cpu",
                    "threads": 1, "conf_thres": 0.01},
            "post": {"type": "nms", "inputs": ["det"], "conf_thres": 0.01},
            "pub": {"type": "zmq_pub", "inputs": ["post"], "bind": f"tcp://127.0.0.1:{pub}"},
        },
    }
    # Sent in this order (remote numbers frames itself): good, float64 x5, good, uint16 x5, good,
    # then a 4-D "picture" and a 5-channel one; only the three good ones may be published.
    gray = np.full((48, 64), 90, np.uint8)
    sequence = [frame(0, gray)]
    sequence += [frame(1 + i, np.full((48, 64), 0.5, np.float64)) for i in range(5)]
    sequence += [frame(6, gray)]
    sequence += [frame(7 + i, np.full((48, 64), 40000, np.uint16)) for i in range(5)]
    sequence += [frame(12, gray), frame(13, np.zeros((2, 4, 4, 3), np.uint8)), frame(14, np.zeros((8, 8, 5), np.uint8))]
    with Daemon(config, tmp_path) as d, Subscriber(f"tcp://127.0.0.1:{pub}", "detections/") as sub:
        d.wait_ready(180)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            for parts in sequence:
                sock.send_multipart(parts)
            # Stay connected until the daemon has taken everything (ZeroMQ drops what a receiver
            # has not read when the sender disconnects): all 12 refusals counted...
            d.wait_until(lambda: d.sample("edgepipe_stage_errors_total", stage="remote", type="decode") == 12,
                         60, "12 refused frames counted as decode errors")
            # ... and the three good frames through the detector (a refused frame would have been
            # published before the last good one: the link keeps the order).
            d.wait_until(lambda: len(sub.snapshot()) >= 3, 60, "the three 8-bit frames published")
            sock.send_multipart(encode_eos("producer"))
            assert d.wait(120) == 0
        finally:
            sock.close(linger=0)
            ctx.term()
    published = [m for _, m in sub.snapshot()]
    assert [m["frame_id"] for m in published] == [0, 1, 2], published  # only the three 8-bit frames
    assert all(m["width"] == 64 and m["height"] == 48 for m in published)
    lines = d.log.splitlines()
    float_lines = [x for x in lines if "image is float64; pictures are 8-bit (uint8)" in x]
    uint16_lines = [x for x in lines if "image is uint16; pictures are 8-bit (uint8)" in x]
    assert len(float_lines) == 1 and len(uint16_lines) == 1, d.log  # one line per cause, not per frame
    assert any("(H, W) or (H, W, C) with 1, 3 or 4 channels" in x for x in lines), d.log
    assert "RuntimeWarning" not in d.log and "Traceback" not in d.log


def test_a_source_emitting_float_pictures_is_refused_at_the_source(tmp_path: Path):
    """A (third-party) source whose read() returns float images: every frame is refused as it
    leaves the source (a source error, one log line), nothing reaches the sink."""
    from helpers.daemon import install_test_plugins, read_jsonl

    install_test_plugins()
    config = {
        "name": "floatsrc",
        "stages": {
            "count": {"type": "counter", "count": 20, "dtype": "float64"},
            "rec": {"type": "record", "inputs": ["count"], "path": str(tmp_path / "rec.jsonl")},
        },
    }
    with Daemon(config, tmp_path) as d:
        d.wait_ready()
        d.wait_until(lambda: d.sample("edgepipe_stage_errors_total", stage="count", type="source") == 20, 60,
                     "20 source errors")
        assert d.wait(60) == 0
    assert read_jsonl(tmp_path / "rec.jsonl") == []
    lines = [x for x in d.log.splitlines() if "image is float64; pictures are 8-bit (uint8)" in x]
    assert len(lines) == 1, d.log
    assert "Stage 'count' source error: frame count/0: image is float64" in lines[0]
