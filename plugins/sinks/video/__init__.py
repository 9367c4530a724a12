"""The `video` sink: an annotated video file (boxes, labels, confidence) per source.

Every frame is drawn with :func:`edgepipe.draw.annotate` (on the original picture, which this
sink asks the letterbox stage to keep) and appended with OpenCV's ``VideoWriter``. The size is
fixed by the first frame of a source (later frames of another size are scaled to it); the frame
rate is the ``fps`` option, else the source's own rate when frames carry ``meta["fps"]``, else
estimated from the capture timestamps of the first frames. ``mp4v`` in an .mp4 is the default;
where that encoder is missing (an OpenCV built without FFmpeg, as on some Jetsons) the sink falls
back to Motion-JPEG in an .avi, which OpenCV always writes. ``stop()`` finalizes the file, so it is
playable once the daemon stops; a killed worker leaves a file without its index.
"""

from __future__ import annotations

import datetime
import os
import string
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from pydantic import Field, field_validator

from edgepipe.draw import annotate
from edgepipe.messages import Frame
from edgepipe.stage import StageConfig, StageContext, StageError

from .._common import DeliveringSink

__all__ = ["VideoConfig", "VideoSink"]

EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov")
PLACEHOLDERS = ("source", "start")
FALLBACK_CODEC = "MJPG"
# Without an fps option or meta["fps"], the rate is estimated from this many first frames (or
# this much capture time), which are held (drawn, as copies) until the file is opened.
PROBE_FRAMES = 10
PROBE_SECONDS = 2.0
DEFAULT_FPS = 25.0
FPS_RANGE = (1.0, 120.0)


class VideoConfig(StageConfig):
    path: str = Field(
        ...,
        min_length=1,
        description="Output file (.mp4, .avi, .mkv or .mov). The file name may contain {source} "
        "(one file per source; needed when several sources feed this sink) and {start} (the "
        "start time, YYYYmmdd-HHMMSS, so a restarted worker does not overwrite the last "
        "recording). The directory must exist; an existing file is overwritten.",
    )
    codec: str = Field(
        "mp4v",
        pattern="^[A-Za-z0-9 ]{4}$",
        description="FourCC of the encoder. If OpenCV cannot open it, the sink falls back to MJPG "
        "in an .avi next to the requested path.",
    )
    fps: Optional[float] = Field(
        None,
        gt=0,
        le=240,
        description="Frame rate written into the file. Default: the source's (frame.meta['fps']), "
        "else estimated from the first frames' capture times.",
    )

    @field_validator("path")
    @classmethod
    def _path_template(cls, value: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"bad placeholder in {value!r}: {exc}") from None
        unknown = [f for f in fields if f not in PLACEHOLDERS]
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; allowed: {{source}}, {{start}}")
        if fields and "{" in os.path.dirname(value):
            raise ValueError("placeholders are allowed in the file name only, not in the directory")
        if os.path.splitext(value)[1].lower() not in EXTENSIONS:
            raise ValueError(f"file name must end in one of {', '.join(EXTENSIONS)}, got {value!r}")
        return value


class _Recording:
    """One output file: the writer once open, frames held while the rate is being estimated."""

    def __init__(self, path: str):
        self.path = path
        self.writer: Optional[cv2.VideoWriter] = None
        self.size: Optional[Tuple[int, int]] = None  # (w, h), fixed by the first frame
        self.fps: Optional[float] = None
        self.pending: List[Tuple[float, np.ndarray]] = []  # (capture time, drawn picture)
        self.written = 0
        self.resized = False


