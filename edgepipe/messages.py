"""Messages: the in-process :class:`Frame`, its ZeroMQ wire format, and the detection message.

A frame crosses a process boundary as one ZeroMQ multipart message::

    [header, payload_0, payload_1, ...]

``header`` is msgpack: ``{"v": 1, "source", "frame_id", "timestamp", "width", "height", "ratio",
"pad", "names", "timing", "meta", "events", "arrays": [[field, dtype, shape], ...]}``; each payload is the
raw C-contiguous bytes of one ndarray, sent without copying and received as a read-only view of
the ZeroMQ buffer (no copy either). An end-of-stream marker is a single part header
``{"v": 1, "eos": true, "source": ...}``.

:func:`decode` trusts nothing: any malformed input raises :class:`MessageError` (one line), which
the worker counts and drops. Arrays decoded from the wire are read-only: a stage that wants to
change an image assigns a new array.

The detection message is what subscribers read (``detections/<source>`` topics): see
:func:`detection_message` and ``edgepipe schema detections``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import msgpack
import numpy as np

__all__ = [
    "ARRAY_FIELDS",
    "DETECTIONS_SCHEMA",
    "PICTURE_FIELDS",
    "EndMarker",
    "Frame",
    "MessageError",
    "decode",
    "detection_message",
    "encode",
    "encode_eos",
    "frame_problem",
    "picture_problem",
]

WIRE_VERSION = 1
DETECTIONS_SCHEMA = "edgepipe.detections/v1"

# The ndarray fields of a Frame, and the dtypes the wire accepts for them.
ARRAY_FIELDS = ("image", "original", "candidates", "detections")
# The fields holding pictures: 8-bit gray (H, W) or (H, W, C) with 1, 3 or 4 channels, nothing else
# (a float or 16-bit picture would go through the detector as plausible nonsense).
PICTURE_FIELDS = ("image", "original")
_DTYPES = {"uint8", "uint16", "float16", "float32", "float64", "int32", "int64"}
_MIN_NDIM = 2  # every array field is at least (rows, columns): images (H, W[, C]), boxes (n, k)
_MAX_NDIM = 4


class MessageError(ValueError):
    """A message that cannot be decoded; the text says what is wrong with it."""


@dataclass
class Frame:
    """One frame moving through the pipeline, with everything stages add to it."""

    source: str  # name of the source stage that produced it
    frame_id: int  # per source, 0, 1, 2, ... in capture order
    timestamp: float  # capture time, unix seconds
    image: Optional[np.ndarray] = None  # uint8 (H, W) gray or (H, W, 3) BGR; letterboxed after letterbox
    width: int = 0  # original frame width in pixels
    height: int = 0  # original frame height in pixels
    ratio: Optional[Tuple[float, float]] = None  # letterbox scale (rw, rh)
    pad: Optional[Tuple[float, float]] = None  # letterbox padding (dw, dh), left/top halves
    original: Optional[np.ndarray] = None  # the source image, kept when a sink draws on it
    candidates: Optional[np.ndarray] = None  # (k, 5+nc) float32 detector rows above conf_thres
    detections: Optional[np.ndarray] = None  # (n, 6) float32 x1 y1 x2 y2 conf cls, original pixels
    names: Optional[List[str]] = None  # class names of the model that produced candidates
    timing: Dict[str, float] = field(default_factory=dict)  # stage name -> seconds spent on it
    meta: Dict[str, Any] = field(default_factory=dict)  # json-able extras: file, truth, ...
    # Event messages raised while this frame passed (json-able maps, each a whole message for the
    # ``events/<source>`` topic); sinks that publish events send them, others ignore them.
    events: List[Dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.image is not None and not self.width:
            self.height, self.width = int(self.image.shape[0]), int(self.image.shape[1])


@dataclass
class EndMarker:
    """End of stream from one upstream source/stage: no more frames will follow on this link."""

    source: str


def encode(frame: Frame) -> List[Any]:
    """Frame -> multipart parts; payloads are memoryviews of the arrays (zero copy)."""
    arrays = []
    parts: List[Any] = [b""]
    for name in ARRAY_FIELDS:
        arr = getattr(frame, name)
        if arr is None:
            continue
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        arrays.append([name, arr.dtype.name, list(arr.shape)])
        parts.append(memoryview(arr).cast("B") if arr.size else b"")
    header: Dict[str, Any] = {
        "v": WIRE_VERSION,
        "source": frame.source,
        "frame_id": int(frame.frame_id),
        "timestamp": float(frame.timestamp),
        "width": int(frame.width),
        "height": int(frame.height),
        "ratio": list(frame.ratio) if frame.ratio is not None else None,
        "pad": list(frame.pad) if frame.pad is not None else None,
        "names": frame.names,
        "timing": frame.timing,
        "meta": frame.meta,
        "arrays": arrays,
    }
    if frame.events:
        header["events"] = frame.events
    parts[0] = msgpack.packb(header, use_bin_type=True)
    return parts


def encode_eos(source: str) -> List[bytes]:
    return [msgpack.packb({"v": WIRE_VERSION, "eos": True, "source": source}, use_bin_type=True)]


def _buffer(part: Any) -> memoryview:
    if isinstance(part, (bytes, bytearray, memoryview)):
        return memoryview(part)
    buf = getattr(part, "buffer", None)  # zmq.Frame
    if buf is None:
        raise MessageError(f"payload part of type {type(part).__name__!r} is not a buffer")
    return memoryview(buf)


def _pair(value: Any, what: str) -> Optional[Tuple[float, float]]:
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
    ):
        raise MessageError(f"header {what!r} must be two finite numbers, got {value!r:.60}")
    return (float(value[0]), float(value[1]))


def decode(parts: Sequence[Any]) -> Union[Frame, EndMarker]:
    """Multipart parts (bytes or zmq.Frame) -> Frame or EndMarker; MessageError if malformed."""
    if not parts:
        raise MessageError("empty message")
    try:
        header = msgpack.unpackb(_buffer(parts[0]), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise MessageError(f"header is not msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise MessageError(f"header is a {type(header).__name__}, not a map")
    if header.get("v") != WIRE_VERSION:
        raise MessageError(f"wire version {header.get('v')!r:.20}, expected {WIRE_VERSION}")
    source = header.get("source")
    if not isinstance(source, str) or not source:
        raise MessageError("header has no 'source' string")
    if header.get("eos") is True:
        if len(parts) != 1:
            raise MessageError("end marker with payload parts")
        return EndMarker(source)

    def num(key: str, kind: Union[type, Tuple[type, ...]], what: str) -> Any:
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MessageError(f"header {key!r} must be {what}, got {value!r:.40}")
        return value

    frame_id = num("frame_id", int, "an integer")
    timestamp = float(num("timestamp", (int, float), "a number"))
    width, height = num("width", int, "an integer"), num("height", int, "an integer")
    if frame_id < 0 or width < 0 or height < 0 or not math.isfinite(timestamp):
        raise MessageError("header frame_id/width/height/timestamp out of range")
    names = header.get("names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        raise MessageError("header 'names' must be a list of strings")
    timing = header.get("timing") or {}
    meta = header.get("meta") or {}
    if not isinstance(timing, dict) or not isinstance(meta, dict):
        raise MessageError("header 'timing' and 'meta' must be maps")
    events = header.get("events") or []
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise MessageError("header 'events' must be a list of maps")
    specs = header.get("arrays")
    if not isinstance(specs, list):
        raise MessageError("header 'arrays' must be a list")
    if len(specs) != len(parts) - 1:
        raise MessageError(f"header lists {len(specs)} arrays but {len(parts) - 1} payloads came")

    arrays: Dict[str, np.ndarray] = {}
    for spec, part in zip(specs, parts[1:]):
        if not (isinstance(spec, list) and len(spec) == 3):
            raise MessageError(f"array spec {spec!r:.60} is not [field, dtype, shape]")
        name, dtype, shape = spec
        if name not in ARRAY_FIELDS or name in arrays:
            raise MessageError(f"array field {name!r:.40} unknown or repeated")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise MessageError(f"array {name!r} has dtype {dtype!r:.20}; accepted: {sorted(_DTYPES)}")
        if (
            not isinstance(shape, list)
            or not _MIN_NDIM <= len(shape) <= _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
        ):
            raise MessageError(f"array {name!r} has a bad shape {shape!r:.60}")
        problem = picture_problem(name, dtype, shape)
        if problem:
            raise MessageError(problem)
        buf = _buffer(part)
        expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
        if buf.nbytes != expected:
            raise MessageError(
                f"array {name!r} {dtype}{tuple(shape)} needs {expected} bytes, got {buf.nbytes}"
            )
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        arr.flags.writeable = False  # a view of the message buffer: stages assign new arrays
        arrays[name] = arr

    return Frame(
        source=source,
        frame_id=frame_id,
        timestamp=timestamp,
        width=width,
        height=height,
        ratio=_pair(header.get("ratio"), "ratio"),
        pad=_pair(header.get("pad"), "pad"),
        names=names,
        timing={str(k): float(v) for k, v in timing.items() if isinstance(v, (int, float))},
        meta=meta,
        events=events,
        **arrays,
    )


def picture_problem(field: str, dtype: str, shape: Sequence[int]) -> Optional[str]:
    """Why an array cannot be the picture ``field`` of a frame (one line), or None: pictures are
    uint8, (H, W) or (H, W, C) with C in 1, 3, 4. Other fields are not pictures: None."""
    if field not in PICTURE_FIELDS:
        return None
    if dtype != "uint8":
        return (
            f"{field} is {dtype}; pictures are 8-bit (uint8): convert 16-bit or float images "
            "before sending them (16-bit thermal input is not supported yet)"
        )
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4))):
        return f"{field} has shape {tuple(shape)}; a picture is (H, W) or (H, W, C) with 1, 3 or 4 channels"
    return None


def frame_problem(frame: Frame) -> Optional[str]:
    """:func:`picture_problem` for a frame's pictures (a source's output is checked with it)."""
    for name in PICTURE_FIELDS:
        arr = getattr(frame, name)
        if arr is not None:
            if not isinstance(arr, np.ndarray):
                return f"{name} is a {type(arr).__name__}, not a numpy array"
            problem = picture_problem(name, arr.dtype.name, arr.shape)
            if problem:
                return f"frame {frame.source}/{frame.frame_id}: {problem}"
    return None


def detection_message(frame: Frame, published_at: Optional[float] = None) -> Dict[str, Any]:
    """The JSON document published on ``detections/<source>`` (see the shipped JSON Schema)."""
    published_at = time.time() if published_at is None else published_at
    dets = []
    names = frame.names or []
    if frame.detections is not None:
        for x1, y1, x2, y2, conf, cls in frame.detections.tolist():
            c = int(cls)
            dets.append(
                {
                    "bbox": [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)],
                    "confidence": round(conf, 5),
                    "class_id": c,
                    "label": names[c] if 0 <= c < len(names) else str(c),
                }
            )
    msg: Dict[str, Any] = {
        "schema": DETECTIONS_SCHEMA,
        "source": frame.source,
        "frame_id": frame.frame_id,
        "timestamp": frame.timestamp,
        "width": frame.width,
        "height": frame.height,
        "detections": dets,
        "timing": {
            "stages": {k: round(v, 6) for k, v in frame.timing.items()},
            "latency": round(published_at - frame.timestamp, 6),
        },
    }
    if "file" in frame.meta:
        msg["file"] = frame.meta["file"]
    return msg


def dumps(msg: Dict[str, Any]) -> bytes:
    """Compact JSON bytes for the wire."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()


def replace(frame: Frame, **changes: Any) -> Frame:
    return dataclasses.replace(frame, **changes)
