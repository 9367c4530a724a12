"""Messages: the in-process :class:`Frame`, its ZeroMQ wire format, and the detection message.

A frame crosses a process boundary as one ZeroMQ multipart message::

    [header, payload_0, payload_1, ...]

``header`` is msgpack: ``{"v": 1, "source", "frame_id", "timestamp", "width", "height", "ratio",
"pad", "names", "timing", "meta", "events", "track_ids", "arrays": [[field, dtype, shape], ...]}``
(``events`` and ``track_ids`` only when set); each payload is the
raw C-contiguous bytes of one ndarray, sent without copying and received as a read-only view of
the ZeroMQ buffer (no copy either). An end-of-stream marker is a single part header
``{"v": 1, "eos": true, "source": ...}``.

:func:`decode` trusts nothing: any malformed input raises :class:`MessageError` (one line), which
the worker counts and drops. Arrays decoded from the wire are read-only: a stage that wants to
change an image assigns a new array.

The detection message is what subscribers read (``detections/<source>`` topics): see
:func:`detection_message` and ``edgepipe schema detections``. The event message (``events/<source>``
topics, :func:`event_message`, ``edgepipe schema events``) tells what happened to a tracked
object: it appears, changes, enters or leaves a zone, crosses a line, loiters, ends.

Track ids travel in the header as a list beside the detections (``track_ids[i]`` is the id of
detection row ``i``, None while that detection belongs to no confirmed track), not as a seventh
float column: ids must stay exact integers for the daemon's whole life (a float32 column is
exact only up to 2**24), and a short msgpack list costs less than an extra payload part.
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
    "EVENTS_SCHEMA",
    "EVENT_TYPES",
    "MAX_TRACK_ID",
    "TRACK_FIELDS",
    "decode",
    "detection_message",
    "event_message",
    "encode",
    "encode_eos",
    "frame_problem",
    "picture_problem",
]

WIRE_VERSION = 1
# v2: every detection gains ``track_id`` (an integer, or null while not tracked); the fields of
# v1 keep their meaning.
DETECTIONS_SCHEMA = "edgepipe.detections/v2"
EVENTS_SCHEMA = "edgepipe.events/v1"
# Lifecycle of a track (from the ``tracker`` stage), then what the ``zones`` stage reports.
EVENT_TYPES = ("new", "update", "end", "enter", "leave", "cross", "loiter")
MAX_TRACK_ID = 2**53 - 1  # the largest integer every JSON reader (JavaScript too) keeps exact

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
    # Track id per detection row (None: not part of a confirmed track); set by a tracker. A stage
    # that drops or reorders detection rows after the tracker must do the same here.
    track_ids: Optional[List[Optional[int]]] = None

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
    if frame.track_ids is not None:
        header["track_ids"] = frame.track_ids
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

    track_ids = _track_ids(header.get("track_ids"), arrays.get("detections"))
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
        track_ids=track_ids,
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


def _track_ids(value: Any, detections: Optional[np.ndarray]) -> Optional[List[Optional[int]]]:
    """The header's ``track_ids``: one entry per detection row, each None or an id in
    1..MAX_TRACK_ID; MessageError otherwise."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise MessageError(f"header 'track_ids' must be a list, got {type(value).__name__}")
    rows = 0 if detections is None else int(detections.shape[0])
    if len(value) != rows:
        raise MessageError(f"header 'track_ids' has {len(value)} entries for {rows} detection rows")
    for v in value:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_TRACK_ID):
            raise MessageError(f"header 'track_ids' holds {v!r:.30}; expected null or an id 1..2**53-1")
    return value


def detection_message(frame: Frame, published_at: Optional[float] = None) -> Dict[str, Any]:
    """The JSON document published on ``detections/<source>`` (see the shipped JSON Schema)."""
    published_at = time.time() if published_at is None else published_at
    dets = []
    names = frame.names or []
    if frame.detections is not None:
        rows = frame.detections.tolist()
        ids = frame.track_ids if frame.track_ids is not None else [None] * len(rows)
        if len(ids) != len(rows):
            raise ValueError(
                f"frame {frame.source}/{frame.frame_id} has {len(ids)} track ids for {len(rows)} detections"
            )
        for (x1, y1, x2, y2, conf, cls), tid in zip(rows, ids):
            c = int(cls)
            dets.append(
                {
                    "bbox": [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)],
                    "confidence": round(conf, 5),
                    "class_id": c,
                    "label": names[c] if 0 <= c < len(names) else str(c),
                    "track_id": tid,
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


TRACK_FIELDS = (
    "track_id", "label", "class_id", "first_seen", "last_seen", "best_confidence", "confidence",
    "bbox", "snapshot",
)
"""What every event says about its track (see :func:`event_message`)."""


def event_message(
    kind: str,
    frame: Frame,
    track: Dict[str, Any],
    run: str,
    zones: Sequence[str] = (),
    **fields: Any,
) -> Dict[str, Any]:
    """One event for the ``events/<source>`` topic (schema ``edgepipe.events/v1``, ``edgepipe
    schema events``): ``kind`` (one of :data:`EVENT_TYPES`) happened to a track on ``frame``.

    ``track`` holds the :data:`TRACK_FIELDS` (a tracker's summary of the track as of this frame);
    ``zones`` the zones the track is in now; ``fields`` what the kind adds (``changed`` for
    update, ``reason`` for end, ``zone``/``line``/``direction``/``duration`` for the zone kinds).
    ``run`` names the tracker's run (new for each daemon start, kept across worker restarts), so
    ``event_id`` is unique per source for ever and the same event always gets the same id: a
    consumer de-duplicates on it. The message is complete on its own (label as text, boxes in
    original-frame pixels with the frame size beside them)."""
    if kind not in EVENT_TYPES:
        raise ValueError(f"event type {kind!r} is not one of {', '.join(EVENT_TYPES)}")
    place = fields.get("zone") or fields.get("line")
    event_id = f"{run}-{track['track_id']}-{frame.frame_id}-{kind}" + (f"-{place}" if place else "")
    msg: Dict[str, Any] = {
        "schema": EVENTS_SCHEMA,
        "event_id": event_id,
        "type": kind,
        "source": frame.source,
        "frame_id": frame.frame_id,
        "timestamp": frame.timestamp,
        "width": frame.width,
        "height": frame.height,
    }
    for key in TRACK_FIELDS:
        msg[key] = track.get(key)
    msg["zones"] = sorted(zones)
    msg.update(fields)
    return msg


def dumps(msg: Dict[str, Any]) -> bytes:
    """Compact JSON bytes for the wire."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()


def replace(frame: Frame, **changes: Any) -> Frame:
    return dataclasses.replace(frame, **changes)
