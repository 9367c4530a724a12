"""Reading edgepipe's published detections from Python.

A ``zmq_pub`` sink publishes ZeroMQ multipart messages ``[topic, json]`` on topics
``detections/<source>``; the JSON document is described by :class:`DetectionMessage` and by the
JSON Schema shipped as ``edgepipe/schemas/detections.schema.json`` (``edgepipe schema
detections``). :func:`subscribe` yields typed messages; :func:`subscribe_raw` yields the raw
``(topic, payload)`` pairs (``edgepipe subscribe`` prints those payloads as they came).
"""

from __future__ import annotations

import importlib.resources
import json
import pkgutil
from typing import Dict, Iterator, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field

from edgepipe.messages import DETECTIONS_SCHEMA
from edgepipe.security import CurveConfig

__all__ = [
    "Detection",
    "DetectionMessage",
    "SubscribeTimeout",
    "Timing",
    "build_detections_schema",
    "detections_schema",
    "detections_schema_text",
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


class SubscribeTimeout(Exception):
    """Nothing arrived within the timeout; the message says where and how long."""


def detections_schema_text() -> str:
    """The shipped JSON Schema file's text (package data, read through importlib.resources)."""
    if hasattr(importlib.resources, "files"):  # Python 3.9+
        ref = importlib.resources.files("edgepipe") / "schemas" / "detections.schema.json"  # novermin (guarded)
        return ref.read_text(encoding="utf-8")
    data = pkgutil.get_data("edgepipe", "schemas/detections.schema.json")  # Python 3.8
    if data is None:
        raise FileNotFoundError("edgepipe/schemas/detections.schema.json is not installed")
    return data.decode("utf-8")


def detections_schema() -> dict:
    return json.loads(detections_schema_text())


def build_detections_schema() -> dict:
    """The schema as generated from :class:`DetectionMessage`; the shipped file is this, written
    with ``json.dumps(..., indent=2)`` (a test keeps the two equal)."""
    schema = DetectionMessage.model_json_schema(by_alias=True)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    schema["description"] = (
        "A detection message of edgepipe, published as ZeroMQ multipart [topic, json] on topic "
        "'detections/<source>'."
    )
    schema["properties"]["schema"]["const"] = DETECTIONS_SCHEMA
    return schema


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
        detections_only = topic.startswith("detections/")
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
) -> Iterator[DetectionMessage]:
    """Yield typed :class:`DetectionMessage` objects (see :func:`subscribe_raw` for arguments).

    A message that does not match the schema raises pydantic's ValidationError: a publisher
    speaking another format is a deployment error, not something to skip silently.
    """
    for _topic, payload in subscribe_raw(endpoint, topic, timeout, curve):
        yield DetectionMessage.model_validate_json(payload)
