"""The ``zmq_pub`` sink: publish detection messages on a ZeroMQ PUB socket.

Each frame becomes one multipart message ``[b"detections/<source>", json]`` where the JSON is
:func:`edgepipe.messages.detection_message` (schema ``edgepipe.detections/v2``, see ``edgepipe
schema detections``), followed by one ``[b"events/<source>", json]`` message per event the frame
carries (tracked objects appearing, changing, entering zones, crossing lines, ending: schema
``edgepipe.events/v1``, ``edgepipe schema events``). Subscribers filter by topic prefix:
``detections/`` for every source, ``detections/cam1`` for one, ``events/`` for the events. With ``frames_fps`` set, annotated JPEG pictures (boxes, labels,
confidences drawn by :mod:`edgepipe.draw`) also go out on ``frames/<source>``, at most that many
per second per source, so a viewer can watch without the cost of sending every frame. PUB never
blocks: a subscriber too slow to read loses messages (ZeroMQ's high-water mark) and sees the gap
in ``frame_id``. The socket binds loopback by default; a public bind needs CURVE keys or
``insecure: true``. When the sink stops (the pipeline drained on SIGTERM, or its sources ended)
the socket keeps delivering what is still queued towards connected subscribers for up to
``linger`` seconds, so the last messages of a run are not cut off.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from pydantic import Field

from edgepipe.messages import Frame, detection_message, dumps
from edgepipe.security import SUBSCRIPTION_MAX_MESSAGE_SIZE, NetworkSecurity
from edgepipe.stage import StageConfig

from ..._zmq import ZmqEndpoint, check_curve_keys
from .._common import DeliveringSink

__all__ = ["ZmqPubConfig", "ZmqPubSink"]


class ZmqPubConfig(NetworkSecurity, StageConfig):
    bind: str = Field(
        "tcp://127.0.0.1:5556",
        description="Address the PUB socket binds; subscribers connect to it (edgepipe subscribe).",
    )
    frames_fps: Optional[float] = Field(
        None,
        gt=0,
        le=120,
        description="Also publish annotated JPEG frames on 'frames/<source>', at most this many "
        "per second per source (null: detections only).",
    )
    jpeg_quality: int = Field(80, ge=10, le=100, description="JPEG quality of the annotated frames.")
    events: bool = Field(
        True, description="Publish the frames' event messages on 'events/<source>' (tracker and zones stages upstream)."
    )
    hwm: int = Field(
        1000, ge=1, le=1000000, description="Messages queued per subscriber before PUB drops them for it."
    )
    linger: float = Field(
        1.0,
        ge=0,
        le=60,
        description="Seconds the socket keeps delivering queued messages to connected subscribers "
        "when the sink stops; bounded so a stalled subscriber cannot hold up the shutdown.",
    )


class ZmqPubSink(DeliveringSink):
    """Publishes detection messages (and optionally annotated JPEGs) on a ZeroMQ PUB socket."""

    Config = ZmqPubConfig
    config: ZmqPubConfig
    accepts: ClassVar[Tuple[str, ...]] = ("detections",)

    _endpoint: Any = None

    def __init__(self, config: ZmqPubConfig, context):
        super().__init__(config, context)
        # Drawing wants the full-resolution source frame; without frames nothing is drawn.
        self.needs_original = config.frames_fps is not None  # type: ignore[misc]

    def check(self) -> None:
        check_curve_keys(self.config)

    def start(self) -> None:
        import zmq

        self._endpoint = ZmqEndpoint(zmq.PUB, self.config, SUBSCRIPTION_MAX_MESSAGE_SIZE, self.config.hwm, zmq.SNDHWM, self.metrics)
        self._socket = self._endpoint.socket
        self._next_picture: Dict[str, float] = {}
        self.events_published = self.metrics.counter(
            "edgepipe_sink_events_published_total", "Event messages (tracked objects, zones) a sink delivered."
        )
        self.log.info("Publishing detections on %r", self._endpoint.address)

    def addresses(self) -> Dict[str, str]:
        where = self._endpoint.address if self._endpoint is not None else self.config.bind
        return {"detections": f"{where} (edgepipe subscribe {where} --topic detections/)"}

    def process(self, frames: List[Frame]) -> None:
        import zmq

        for frame in frames:
            now = time.time()
            msg = detection_message(frame, published_at=now)
            self._socket.send_multipart([f"detections/{frame.source}".encode(), dumps(msg)], zmq.NOBLOCK)
            self.delivered(frame, now)
            if self.config.events and frame.events:
                topic = f"events/{frame.source}".encode()
                for event in frame.events:
                    self._socket.send_multipart([topic, dumps(event)], zmq.NOBLOCK)
                self.events_published.inc(len(frame.events))
            if self.config.frames_fps is not None:
                self._picture(frame)

    def _picture(self, frame: Frame) -> None:
        import cv2
        import zmq

        from edgepipe.draw import annotate

        now = time.monotonic()
        if now < self._next_picture.get(frame.source, 0.0):
            return
        image = annotate(frame)
        if image is None:
            return
        assert self.config.frames_fps is not None
        self._next_picture[frame.source] = now + 1.0 / self.config.frames_fps
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality])
        if ok:
            self._socket.send_multipart([f"frames/{frame.source}".encode(), jpeg.tobytes()], zmq.NOBLOCK)

    def stop(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close(linger=self.config.linger)
            self._endpoint = None
