"""The `video` sink: an annotated video file (boxes, labels, confidence) per source.

Every frame is drawn with :func:`edgepipe.draw.annotate` (on the original picture, which this
sink asks the letterbox stage to keep) and appended with OpenCV's ``VideoWriter``. The size is
fixed by the first frame of a source (later frames of another size are scaled to it), optionally
scaled down to ``max_width``; the frame rate is the ``fps`` option, else the source's own rate
when frames carry ``meta["fps"]``, else estimated from the capture timestamps of the first frames.

The file extension picks the codec, so that what is recorded opens where people look at it: a
browser plays VP8 in WebM (which every OpenCV wheel writes through FFmpeg's libvpx) and H.264 in
MP4, but not the MPEG-4 Part 2 (``mp4v``) that OpenCV writes into an .mp4 by default. An .mp4
asks for H.264 (``avc1``), which OpenCV has only where the platform gives FFmpeg an H.264 encoder
(the pip wheel's FFmpeg has just the V4L2 hardware one), and falls back to ``mp4v`` with one log
line; where nothing works (an OpenCV built without FFmpeg) the sink writes Motion-JPEG in an .avi,
which OpenCV always can. The bitrate is set (where OpenCV lets us) to a level that keeps VP8 fast
enough for a live 720p stream on one core and the file at a few MB per minute.

``stop()`` finalizes the file. A worker killed with ``kill -9`` leaves a WebM without its index
and duration that still plays up to the last cluster written; an .mp4 or .avi without its index
does not play at all (see README.md).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import string
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
from pydantic import Field, field_validator

from edgepipe.draw import annotate
from edgepipe.messages import Frame
from edgepipe.stage import StageConfig, StageContext, StageError

from .._common import DeliveringSink

__all__ = ["VideoConfig", "VideoSink"]

# The codecs tried for each container, in order: the first one this OpenCV can open wins.
CODECS: Dict[str, Tuple[str, ...]] = {
    ".webm": ("VP80",),
    ".mp4": ("avc1", "mp4v"),
    ".mov": ("avc1", "mp4v"),
    ".mkv": ("VP80", "avc1"),
    ".avi": ("MJPG",),
}
EXTENSIONS = tuple(CODECS)
CODEC_NAMES = {"VP80": "VP8", "VP90": "VP9", "avc1": "H.264", "mp4v": "MPEG-4 Part 2", "MJPG": "Motion JPEG"}
PLACEHOLDERS = ("source", "start")
FALLBACK_CODEC = "MJPG"
# Codecs that take a target bitrate (Motion JPEG is set by quality instead), and those that get
# the automatic one: MPEG-4 Part 2 at that rate would be a blur of blocks, so it keeps OpenCV's.
RATE_CONTROLLED = ("VP80", "VP90", "avc1", "mp4v")
AUTO_RATE = ("VP80", "VP90", "avc1")
# The automatic bitrate in bits per pixel per frame: 276 kbit/s (about 2 MB a minute) for
# 1280x720 at 10 fps. VP8's encoding time grows with the bitrate: at this level a noisy 720p
# frame takes about 50 ms of one core (README.md has the measurements).
BITS_PER_PIXEL = 0.03
MIN_AUTO_KBPS = 100.0
# What OpenCV and FFmpeg print on their own while a writer opens (a WebM has no FourCC table, an
# encoder that is missing): logged at debug level instead of landing raw in the journal.
NATIVE_NOISE = re.compile(r"^(OpenCV: FFMPEG: |\[ ?(ERROR|WARN|INFO|DEBUG):\d+@|\[\w+ @ 0x[0-9a-f]+\] )")
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
        description="Output file; the extension picks the codec: .webm VP8 (plays in browsers), "
        ".mp4/.mov H.264 where OpenCV has an encoder else MPEG-4 Part 2, .mkv VP8, .avi Motion "
        "JPEG. The file name may contain {source} (one file per source; needed when several "
        "sources feed this sink) and {start} (the start time, YYYYmmdd-HHMMSS, so a restarted "
        "worker does not overwrite the last recording). The directory must exist; an existing "
        "file is overwritten.",
    )
    codec: Optional[str] = Field(
        None,
        pattern="^[A-Za-z0-9 ]{4}$",
        description="FourCC of the encoder, to override the extension's choice (e.g. VP90). If "
        "OpenCV cannot open it, the sink falls back to MJPG in an .avi next to the requested path.",
    )
    bitrate: Optional[float] = Field(
        None,
        gt=0,
        le=100_000,
        description="Target bitrate in kbit/s for VP8/VP9/H.264/MPEG-4. Default: 0.03 bits per "
        "pixel per frame (276 kbit/s, about 2 MB a minute, for 1280x720 at 10 fps), at least "
        "100. Higher costs encoding time as well as disk. Ignored by OpenCV before 4.10.",
    )
    max_width: Optional[int] = Field(
        None,
        ge=16,
        description="Scale frames wider than this down to it (the height follows, rounded to "
        "even): less encoding time and disk on a small CPU. Default: the source's width.",
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
        self.size: Optional[Tuple[int, int]] = None  # (w, h) written, fixed by the first frame
        self.source_size: Optional[Tuple[int, int]] = None  # (w, h) of the first frame
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

    def addresses(self) -> Dict[str, str]:
        return {"video": os.path.abspath(self._path_for("{source}") if "{source}" in self.config.path else self._path_for(""))}

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
        rec.source_size = (width, height)
        rec.size = _scaled(width, height, self.config.max_width)
        requested = os.path.splitext(rec.path)[1].lower()
        codecs = (self.config.codec,) if self.config.codec else CODECS[requested]
        tried: List[str] = []
        writer = None
        for codec in codecs:
            writer = self._writer(rec.path, codec, fps, rec.size)
            if writer is not None:
                break
            tried.append(codec)
        if writer is None:
            # Every OpenCV writes Motion JPEG into an AVI, even one built without FFmpeg.
            codec, path = FALLBACK_CODEC, str(Path(rec.path).with_suffix(".avi"))
            writer = self._writer(path, codec, fps, rec.size)
            if writer is None:
                raise StageError(f"video: OpenCV cannot open {rec.path!r} for writing ({', '.join(tried)})")
            rec.path = path
        if tried:
            self.log.warning(
                "No %s encoder in this OpenCV; writing %s (%s) to %r instead%s",
                _names(tried), CODEC_NAMES.get(codec, codec), codec, rec.path,
                " (browsers do not play it; a .webm path records VP8, which they do)"
                if codec in ("mp4v", "MJPG") else "",
            )
        rec.writer, rec.fps = writer, fps
        scaled = "" if rec.size == rec.source_size else f" (scaled from {width}x{height})"
        self.log.info("Recording %dx%d%s at %.3g fps, %s, to %r",
                      rec.size[0], rec.size[1], scaled, fps, CODEC_NAMES.get(codec, codec), rec.path)

    def _writer(self, path: str, codec: str, fps: float, size: Tuple[int, int]) -> Optional[cv2.VideoWriter]:
        """An opened writer, or None when this OpenCV cannot write ``codec`` into ``path``."""
        params: List[int] = []
        prop = getattr(cv2, "VIDEOWRITER_PROP_BITRATE", None)
        kbps = self.config.bitrate
        if kbps is None and codec in AUTO_RATE:
            kbps = max(MIN_AUTO_KBPS, BITS_PER_PIXEL * size[0] * size[1] * fps / 1000)
        if prop is not None and kbps is not None and codec in RATE_CONTROLLED:
            params = [prop, int(kbps * 1000)]
        fourcc = cv2.VideoWriter.fourcc(*codec)
        with _native_output(self.log):
            if params:
                writer = cv2.VideoWriter(path, cv2.CAP_ANY, fourcc, fps, size, params)
            else:
                writer = cv2.VideoWriter(path, fourcc, fps, size, True)
        if writer.isOpened():
            return writer
        writer.release()
        try:  # a failed open can leave an empty file behind
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                os.unlink(path)
        except OSError:
            pass
        return None

    def _drain(self, rec: _Recording) -> None:
        assert rec.writer is not None and rec.size is not None
        for _, image in rec.pending:
            if (image.shape[1], image.shape[0]) != rec.size:
                if (image.shape[1], image.shape[0]) != rec.source_size and not rec.resized:
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


def _scaled(width: int, height: int, max_width: Optional[int]) -> Tuple[int, int]:
    """(w, h) scaled down to ``max_width`` (aspect kept, height even), or as given."""
    if max_width is None or width <= max_width:
        return width, height
    return max_width, max(2, int(round(height * max_width / width / 2)) * 2)


def _names(codecs: List[str]) -> str:
    return " or ".join(f"{CODEC_NAMES.get(c, c)} ({c})" for c in codecs)


@contextmanager
def _native_output(log: logging.Logger) -> Iterator[None]:
    """Catch what OpenCV and FFmpeg write straight to file descriptor 2 while a writer opens.

    Their own lines (a WebM has no FourCC table, so OpenCV says VP80 "is not supported" and then
    writes it; a missing H.264 encoder prints four lines) go to the debug log; anything else that
    reached stderr meanwhile (another thread's log line) is written back unchanged.
    """
    saved = caught = None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        caught = tempfile.TemporaryFile()
    except (OSError, ValueError):  # no usable fd 2 or no temporary file: catch nothing
        if saved is not None:
            os.close(saved)
        yield
        return
    with caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            other = []
            for raw in caught.read().decode(errors="replace").splitlines():
                if NATIVE_NOISE.match(raw.strip()):
                    log.debug("OpenCV: %s", raw.strip())
                elif raw.strip():
                    other.append(raw + "\n")
            if other:
                os.write(2, "".join(other).encode())


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
