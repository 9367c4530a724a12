"""Stages of a third-party plugin package, written from edgepipe.stage's docstrings alone.

They exercise the runtime, not vision: ``counter`` produces numbered frames, ``passthrough``
delays, batches or fails on purpose, ``record`` writes what reached it to a JSON-lines file.
"""

from __future__ import annotations

import json
import os
import time
from typing import List, Optional

import numpy as np
from pydantic import Field

from edgepipe.messages import Frame
from edgepipe.metrics import AGE_BUCKETS
from edgepipe.stage import EndOfStream, Processor, Sink, Source, StageConfig, StageError


class CounterConfig(StageConfig):
    count: Optional[int] = Field(None, ge=0, description="Frames to produce, then end; None: endless.")
    fps: float = Field(0.0, ge=0, description="Frames per second; 0: as fast as the link takes them.")
    width: int = Field(32, ge=1, le=4096, description="Frame width.")
    height: int = Field(24, ge=1, le=4096, description="Frame height.")
    live: Optional[bool] = Field(None, description="Live source (default: endless ones are).")
    fail_after: Optional[int] = Field(None, ge=0, description="Raise StageError after this many frames.")
    start_delay: float = Field(0.0, ge=0, description="Seconds start() takes (a model warming up).")
    fail_start: bool = Field(False, description="start() raises StageError.")
    fail_check: bool = Field(False, description="check() raises StageError (pre-flight).")
    outage_at: Optional[int] = Field(None, ge=0, description="Before this frame, deliver nothing for outage_s (a camera gone dark).")
    outage_s: float = Field(0.0, ge=0, description="Seconds the outage lasts (read() returns None meanwhile).")
    dtype: str = Field("uint8", description="numpy dtype of the pictures (anything but uint8 must be refused).")


class Counter(Source):
    """Numbered test frames (pixels = frame_id % 256); finite or endless, paced or not."""

    Config = CounterConfig

    def __init__(self, config: CounterConfig, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, context)
        self.next_id = self.resume  # after a restart, go on from the last id sent
        self.next_time = 0.0
        self.outage_until: Optional[float] = None

    @property
    def live(self) -> bool:
        c = self.config
        return c.live if c.live is not None else c.count is None  # type: ignore[attr-defined]

    def check(self) -> None:
        if self.config.fail_check:  # type: ignore[attr-defined]
            raise StageError(f"counter {self.name!r}: no such device (fail_check is set)")

    def start(self) -> None:
        c = self.config
        time.sleep(c.start_delay)  # type: ignore[attr-defined]
        if c.fail_start:  # type: ignore[attr-defined]
            raise StageError(f"counter {self.name!r}: cannot open (fail_start is set)")
        self.next_time = time.monotonic()

    def read(self) -> Optional[Frame]:
        c = self.config
        if c.count is not None and self.next_id >= c.count:  # type: ignore[attr-defined]
            raise EndOfStream()
        if c.fail_after is not None and self.next_id >= c.fail_after:  # type: ignore[attr-defined]
            raise StageError(f"counter {self.name!r}: device lost after {self.next_id} frames")
        if self.next_id == c.outage_at and self.outage_until is None:  # type: ignore[attr-defined]
            self.outage_until = time.monotonic() + c.outage_s  # type: ignore[attr-defined]
        if self.outage_until is not None and time.monotonic() < self.outage_until:
            time.sleep(0.1)
            return None
        if c.fps > 0:  # type: ignore[attr-defined]
            wait = self.next_time - time.monotonic()
            if wait > 0.1:
                time.sleep(0.1)
                return None
            if wait > 0:
                time.sleep(wait)
            self.next_time = max(self.next_time + 1.0 / c.fps, time.monotonic() - 1.0)  # type: ignore[attr-defined]
        image = np.full((c.height, c.width), self.next_id % 256, c.dtype)  # type: ignore[attr-defined]
        frame = Frame(source=self.name, frame_id=self.next_id, timestamp=time.time(), image=image)
        self.next_id += 1
        return frame


