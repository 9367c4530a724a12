"""The ``rtsp`` source: an IP camera or media server stream through OpenCV's FFmpeg backend.

A background thread reads the stream and keeps only the newest frame, so decode never falls
behind the camera and latency stays bounded however slow the pipeline is. Opening and reading
have timeouts; a dropped stream is reopened with backoff from 1 s doubling up to 60 s, each
attempt counted in ``edgepipe_source_reconnects_total``, logged on one line, and reported on
``/healthz`` while the stream is gone.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from pydantic import Field, field_validator

from edgepipe.stage import StageConfig, StageError

from .._common import CaptureSource, CaptureThread

__all__ = ["RtspConfig", "RtspSource", "redact"]


class RtspConfig(StageConfig):
    url: str = Field(..., description="Stream URL, e.g. rtsp://user:pass@192.168.1.20:554/stream1.")
    transport: str = Field(
        "tcp",
        pattern="^(tcp|udp)$",
        description="RTSP transport: 'tcp' (interleaved, survives lossy networks) or 'udp'.",
    )
    open_timeout: float = Field(10.0, gt=0, le=300, description="Seconds to wait for the stream to open.")
    read_timeout: float = Field(5.0, gt=0, le=300, description="Seconds without a frame before the stream counts as lost.")
    backoff: float = Field(1.0, gt=0, description="First wait before reconnecting, seconds; doubles per failed attempt.")
    max_backoff: float = Field(60.0, gt=0, description="Longest wait between reconnect attempts, seconds.")
    max_reconnects: Optional[int] = Field(
        None, ge=0, description="Give up after this many failed reconnect attempts in a row (unset: never)."
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not re.match(r"^(rtsps?|rtmp|https?)://", value):
            raise ValueError(f"url must start with rtsp://, rtsps://, rtmp:// or http(s)://, got {redact(value)!r}")
        return value


def redact(url: str) -> str:
    """The URL with any password replaced, for logs."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


class RtspSource(CaptureSource):
    """RTSP stream through OpenCV/FFmpeg; newest frame only; reconnects with backoff."""

    Config = RtspConfig
    config: RtspConfig

    def check(self) -> None:
        import cv2

        found = re.search(r"FFMPEG:\s+(\w+)", cv2.getBuildInformation())
        if not found or found.group(1) != "YES":
            raise StageError("this OpenCV was built without FFmpeg; the rtsp source needs it")

    def start(self) -> None:
        self._stop_timeout = self.config.read_timeout + self.config.open_timeout
        # OpenCV's FFmpeg backend takes demuxer options from this variable; the worker is our own
        # process, so setting it process-wide is fine.
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"rtsp_transport;{self.config.transport}"
        self._capture = CaptureThread(
            redact(self.config.url),
            self._open,
            self.log,
            self.reconnects.inc,
            on_health=self.capture_health,
            backoff=self.config.backoff,
            max_backoff=self.config.max_backoff,
            max_reconnects=self.config.max_reconnects,
            read_timeout=self.config.read_timeout,
        )
        self._capture.start()

    def _open(self):
        import cv2

        cfg = self.config
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(cfg.open_timeout * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(cfg.read_timeout * 1000),
        ]
        cap = cv2.VideoCapture(cfg.url, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise StageError(f"cannot open {redact(cfg.url)!r}")
        return cap
