"""Reading edgepipe's published detections and events from Python.

A ``zmq_pub`` sink publishes ZeroMQ multipart messages ``[topic, json]`` on topics
``detections/<source>`` (one per frame) and ``events/<source>`` (one per event of a tracked
object). The JSON documents are described by :class:`DetectionMessage` and :class:`EventMessage`
and by the JSON Schemas shipped as ``edgepipe/schemas/detections.schema.json`` and
``events.schema.json`` (``edgepipe schema detections``, ``edgepipe schema events``).
:func:`subscribe` yields typed messages of either kind, chosen by topic; :func:`subscribe_raw`
yields the raw ``(topic, payload)`` pairs (``edgepipe subscribe`` prints those payloads as they
came).
"""

from __future__ import annotations

import importlib.resources
import json
import pkgutil
from typing import Dict, Iterator, List, Optional, Tuple, Type, Union

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Literal

from edgepipe.messages import DETECTIONS_SCHEMA, EVENTS_SCHEMA, MAX_TRACK_ID
from edgepipe.security import CurveConfig

__all__ = [
    "Detection",
    "DetectionMessage",
    "EventMessage",
    "SCHEMAS",
    "SubscribeTimeout",
    "Timing",
    "build_detections_schema",
    "build_events_schema",
    "build_schema",
    "detections_schema",
    "detections_schema_text",
    "events_schema",
    "schema_text",
    "subscribe",
    "subscribe_raw",
]


class Detection(BaseModel):
    """One detected object."""

    model_config = ConfigDict(extra="forbid")

    bbox: List[float] = Field(
        ..., min_length=4, max_length=4, description="[x1, y1, x2, y2] in original-frame pixels."
    )
    confidence: float = Field(..., ge=0, le=1, description="Objectness times class score.")
    class_id: int = Field(..., ge=0, description="Index into the model's class names.")
    label: str = Field(..., description="The class name (the index as text when the model has none).")
    track_id: Optional[int] = Field(
        ...,
        ge=1,
        le=MAX_TRACK_ID,
        description="Id of the tracked object this detection belongs to (a 'tracker' stage "
        "upstream): unique per source for the daemon's life, never reused, also across a restart "
        "of the tracker. null while the detection belongs to no confirmed track, and always "
        "without a tracker.",
    )


class Timing(BaseModel):
    """Where the time went."""

    model_config = ConfigDict(extra="allow")

    stages: Dict[str, float] = Field(default_factory=dict, description="Stage name -> seconds spent in it.")
    latency: float = Field(..., description="Seconds from capture to publish.")


class DetectionMessage(BaseModel):
    """The JSON document published on ``detections/<source>``."""

    model_config = ConfigDict(extra="allow", title="edgepipe detection message")

    schema_: str = Field(
        ..., alias="schema", description=f"Version tag of this format: {DETECTIONS_SCHEMA!r}."
    )
    source: str = Field(..., description="Name of the source stage that captured the frame.")
    frame_id: int = Field(..., ge=0, description="Per-source frame number, increasing from 0.")
    timestamp: float = Field(..., description="Capture time, unix seconds.")
    width: int = Field(..., ge=0, description="Original frame width in pixels.")
    height: int = Field(..., ge=0, description="Original frame height in pixels.")
    detections: List[Detection] = Field(..., description="Objects found, highest confidence first.")
    timing: Timing = Field(..., description="Per-stage time and capture-to-publish latency.")
    file: Optional[str] = Field(None, description="The image or video file the frame came from, if any.")


class Snapshot(BaseModel):
    """JPEG files of a track's best-confidence sighting, in the tracker's snapshot directory."""

    model_config = ConfigDict(extra="forbid")

    crop: str = Field(..., description="File name of the crop around the box.")
    frame: Optional[str] = Field(None, description="File name of the whole frame with the box drawn (null: not kept).")
    confidence: float = Field(..., ge=0, le=1, description="The detection confidence of that sighting.")
    frame_id: int = Field(..., ge=0, description="The frame it was taken from.")