class VideoSink(DeliveringSink):
    """Annotated video file (boxes, labels, confidence) with OpenCV's VideoWriter."""

    Config = VideoConfig
    needs_original = True
    config: VideoConfig

    def __init__(self, config: VideoConfig, context: StageContext):
        super().__init__(config, context)
        self._recordings: Dict[str, _Recording] = {}
        self._start = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self._ignored: Dict[str, int] = {}

    def _path_for(self, source: str) -> str:
        return os.path.expanduser(self.config.path.format(source=source, start=self._start))

    def check(self) -> None:
        path = self._path_for("check")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise StageError(f"video: directory {folder!r} of path {self.config.path!r} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StageError(f"video: directory {folder!r} is not writable")
        if "{source}" not in self.config.path and os.path.exists(path):
            if not os.path.isfile(path):
                raise StageError(f"video: {path!r} exists and is not a regular file")
            if not os.access(path, os.W_OK):
                raise StageError(f"video: {path!r} exists and is not writable")

    def start(self) -> None:
        self.check()

    def process(self, frames: List[Frame]) -> None:
        for frame in frames:
            self._write(frame)

    def _write(self, frame: Frame) -> None:
        rec = self._recordings.get(frame.source)
        if rec is None:
            if self._recordings and "{source}" not in self.config.path:
                # One file holds one stream; a second source needs {source} in the path.
                if frame.source not in self._ignored:
                    self.log.warning(
                        "Video file %r records source %r only; frames of %r are ignored "
                        "(put {source} in the path to record each source)",
                        self.config.path, next(iter(self._recordings)), frame.source,
                    )
                self._ignored[frame.source] = self._ignored.get(frame.source, 0) + 1
                return
            rec = self._recordings[frame.source] = _Recording(self._path_for(frame.source))
        image = annotate(frame)
        if image is None:
            return  # a frame without picture (a stage upstream stripped it): nothing to draw
        self.delivered(frame)
        rec.pending.append((frame.timestamp, image))
        if rec.writer is None:
            fps = self.config.fps or _meta_fps(frame)
            if fps is None:
                span = rec.pending[-1][0] - rec.pending[0][0]
                if len(rec.pending) < PROBE_FRAMES and span < PROBE_SECONDS:
                    return
                fps = _estimate_fps([t for t, _ in rec.pending])
            self._open(rec, fps)
        self._drain(rec)

    def _open(self, rec: _Recording, fps: float) -> None:
        height, width = rec.pending[0][1].shape[:2]
        rec.size = (width, height)
        writer = cv2.VideoWriter(rec.path, cv2.VideoWriter.fourcc(*self.config.codec), fps, rec.size, True)
        if not writer.isOpened() and self.config.codec.upper() != FALLBACK_CODEC:
            fallback = str(Path(rec.path).with_suffix(".avi"))
            self.log.warning(
                "Codec %r cannot write %r here; writing %s to %r instead",
                self.config.codec, rec.path, FALLBACK_CODEC, fallback,
            )
            rec.path = fallback
            writer = cv2.VideoWriter(rec.path, cv2.VideoWriter.fourcc(*FALLBACK_CODEC), fps, rec.size, True)
        if not writer.isOpened():
            raise StageError(f"video: OpenCV cannot open {rec.path!r} for writing ({self.config.codec})")
        rec.writer, rec.fps = writer, fps
        self.log.info("Recording %dx%d at %.3g fps to %r", width, height, fps, rec.path)

    def _drain(self, rec: _Recording) -> None:
        assert rec.writer is not None and rec.size is not None
        for _, image in rec.pending:
            if (image.shape[1], image.shape[0]) != rec.size:
                if not rec.resized:
                    self.log.warning(
                        "Frame size changed to %dx%d; scaling to the file's %dx%d",
                        image.shape[1], image.shape[0], rec.size[0], rec.size[1],
                    )
                    rec.resized = True
                image = cv2.resize(image, rec.size, interpolation=cv2.INTER_AREA)
            rec.writer.write(image)
            rec.written += 1
        rec.pending = []

    def flush(self) -> List[Frame]:
        # A stream shorter than the probe: open with what the held frames tell.
        for rec in self._recordings.values():
            if rec.writer is None and rec.pending:
                self._open(rec, _estimate_fps([t for t, _ in rec.pending]))
                self._drain(rec)
        return []

    def stop(self) -> None:
        self.flush()
        for rec in self._recordings.values():
            if rec.writer is not None:
                rec.writer.release()  # writes the index: without it the file does not play
                rec.writer = None
                self.log.info("Wrote %d frames to %r", rec.written, rec.path)
        for source, count in self._ignored.items():
            self.log.warning("Ignored %d frames of source %r", count, source)


def _meta_fps(frame: Frame) -> Optional[float]:
    value = frame.meta.get("fps")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and FPS_RANGE[0] <= value <= 240:
        return float(value)
    return None


def _estimate_fps(timestamps: List[float]) -> float:
    """Frames per second from capture times (median interval), clamped; a default when unknown."""
    steps = np.diff(np.asarray(timestamps, dtype=np.float64))
    steps = steps[steps > 0]
    if not len(steps):
        return DEFAULT_FPS
    return float(np.clip(1.0 / float(np.median(steps)), *FPS_RANGE))
