"""The ``zmq_push`` sink: forward whole frames to another edgepipe (or any reader) over ZeroMQ PUSH.

This is how a pipeline spans hosts: a camera box runs source -> letterbox -> ``zmq_push``, and an
inference box runs a ``zmq`` source -> yolov5 -> nms -> ``zmq_pub``. Frames travel in edgepipe's
frame wire format (:func:`edgepipe.messages.encode`: a small header plus the raw arrays, sent
without copying), keeping their source, frame id, capture timestamp and letterbox ratio/pad.

PUSH applies backpressure: when the receiver is slow or absent, ``send`` waits up to
``send_timeout`` seconds and then drops the frame (counted as dropped, reason ``queue_full``),
so a vanished peer never wedges this pipeline. At the end of a finite stream, an end marker per
source goes out, so a ``zmq`` source with ``stop_on_eos`` ends too. Connecting over tcp to
another host should use CURVE keys (``edgepipe keys generate``).
"""

from __future__ import annotations

from typing import Any, List, Set

from pydantic import Field

from edgepipe.messages import Frame, encode, encode_eos
from edgepipe.security import SUBSCRIPTION_MAX_MESSAGE_SIZE
from edgepipe.stage import StageConfig

from ..._zmq import EndpointConfig, ZmqEndpoint, check_curve_keys
from .._common import DeliveringSink

__all__ = ["ZmqPushConfig", "ZmqPushSink"]


class ZmqPushConfig(EndpointConfig, StageConfig):
    send_timeout: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Seconds to wait for a slow or absent receiver before dropping a frame (0: drop at once).",
    )
    hwm: int = Field(4, ge=1, le=100000, description="Frames queued on the socket before sending waits.")
    send_eos: bool = Field(True, description="Send an end marker per source when the stream ends.")


class ZmqPushSink(DeliveringSink):
    """Forwards whole frames (wire format) to another edgepipe's zmq source over ZeroMQ PUSH."""

    Config = ZmqPushConfig
    config: ZmqPushConfig

    _endpoint: Any = None

    def check(self) -> None:
        check_curve_keys(self.config)

    def start(self) -> None:
        import zmq

        # PUSH only ever receives handshakes; keep its inbound limit small.
        self._endpoint = ZmqEndpoint(zmq.PUSH, self.config, SUBSCRIPTION_MAX_MESSAGE_SIZE, self.config.hwm, zmq.SNDHWM, self.metrics)
        self._endpoint.socket.setsockopt(zmq.SNDTIMEO, int(self.config.send_timeout * 1000))
        self._sources: Set[str] = set()

    def _send(self, parts: List[Any]) -> bool:
        import zmq

        try:
            self._endpoint.socket.send_multipart(parts, copy=False)
        except zmq.Again:
            return False
        return True

    def process(self, frames: List[Frame]) -> None:
        for frame in frames:
            self._sources.add(frame.source)
            if self._send(encode(frame)):
                self.delivered(frame, detections=False)
            else:
                self.metrics.dropped.labels("queue_full").inc()

    def flush(self) -> List[Frame]:
        if self.config.send_eos:
            for source in sorted(self._sources):
                self._send(encode_eos(source))
        return []

    def stop(self) -> None:
        if self._endpoint is not None:
            # Linger so the frames and end markers still queued reach the receiver.
            self._endpoint.close(linger=self.config.send_timeout)
            self._endpoint = None
