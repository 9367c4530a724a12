"""The frame decoder fuzzed: whatever arrives on a stage's input socket, ``decode`` returns a usable
Frame or EndMarker, or raises MessageError (which the worker counts and drops). Any other
exception would kill a 'latest' receiver thread or crash the worker, so it is a bug here.

Four generators, thousands of examples in all: random byte parts; valid messages mutated (bytes
flipped, truncated, parts dropped, repeated or swapped); headers built field by field from
arbitrary msgpack values (wrong types, wrong dtypes, shapes that overflow, sizes that lie); and
valid frames, which must round-trip exactly.
"""

from __future__ import annotations

from typing import Any, List

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepipe.messages import (
    ARRAY_FIELDS,
    PICTURE_FIELDS,
    EndMarker,
    Frame,
    MessageError,
    decode,
    encode,
    encode_eos,
)

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = ["uint8", "uint16", "float16", "float32", "float64", "int32", "int64"]


def check(parts: List[Any]) -> Any:
    """decode() under the contract: MessageError or a well-formed result, nothing else."""
    try:
        out = decode(parts)
    except MessageError as exc:
        text = str(exc)
        assert text and "\n" not in text
        return None
    assert isinstance(out, (Frame, EndMarker))
    assert isinstance(out.source, str) and out.source
    if isinstance(out, Frame):
        assert out.frame_id >= 0 and out.width >= 0 and out.height >= 0
        for name in ARRAY_FIELDS:
            arr = getattr(out, name)
            if arr is not None:
                assert isinstance(arr, np.ndarray) and not arr.flags.writeable
                assert arr.ndim >= 2  # every array field is at least (rows, columns)
    return out


# -- 1. random bytes ------------------------------------------------------------------------------

@settings(FUZZ, max_examples=2000)
@given(st.lists(st.binary(max_size=256), min_size=0, max_size=6))
def test_random_byte_parts(parts: List[bytes]):
    check(parts)


# -- 2. valid messages, mutated -------------------------------------------------------------------

@st.composite
def frames(draw: Any) -> Frame:
    arrays = {}
    for name in draw(st.sets(st.sampled_from(ARRAY_FIELDS), max_size=4)):
        if name in PICTURE_FIELDS:  # pictures: 8-bit, (H, W) or (H, W, C) with C in 1, 3, 4
            dtype = "uint8"
            shape = draw(st.lists(st.integers(0, 6), min_size=2, max_size=2))
            shape += draw(st.sampled_from([[], [1], [3], [4]]))
        else:
            dtype = draw(st.sampled_from(DTYPES))
            shape = draw(st.lists(st.integers(0, 6), min_size=2, max_size=4))
        arrays[name] = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    return Frame(
        source=draw(st.text(min_size=1, max_size=8)),
        frame_id=draw(st.integers(0, 2**40)),
        timestamp=draw(st.floats(0, 2e9, allow_nan=False)),
        width=draw(st.integers(0, 4096)),
        height=draw(st.integers(0, 4096)),
        ratio=draw(st.none() | st.tuples(st.floats(0.01, 10), st.floats(0.01, 10))),
        pad=draw(st.none() | st.tuples(st.floats(0, 100), st.floats(0, 100))),
        names=draw(st.none() | st.lists(st.text(max_size=5), max_size=3)),
        timing=draw(st.dictionaries(st.text(max_size=5), st.floats(0, 1), max_size=3)),
        meta=draw(st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5), max_size=3)),
        **arrays,
    )


def as_bytes(parts: List[Any]) -> List[bytes]:
    return [bytes(p) for p in parts]


MUTATIONS = ("flip", "truncate", "extend", "drop", "repeat", "swap", "header_only", "splice")


@FUZZ
@given(frames(), st.sampled_from(MUTATIONS), st.data())
def test_mutated_valid_messages(frame: Frame, mutation: str, data: Any):
    parts = as_bytes(encode(frame))
    i = data.draw(st.integers(0, len(parts) - 1))
    part = parts[i]
    if mutation == "flip" and part:
        j = data.draw(st.integers(0, len(part) - 1))
        parts[i] = part[:j] + bytes([part[j] ^ data.draw(st.integers(1, 255))]) + part[j + 1 :]
    elif mutation == "truncate":
        parts[i] = part[: data.draw(st.integers(0, max(0, len(part) - 1)))]
    elif mutation == "extend":
        parts[i] = part + data.draw(st.binary(min_size=1, max_size=64))
    elif mutation == "drop":
        del parts[i]
    elif mutation == "repeat":
        parts.insert(i, part)
    elif mutation == "swap" and len(parts) > 1:
        j = data.draw(st.integers(0, len(parts) - 1))
        parts[i], parts[j] = parts[j], parts[i]
    elif mutation == "header_only":
        parts = parts[:1]
    elif mutation == "splice":
        parts[i] = data.draw(st.binary(max_size=64))
    check(parts)