class EventMessage(BaseModel):
    """The JSON document published on ``events/<source>``: something happened to a tracked object.

    Types: ``new`` (a track is confirmed), ``update`` (something a consumer cares about changed:
    ``changed`` lists what, of ``zones``, ``label``, ``snapshot``), ``end`` (the track is over:
    ``reason`` says why); and from a ``zones`` stage ``enter`` and ``leave`` (a zone; ``leave``
    with the ``duration`` inside), ``cross`` (a line, with its ``direction``) and ``loiter`` (in a
    zone for longer than its dwell time, ``duration`` so far). Zone events are their own types, so
    a consumer can take only them; entering or leaving a zone also changes the track's ``zones``,
    which the track's lifecycle announces with an ``update`` (``changed: ["zones"]``) in the same
    frame. Every event carries the whole state of its track, so any one of them is enough to
    show it."""

    model_config = ConfigDict(extra="allow", title="edgepipe event message")

    schema_: str = Field(..., alias="schema", description=f"Version tag of this format: {EVENTS_SCHEMA!r}.")
    event_id: str = Field(
        ...,
        min_length=1,
        description="Unique per source, also across daemon restarts, and the same for the same "
        "event: de-duplicate on it. '<run>-<track_id>-<frame_id>-<type>[-<zone or line>]'.",
    )
    type: Literal["new", "update", "end", "enter", "leave", "cross", "loiter"] = Field(
        ..., description="What happened (see the description of the message)."
    )
    source: str = Field(..., description="Name of the source stage whose frames show the object.")
    frame_id: int = Field(..., ge=0, description="The frame on which it was noticed.")
    timestamp: float = Field(..., description="Capture time of that frame, unix seconds.")
    width: int = Field(..., ge=0, description="Original frame width in pixels.")
    height: int = Field(..., ge=0, description="Original frame height in pixels.")
    track_id: int = Field(..., ge=1, le=MAX_TRACK_ID, description="The track (the track_id of its detections).")
    label: str = Field(..., description="Class name of the track.")
    class_id: int = Field(..., ge=0, description="Index into the model's class names.")
    first_seen: float = Field(..., description="Capture time of its first detection, unix seconds.")
    last_seen: float = Field(..., description="Capture time of its latest detection, unix seconds.")
    best_confidence: float = Field(..., ge=0, le=1, description="Highest detection confidence so far.")
    confidence: Optional[float] = Field(
        ..., ge=0, le=1, description="Confidence of its detection on this frame (null: not detected on it)."
    )
    bbox: List[float] = Field(
        ..., min_length=4, max_length=4,
        description="[x1, y1, x2, y2] of its latest detection, original-frame pixels.",
    )
    zones: List[str] = Field(..., description="Zones it is in now (empty without a zones stage).")
    snapshot: Optional[Snapshot] = Field(
        ..., description="Its best snapshot so far (null: none written, or snapshots are off)."
    )
    changed: Optional[List[Literal["zones", "label", "snapshot"]]] = Field(
        None, description="update: what changed."
    )
    reason: Optional[Literal["lost", "restarted"]] = Field(
        None,
        description="end: 'lost' (not seen for track_buffer, or for hidden_buffer once hidden behind another "
        "object), 'restarted' (the tracker's worker restarted, see docs/guarantees.md).",
    )
    zone: Optional[str] = Field(None, description="enter, leave, loiter: the zone.")
    line: Optional[str] = Field(None, description="cross: the line.")
    direction: Optional[str] = Field(None, description="cross: the direction's name (the line's 'directions').")
    duration: Optional[float] = Field(
        None, ge=0, description="leave: seconds it was inside; loiter: seconds inside so far."
    )


class SubscribeTimeout(Exception):
    """Nothing arrived within the timeout; the message says where and how long."""


SCHEMAS = ("detections", "events")
"""The message formats whose JSON Schema ships with edgepipe (``edgepipe schema <name>``)."""

_MODELS: Dict[str, Tuple[Type[BaseModel], str]] = {"detections": (DetectionMessage, DETECTIONS_SCHEMA), "events": (EventMessage, EVENTS_SCHEMA)}


def schema_text(name: str) -> str:
    """The shipped JSON Schema file ``<name>.schema.json`` (package data, read through
    importlib.resources); ``name`` is one of :data:`SCHEMAS`."""
    if name not in SCHEMAS:
        raise ValueError(f"no schema {name!r}; shipped: {', '.join(SCHEMAS)}")
    if hasattr(importlib.resources, "files"):  # Python 3.9+
        ref = importlib.resources.files("edgepipe") / "schemas" / f"{name}.schema.json"  # novermin (guarded)
        return ref.read_text(encoding="utf-8")
    data = pkgutil.get_data("edgepipe", f"schemas/{name}.schema.json")  # Python 3.8
    if data is None:
        raise FileNotFoundError(f"edgepipe/schemas/{name}.schema.json is not installed")
    return data.decode("utf-8")


