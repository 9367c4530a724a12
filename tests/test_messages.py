"""The frame wire format and the detection message: round trips, and garbage that never crashes."""

from __future__ import annotations

import json
import re
import time

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgepipe.client import (
    DetectionMessage,
    build_detections_schema,
    detections_schema,
    detections_schema_text,
)
from edgepipe.messages import (
    DETECTIONS_SCHEMA,
    EndMarker,
    Frame,
    MessageError,
    decode,
    detection_message,
    dumps,
    encode,
    encode_eos,
    frame_problem,
)

DTYPES = ["uint8", "uint16", "float16", "float32", "float64", "int32", "int64"]


def roundtrip(frame: Frame) -> Frame:
    # bytes() of every part: what crosses a socket.
    out = decode([bytes(p) for p in encode(frame)])
    assert isinstance(out, Frame)
    return out


def test_full_frame_roundtrip():
    image = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64)
    f = Frame(
        source="cam",
        frame_id=41,
        timestamp=1700000000.25,
        image=image,
        width=640,
        height=480,
        ratio=(0.1, 0.1),
        pad=(0.0, 8.0),
        original=np.zeros((480, 640, 3), np.uint8),
        candidates=np.random.default_rng(0).random((7, 85), dtype=np.float32),
        detections=np.array([[1, 2, 3, 4, 0.9, 0]], np.float32),
        names=["person"],
        timing={"lb": 0.001},
        meta={"file": "a.png", "truth": [[1, 2, 3, 4]]},
    )
    g = roundtrip(f)
    for name in ("image", "original", "candidates", "detections"):
        np.testing.assert_array_equal(getattr(g, name), getattr(f, name))
        assert getattr(g, name).dtype == getattr(f, name).dtype
        assert not getattr(g, name).flags.writeable
    assert (g.source, g.frame_id, g.timestamp, g.width, g.height) == ("cam", 41, 1700000000.25, 640, 480)
    assert g.ratio == (0.1, 0.1) and g.pad == (0.0, 8.0)
    assert g.names == ["person"] and g.timing == {"lb": 0.001} and g.meta == f.meta


def test_non_contiguous_and_empty_arrays():
    base = np.arange(100, dtype=np.uint8).reshape(10, 10)
    f = Frame(source="s", frame_id=0, timestamp=1.0, image=base[:, ::2], candidates=np.zeros((0, 6), np.float32))
    g = roundtrip(f)
    np.testing.assert_array_equal(g.image, base[:, ::2])
    assert g.candidates.shape == (0, 6)


def test_end_marker():
    assert decode(encode_eos("lb")) == EndMarker("lb")
    with pytest.raises(MessageError, match="end marker with payload parts"):
        decode(encode_eos("lb") + [b"x"])


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from(DTYPES),
        shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=0, max_side=6),
    ),
    frame_id=st.integers(0, 2**40),
    ts=st.floats(0, 2e9, allow_nan=False),
    source=st.text(min_size=1, max_size=20),
)
def test_any_array_roundtrips(arr, frame_id, ts, source):
    g = roundtrip(Frame(source=source, frame_id=frame_id, timestamp=ts, candidates=arr))
    np.testing.assert_array_equal(g.candidates, arr)
    assert g.candidates.dtype == arr.dtype and g.frame_id == frame_id and g.source == source


@pytest.mark.parametrize(
    "field, array, message",
    [
        ("image", np.zeros((4, 4), np.float64), "image is float64; pictures are 8-bit (uint8)"),
        ("image", np.zeros((4, 4), np.uint16), "image is uint16; pictures are 8-bit (uint8)"),
        ("original", np.zeros((4, 4, 3), np.float32), "original is float32; pictures are 8-bit (uint8)"),
        ("image", np.zeros((2, 4, 4, 3), np.uint8), "image has shape (2, 4, 4, 3); a picture is (H, W) or (H, W, C)"),
        ("image", np.zeros((4, 4, 2), np.uint8), "image has shape (4, 4, 2)"),
    ],
)
def test_pictures_are_8_bit_gray_or_color(field, array, message):
    """A float or 16-bit picture would pass through the detector as plausible nonsense (empty
    detections): the wire refuses it, naming what it is."""
    with pytest.raises(MessageError, match=re.escape(message)):
        decode(encode(Frame(source="cam", frame_id=1, timestamp=2.0, **{field: array})))
    problem = frame_problem(Frame(source="cam", frame_id=1, timestamp=2.0, **{field: array}))
    assert problem is not None and problem.startswith("frame cam/1: ") and message in problem
    for ok in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 1), np.uint8), np.zeros((4, 4, 4), np.uint8)):
        assert frame_problem(Frame(source="cam", frame_id=1, timestamp=2.0, **{field: ok})) is None


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_random_bytes_raise_message_error_only(parts):
    try:
        decode(parts)
    except MessageError:
        pass