class PassthroughConfig(StageConfig):
    sleep_ms: float = Field(0.0, ge=0, description="Milliseconds each process() call takes.")
    max_batch: int = Field(1, ge=1, le=64, description="Frames per process() call at most.")
    max_wait_ms: float = Field(0.0, ge=0, description="Wait this long for a batch to fill.")
    fail_every: Optional[int] = Field(None, ge=1, description="Raise on frames whose id is a multiple of this.")
    hang_at: Optional[int] = Field(None, ge=0, description="Stop responding at this frame id (a hung stage).")
    crash_at: Optional[int] = Field(None, ge=0, description="Kill the worker process at this frame id.")
    tag: str = Field("", description="Written into each frame's meta['tag']; changes in place on reload.")
    series: Optional[str] = Field(None, description="Also declare a counter of this name at start (a badly named one must be refused).")
    series_labels: List[str] = Field(default_factory=list, description="Label names of that counter.")
    problem_from: Optional[int] = Field(None, ge=0, description="From this frame id on, report the stage unhealthy.")
    problem_until: Optional[int] = Field(None, ge=0, description="From this frame id on, report it healthy again.")


class Passthrough(Processor):
    """Passes frames on, optionally slowly, in batches, or failing on purpose."""

    Config = PassthroughConfig

    def __init__(self, config: PassthroughConfig, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, context)
        # A series of the plugin's own: frames passed on, by the tag they carry.
        self.tagged = self.metrics.counter(
            "edgepipe_passthrough_frames_total", "Frames the passthrough stage passed on, by tag.", labels=("tag",)
        )

    def start(self) -> None:
        if self.config.series:  # type: ignore[attr-defined]
            self.metrics.counter(self.config.series, "A counter named in the config.", self.config.series_labels)  # type: ignore[attr-defined]

    def process(self, frames: List[Frame]) -> List[Frame]:
        c = self.config
        if c.sleep_ms:  # type: ignore[attr-defined]
            time.sleep(c.sleep_ms / 1000.0)  # type: ignore[attr-defined]
        for f in frames:
            if c.hang_at is not None and f.frame_id >= c.hang_at:  # type: ignore[attr-defined]
                time.sleep(3600)
            if c.crash_at is not None and f.frame_id == c.crash_at:  # type: ignore[attr-defined]
                os._exit(17)
            if c.fail_every and f.frame_id % c.fail_every == 0:  # type: ignore[attr-defined]
                raise ValueError(f"frame {f.frame_id} refused (fail_every={c.fail_every})")  # type: ignore[attr-defined]
            f.meta.update(batch=len(frames), pid=os.getpid(), tag=c.tag)  # type: ignore[attr-defined]
            self.tagged.labels(c.tag).inc()  # type: ignore[attr-defined]
            if c.problem_until is not None and f.frame_id >= c.problem_until:  # type: ignore[attr-defined]
                self.report_healthy()
            elif c.problem_from is not None and f.frame_id >= c.problem_from:  # type: ignore[attr-defined]
                self.report_unhealthy(f"cannot reach the test broker since frame {c.problem_from}")  # type: ignore[attr-defined]
        return frames

    def reconfigure(self, config: StageConfig) -> bool:
        """Only ``tag`` and ``sleep_ms`` change in place."""
        same = {k: v for k, v in config.model_dump().items() if k not in ("tag", "sleep_ms")}
        old = {k: v for k, v in self.config.model_dump().items() if k not in ("tag", "sleep_ms")}
        if same != old:
            return False
        self.config = config
        return True


class RecordConfig(StageConfig):
    path: str = Field(..., description="JSON-lines file to append to.")


class Record(Sink):
    """Appends one JSON line per frame (source, id, meta, pid) to a file."""

    Config = RecordConfig

    def __init__(self, config: RecordConfig, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, context)
        self.lines = self.metrics.counter("edgepipe_record_lines_written_total", "Lines the record sink wrote.")
        # The series every sink keeps, declared alike (same kind, labels and buckets) so that
        # dashboards over edgepipe_sink_* see this sink too.
        self.published = self.metrics.counter("edgepipe_sink_messages_published_total", "Messages a sink delivered.")
        self.frame_age = self.metrics.histogram(
            "edgepipe_sink_frame_age_seconds", "Capture-to-publish age of a frame as a sink delivers it.", AGE_BUCKETS
        )

    def start(self) -> None:
        self.file = open(self.config.path, "a", encoding="utf-8")  # type: ignore[attr-defined]

    def process(self, frames: List[Frame]) -> None:
        for f in frames:
            line = {
                "source": f.source,
                "frame_id": f.frame_id,
                "meta": f.meta,
                "pixel": int(f.image.flat[0]) if f.image is not None and f.image.size else None,
                "pid": os.getpid(),
            }
            self.file.write(json.dumps(line) + "\n")
            self.frame_age.observe(time.time() - f.timestamp)
            self.published.inc()
            self.lines.inc()
        self.file.flush()

    def stop(self) -> None:
        self.file.close()
