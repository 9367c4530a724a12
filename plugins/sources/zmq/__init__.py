"""The ``zmq`` source: frames pushed by an external producer over ZeroMQ (a PULL socket).

The producer is typically another edgepipe whose ``zmq_push`` sink sends its frames (raw, or
already letterboxed) over tcp, so capture and inference can run on different hosts; any program
that writes edgepipe's frame wire format (:func:`edgepipe.messages.encode`) works too. Frames keep
their capture timestamp, letterbox ratio/pad and arrays. By default they are renumbered as this
source's own (``source`` = this stage's name, ids 0, 1, 2, ...), with the producer's source and
frame id kept in ``meta["upstream"]``; ``keep_source: true`` passes the producer's source names and
ids through instead, for relaying several cameras at once. Malformed messages are dropped and
counted as decode errors. A tcp bind beyond loopback needs CURVE keys (or ``insecure: true``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Set

from pydantic import Field

from edgepipe.messages import EndMarker, Frame, MessageError, decode
from edgepipe.ratelimit import CauseLog
from edgepipe.security import FRAME_MAX_MESSAGE_SIZE
from edgepipe.stage import DATA_KINDS, EndOfStream, StageConfig

from ..._zmq import EndpointConfig, ZmqEndpoint, check_curve_keys
from .._common import READ_WAIT_S, NumberedSource

__all__ = ["ZmqConfig", "ZmqSource"]


class ZmqConfig(EndpointConfig, StageConfig):
    carries: Optional[str] = Field(
        None,
        pattern="^(" + "|".join(DATA_KINDS) + ")$",
        description="What the producer sends, for the config's stage-fit check: 'frames' (raw), "
        "'letterboxed' (ready for the detector), 'candidates' or 'detections'. Unset: not checked.",
    )
    keep_source: bool = Field(
        False,
        description="Pass the producer's source names and frame ids through instead of numbering "
        "frames as this source's own.",
    )
    live: bool = Field(
        True,
        description="Whether the producer is live (links default to 'latest'); false when every "
        "frame matters (links default to 'block' and backpressure reaches the producer).",
    )
    stop_on_eos: bool = Field(
        False,
        description="End (EndOfStream) once every producer source seen has sent its end marker; "
        "by default end markers are ignored and the source waits for more.",
    )
    hwm: int = Field(4, ge=1, le=100000, description="Frames ZeroMQ may queue on the socket before the producer waits.")


class ZmqSource(NumberedSource):
    """Frames from an external producer (e.g. another edgepipe's zmq_push) over a ZeroMQ PULL."""

    Config = ZmqConfig
    config: ZmqConfig

    _endpoint: Any = None

    @property
    def live(self) -> bool:
        return self.config.live

    def output_kind(self) -> Optional[str]:
        return self.config.carries

    def check(self) -> None:
        check_curve_keys(self.config)

    def start(self) -> None:
        import zmq

        self._endpoint = ZmqEndpoint(zmq.PULL, self.config, FRAME_MAX_MESSAGE_SIZE, self.config.hwm, zmq.RCVHWM, self.metrics)
        self._seen: Set[str] = set()
        self._ended: Set[str] = set()
        self._bad = CauseLog(self.log)  # one line per cause and 10 s; every one is counted

    def read(self) -> Optional[Frame]:
        sock = self._endpoint.socket
        if not sock.poll(int(READ_WAIT_S * 1000)):
            return None
        parts = sock.recv_multipart(copy=False)
        try:
            msg = decode(parts)
        except MessageError as exc:
            self.metrics.errors.labels("decode").inc()
            self._bad.log(logging.WARNING, f"Dropped a frame message that does not decode: {exc}")
            return None
        if isinstance(msg, EndMarker):
            self._ended.add(msg.source)
            if self.config.stop_on_eos and self._ended >= self._seen:
                raise EndOfStream(self._endpoint.address)
            return None
        self._seen.add(msg.source)
        self._ended.discard(msg.source)
        if self.config.keep_source:
            return msg
        msg.meta = dict(msg.meta, upstream={"source": msg.source, "frame_id": msg.frame_id})
        msg.source, msg.frame_id = self.name, self._next_id
        self._next_id += 1
        return msg

    def stop(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
