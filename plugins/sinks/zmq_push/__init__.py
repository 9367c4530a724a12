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

After the end markers the sink stays connected until every receiver has disconnected (a ``zmq``
source with ``stop_on_eos`` does once it has read them), at most ``end_wait`` seconds: ZeroMQ
discards what a receiver has not yet taken off a connection once the sender closes it, whatever
the linger, so a receiver that is behind would otherwise lose the last frames and the marker. A
socket monitor counts the connections.
"""

from __future__ import annotations

import time
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
    end_wait: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="After the end markers, seconds to stay connected until every receiver has "
        "disconnected, so one that is behind still gets the last frames (0: close at once).",
    )


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
        watch = self.config.send_eos and self.config.end_wait > 0
        self._endpoint = ZmqEndpoint(
            zmq.PUSH, self.config, SUBSCRIPTION_MAX_MESSAGE_SIZE, self.config.hwm, zmq.SNDHWM, self.metrics,
            monitor_events=(zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED) if watch else 0,
        )
        self._endpoint.socket.setsockopt(zmq.SNDTIMEO, int(self.config.send_timeout * 1000))
        self._sources: Set[str] = set()
        self._ended = False
        self._peers = 0  # connections made minus connections lost, from the endpoint's monitor

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
            self._ended = bool(self._sources)
        return []

    def _count_peers(self, timeout_ms: int) -> None:
        """Apply the monitor's connection events (waiting up to ``timeout_ms`` for the first)."""
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        monitor = self._endpoint.monitor
        while monitor.poll(timeout_ms):
            event = recv_monitor_message(monitor)["event"]
            self._peers += -1 if event == zmq.EVENT_DISCONNECTED else 1
            timeout_ms = 0

    def _wait_for_receivers(self) -> None:
        deadline = time.monotonic() + self.config.end_wait
        self._count_peers(0)
        while self._peers > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                self.log.info(
                    "Closing with %d receiver(s) still connected after %g s (end_wait): one that "
                    "is behind may not get the last frames", self._peers, self.config.end_wait,
                )
                return
            self._count_peers(int(min(left, 0.5) * 1000) + 1)

    def stop(self) -> None:
        if self._endpoint is not None and self._endpoint.monitor is not None and self._ended:
            self._wait_for_receivers()
        if self._endpoint is not None:
            # Linger so the frames and end markers still queued reach the receiver.
            self._endpoint.close(linger=self.config.send_timeout)
            self._endpoint = None
