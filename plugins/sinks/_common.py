"""What the first-party sinks share: the series every one of them keeps about its deliveries."""

from __future__ import annotations

import time
from typing import Optional

from edgepipe.messages import Frame
from edgepipe.metrics import AGE_BUCKETS
from edgepipe.stage import Sink, StageConfig, StageContext

__all__ = ["DeliveringSink"]


class DeliveringSink(Sink):
    """A sink that counts its deliveries the same way as every other first-party sink:
    ``edgepipe_sink_messages_published_total``, ``edgepipe_sink_detections_total`` and the
    capture-to-delivery age ``edgepipe_sink_frame_age_seconds`` (dashboards and alerts read
    them); :meth:`delivered` records one delivered frame."""

    def __init__(self, config: StageConfig, context: StageContext) -> None:
        super().__init__(config, context)
        m = self.metrics
        self.published = m.counter("edgepipe_sink_messages_published_total", "Messages a sink delivered.")
        self.detections = m.counter("edgepipe_sink_detections_total", "Detections a sink delivered.")
        self.frame_age = m.histogram(
            "edgepipe_sink_frame_age_seconds",
            "Capture-to-publish age of a frame as a sink delivers it.",
            AGE_BUCKETS,
        )

    def delivered(self, frame: Frame, now: Optional[float] = None, detections: bool = True) -> None:
        """Count ``frame`` as delivered at ``now`` (unix time; default: now), with its
        detections unless ``detections`` is False (a sink forwarding pictures, not results)."""
        now = time.time() if now is None else now
        self.published.inc()
        if detections and frame.detections is not None:
            self.detections.inc(len(frame.detections))
        self.frame_age.observe(max(0.0, now - frame.timestamp))