# -- 3. headers built from arbitrary values -----------------------------------------------------

ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=6,
)
DIM = st.integers(0, 2**31) | st.sampled_from([2**16, 2**21, 2**31 - 1, -1]) | ANY
SPEC = st.tuples(
    st.sampled_from(ARRAY_FIELDS + ("bogus",)) | ANY,
    st.sampled_from(DTYPES + ["object", "complex128", "bool", "<U4"]) | ANY,
    st.lists(DIM, max_size=5) | ANY,
).map(list) | ANY


@st.composite
def headers(draw: Any) -> List[Any]:
    header = {
        "v": draw(st.just(1) | ANY),
        "source": draw(st.text(min_size=1, max_size=6) | ANY),
        "frame_id": draw(st.integers(0, 2**40) | ANY),
        "timestamp": draw(st.floats(0, 2e9) | ANY),
        "width": draw(st.integers(0, 100) | ANY),
        "height": draw(st.integers(0, 100) | ANY),
        "ratio": draw(st.none() | st.lists(st.floats(), max_size=3) | ANY),
        "pad": draw(st.none() | st.lists(st.floats(), max_size=3) | ANY),
        "names": draw(st.none() | st.lists(st.text(max_size=3), max_size=3) | ANY),
        "timing": draw(st.dictionaries(st.text(max_size=3), st.floats() | ANY, max_size=3) | ANY),
        "meta": draw(st.dictionaries(st.text(max_size=3), ANY, max_size=3) | ANY),
        "eos": draw(st.none() | st.booleans() | ANY),
        "arrays": draw(st.lists(SPEC, max_size=4) | ANY),
    }
    for key in draw(st.sets(st.sampled_from(sorted(header)), max_size=3)):
        del header[key]
    parts: List[Any] = [msgpack.packb(header, use_bin_type=True)]
    specs = header.get("arrays") if isinstance(header.get("arrays"), list) else []
    for spec in specs:
        size = 0
        try:
            _, dtype, shape = spec
            size = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        except Exception:
            pass
        if draw(st.booleans()) and 0 <= size <= 4096:
            parts.append(bytes(size))  # the size the spec claims
        else:
            parts.append(draw(st.binary(max_size=64)))
    if draw(st.booleans()):
        parts.append(draw(st.binary(max_size=16)))  # one part too many
    return parts


@FUZZ
@given(headers())
def test_headers_built_from_arbitrary_values(parts: List[Any]):
    check(parts)


def test_known_hostile_headers():
    """Cases found by the generators above, kept as plain examples."""

    def msg(arrays: Any, *payloads: bytes) -> List[bytes]:
        header = {"v": 1, "source": "s", "frame_id": 0, "timestamp": 1.0, "width": 0, "height": 0, "arrays": arrays}
        return [msgpack.packb(header), *payloads]

    hostile = {
        "dtype that is a list (unhashable)": msg([["image", [1], [1]]], b"x"),
        "dtype that is a map": msg([["image", {"a": 1}, [1, 1]]], b"x"),
        "shape whose product overflows int64 to 0": msg([["image", "uint8", [2**16] * 4]], b""),
        "0-d image": msg([["image", "uint8", []]], b"x"),
        "1-d image": msg([["image", "uint8", [3]]], b"xyz"),
        "1-d detections": msg([["detections", "float32", [6]]], bytes(24)),
        "negative dimension": msg([["image", "uint8", [-1, 2]]], b""),
        "payload longer than the shape": msg([["image", "uint8", [2, 2]]], bytes(5)),
        "wrong dtype for the payload": msg([["image", "object", [1, 1]]], bytes(8)),
    }
    for what, parts in hostile.items():
        try:
            decode(parts)
        except MessageError:
            continue
        raise AssertionError(f"{what}: decoded without MessageError")


# -- 4. valid frames round-trip -------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(frames())
def test_valid_frames_round_trip(frame: Frame):
    out = check(as_bytes(encode(frame)))
    assert isinstance(out, Frame)
    assert (out.source, out.frame_id, out.timestamp) == (frame.source, frame.frame_id, frame.timestamp)
    assert (out.width, out.height, out.ratio, out.pad) == (frame.width, frame.height, frame.ratio, frame.pad)
    assert (out.names, out.timing, out.meta) == (frame.names, frame.timing, frame.meta)
    for name in ARRAY_FIELDS:
        a, b = getattr(frame, name), getattr(out, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    eos = check(encode_eos(frame.source))
    assert isinstance(eos, EndMarker) and eos.source == frame.source