def detections_schema_text() -> str:
    return schema_text("detections")


def detections_schema() -> dict:
    return json.loads(schema_text("detections"))


def events_schema() -> dict:
    return json.loads(schema_text("events"))


def build_schema(name: str) -> dict:
    """The schema ``name`` as generated from its model (:class:`DetectionMessage`,
    :class:`EventMessage`); the shipped file is this, written with ``json.dumps(..., indent=2)``
    (a test keeps the two equal)."""
    model, tag = _MODELS[name]
    schema = model.model_json_schema(by_alias=True)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    what = "A detection message" if name == "detections" else "An event message"
    schema["description"] = (
        f"{what} of edgepipe, published as ZeroMQ multipart [topic, json] on topic '{name}/<source>'."
    )
    if name == "events":
        schema["description"] += " " + " ".join((EventMessage.__doc__ or "").split())
    schema["properties"]["schema"]["const"] = tag
    return schema


def build_detections_schema() -> dict:
    return build_schema("detections")


def build_events_schema() -> dict:
    return build_schema("events")


def subscribe_raw(
    endpoint: str,
    topic: str = "detections/",
    timeout: Optional[float] = None,
    curve: Optional[CurveConfig] = None,
    max_message_size: Optional[int] = None,
) -> Iterator[Tuple[bytes, bytes]]:
    """Yield ``(topic, payload)`` of every message whose topic starts with ``topic``.

    ``timeout`` (seconds) bounds the wait for each message: SubscribeTimeout when nothing came
    within it. A malformed endpoint raises ValueError. Frames of other lengths are skipped.
    ``curve`` (``client_secret_key`` + ``server_public_key``) talks to a CURVE publisher; one
    that refuses this client's key simply delivers nothing (see :mod:`edgepipe.security`).
    ``max_message_size`` bounds what the publisher may send (default 1 MiB for ``detections/``
    topics, 64 MiB otherwise, for JPEG pictures): a larger message drops the connection.
    Unreadable or unprotected key files raise :class:`edgepipe.security.SecurityError` (a
    ValueError).
    """
    import zmq

    from edgepipe.security import (
        DETECTION_MAX_MESSAGE_SIZE,
        FRAME_MAX_MESSAGE_SIZE,
        check_connect,
        secure_client,
    )

    if max_message_size is None:
        detections_only = topic.startswith(("detections/", "events/"))
        max_message_size = DETECTION_MAX_MESSAGE_SIZE if detections_only else FRAME_MAX_MESSAGE_SIZE
    check_connect(endpoint, curve, what="endpoint")
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1000)
    try:
        secure_client(sock, curve, max_message_size)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise ValueError(f"cannot connect to {endpoint!r}: {exc}") from None
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while True:
            wait_ms = None if timeout is None else max(0, int(timeout * 1000))
            if not poller.poll(wait_ms):
                raise SubscribeTimeout(f"no message on {endpoint} (topic {topic!r}) within {timeout:g} s")
            parts = sock.recv_multipart()
            if len(parts) == 2:
                yield parts[0], parts[1]
    finally:
        sock.close(linger=0)


def subscribe(
    endpoint: str,
    topic: str = "detections/",
    timeout: Optional[float] = None,
    curve: Optional[CurveConfig] = None,
) -> Iterator[Union[DetectionMessage, EventMessage]]:
    """Yield typed messages (see :func:`subscribe_raw` for arguments): a
    :class:`DetectionMessage` for each ``detections/<source>`` message and an
    :class:`EventMessage` for each ``events/<source>`` one (``topic="events/"`` takes only
    events). Other topics (``frames/``: JPEG pictures) are skipped.

    A message that does not match the schema raises pydantic's ValidationError: a publisher
    speaking another format is a deployment error, not something to skip silently.
    """
    for got, payload in subscribe_raw(endpoint, topic, timeout, curve):
        if got.startswith(b"events/"):
            yield EventMessage.model_validate_json(payload)
        elif got.startswith(b"detections/"):
            yield DetectionMessage.model_validate_json(payload)