header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**33) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    changes=st.dictionaries(
        st.sampled_from(["v", "source", "frame_id", "timestamp", "width", "height", "ratio", "pad",
                         "names", "timing", "meta", "arrays", "eos"]),
        header_values,
        min_size=1,
        max_size=3,
    ),
    extra_parts=st.integers(0, 2),
)
def test_corrupted_headers_raise_message_error_only(changes, extra_parts):
    parts = encode(Frame(source="cam", frame_id=1, timestamp=2.0, image=np.zeros((2, 3), np.uint8)))
    header = msgpack.unpackb(parts[0])
    header.update(changes)
    mutated = [msgpack.packb(header)] + [bytes(p) for p in parts[1:]] + [b"\0" * 6] * extra_parts
    try:
        decode(mutated)
    except MessageError:
        pass


@pytest.mark.parametrize(
    "change, message",
    [
        ({"v": 2}, "wire version 2, expected 1"),
        ({"source": ""}, "header has no 'source' string"),
        ({"frame_id": -1}, "header frame_id/width/height/timestamp out of range"),
        ({"frame_id": True}, "header 'frame_id' must be an integer, got True"),
        ({"arrays": [["image", "uint8", [2, 4]]]}, "array 'image' uint8(2, 4) needs 8 bytes, got 6"),
        ({"arrays": [["image", "object", [2, 3]]]}, "array 'image' has dtype 'object'"),
        ({"arrays": [["pixels", "uint8", [2, 3]]]}, "array field 'pixels' unknown or repeated"),
        ({"arrays": []}, "header lists 0 arrays but 1 payloads came"),
        ({"ratio": [1, float("nan")]}, "header 'ratio' must be two finite numbers"),
    ],
)
def test_malformed_header_messages_name_the_problem(change, message):
    parts = encode(Frame(source="cam", frame_id=1, timestamp=2.0, image=np.zeros((2, 3), np.uint8)))
    header = msgpack.unpackb(parts[0])
    header.update(change)
    with pytest.raises(MessageError) as info:
        decode([msgpack.packb(header), bytes(parts[1])])
    assert str(info.value).startswith(message)


def test_detection_message_matches_model_and_shipped_schema():
    f = Frame(
        source="cam",
        frame_id=3,
        timestamp=time.time() - 0.05,
        width=640,
        height=480,
        detections=np.array([[10, 20, 110.555, 220, 0.87654321, 0], [1, 2, 3, 4, 0.5, 7]], np.float32),
        names=["person", "bicycle"],
        timing={"detector": 0.02},
        meta={"file": "x.png"},
    )
    msg = detection_message(f)
    assert msg["schema"] == DETECTIONS_SCHEMA
    assert msg["detections"][0] == {"bbox": [10.0, 20.0, 110.56, 220.0], "confidence": 0.87654, "class_id": 0, "label": "person", "track_id": None}
    assert msg["detections"][1]["label"] == "7"  # no name for class 7: its number
    assert 0.04 < msg["timing"]["latency"] < 5
    parsed = DetectionMessage.model_validate_json(dumps(msg))
    assert parsed.frame_id == 3 and parsed.detections[0].bbox[2] == 110.56 and parsed.file == "x.png"
    # The shipped file is the model's schema, and it describes what we send.
    assert detections_schema() == build_detections_schema()
    assert detections_schema_text() == json.dumps(build_detections_schema(), indent=2) + "\n"
    schema = detections_schema()
    assert set(schema["required"]) <= set(msg)
    assert schema["properties"]["schema"]["const"] == DETECTIONS_SCHEMA


def test_schema_command_prints_the_shipped_file():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edgepipe", "schema", "detections"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout) == detections_schema()
    r = subprocess.run([sys.executable, "-m", "edgepipe", "schema", "nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "edgepipe: error: schema 'nope': expected 'config', 'detections' or 'events'"


def test_subscribe_prints_bare_json_and_times_out(tmp_path):
    """`edgepipe subscribe` against a real PUB socket: bare JSON lines, --count, --timeout."""
    import subprocess
    import sys
    import threading

    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    stop = threading.Event()
    frame = Frame(source="cam", frame_id=0, timestamp=time.time(), width=4, height=3)

    def publish():
        i = 0
        while not stop.is_set():
            frame.frame_id = i
            pub.send_multipart([b"detections/cam", dumps(detection_message(frame))])
            pub.send_multipart([b"frames/cam", b"\xff\xd8 not json"])
            i += 1
            time.sleep(0.02)

    t = threading.Thread(target=publish)
    t.start()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "edgepipe", "subscribe", endpoint, "--count", "3", "--timeout", "30"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        stop.set()
        t.join()
        pub.close(0)
        ctx.term()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    ids = [json.loads(x)["frame_id"] for x in lines]
    assert ids == sorted(ids) and all(DetectionMessage.model_validate_json(x) for x in lines)
    # Nothing published there any more: --timeout exits non-zero with one line.
    r = subprocess.run(
        [sys.executable, "-m", "edgepipe", "subscribe", endpoint, "--timeout", "0.5"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == f"edgepipe: error: no message on {endpoint} (topic 'detections/') within 0.5 s"
