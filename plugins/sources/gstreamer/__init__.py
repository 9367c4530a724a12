"""The ``gstreamer`` source: frames from a GStreamer pipeline that ends in ``appsink``.

This is how a Jetson's CSI camera is read (``nvarguscamerasrc ! nvvidconv !
video/x-raw,format=GRAY8 ! appsink drop=true max-buffers=1``): the ISP and the converter do the
work, and the frames arrive as gray planes. Two backends run the same pipeline string:

- ``opencv``: ``cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)``, when OpenCV was built with
  GStreamer (JetPack's system OpenCV is);
- ``gst-launch``: a ``gst-launch-1.0 -q`` subprocess whose ``appsink`` is replaced by
  ``fdsink fd=1``, writing raw GRAY8 or BGR frames into a pipe. Raw bytes carry no caps, so the
  frame size and format come from the last ``video/x-raw`` caps in the pipeline, or from the
  ``width``/``height``/``format`` options (which then append a converter and that capsfilter).
  ``appsink drop=true`` becomes a leaky one-buffer queue, so a slow pipeline still gets the
  newest frame. The subprocess is killed in ``stop()``.

``auto`` picks ``opencv`` when available, else ``gst-launch``. When the pipeline ends (for
example ``videotestsrc num-buffers=N``) the source raises :class:`EndOfStream`.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from pydantic import Field, field_validator

from edgepipe.messages import Frame
from edgepipe.stage import EndOfStream, StageConfig, StageError

from .._common import READ_WAIT_S, NumberedSource

__all__ = [
    "GStreamerConfig",
    "GStreamerSource",
    "fdsink_pipeline",
    "opencv_has_gstreamer",
    "raw_caps",
    "split_pipeline",
]

FORMATS = {"GRAY8": 1, "BGR": 3}  # raw formats we can read off a pipe: bytes per pixel


class GStreamerConfig(StageConfig):
    pipeline: str = Field(
        ...,
        description="gst-launch syntax ending in an appsink, e.g. 'videotestsrc ! "
        "video/x-raw,format=GRAY8,width=640,height=480 ! appsink drop=true max-buffers=1'.",
    )
    backend: str = Field(
        "auto",
        pattern="^(auto|opencv|gst-launch)$",
        description="'opencv' (cv2 built with GStreamer), 'gst-launch' (a subprocess writing raw "
        "frames to a pipe), or 'auto' (opencv when available).",
    )
    width: Optional[int] = Field(
        None, gt=0, le=16384, description="Frame width for the gst-launch backend when the pipeline's caps do not say it (adds a videoscale)."
    )
    height: Optional[int] = Field(
        None, gt=0, le=16384, description="Frame height for the gst-launch backend when the pipeline's caps do not say it (adds a videoscale)."
    )
    format: Optional[str] = Field(
        None,
        pattern="^(GRAY8|BGR)$",
        description="Raw format for the gst-launch backend when the pipeline's caps do not say it: GRAY8 or BGR (adds a videoconvert).",
    )
    live: bool = Field(
        True,
        description="Whether the pipeline is a live camera (links default to 'latest'); false for "
        "finite pipelines whose every frame matters (links default to 'block').",
    )

    @field_validator("pipeline")
    @classmethod
    def _ends_in_appsink(cls, value: str) -> str:
        elements = split_pipeline(value)
        if len(elements) < 2 or elements[-1].split()[0] != "appsink":
            raise ValueError(f"pipeline must end in '! appsink ...', got {value!r:.120}")
        return value


def split_pipeline(pipeline: str) -> List[str]:
    """The '!'-separated parts of a gst-launch description, stripped (quotes respected)."""
    parts: List[str] = []
    current: List[str] = []
    quote = ""
    for ch in pipeline:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "!":
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def raw_caps(pipeline: str) -> Dict[str, Any]:
    """format/width/height from the last ``video/x-raw`` caps of the pipeline (those it states)."""
    found: Dict[str, Any] = {}
    for part in split_pipeline(pipeline):
        text = part.strip("\"'")
        if text.startswith("video/x-raw") and "(memory:" not in text.split(",")[0]:
            found = {}
            for key, value in re.findall(r"(\w+)\s*=\s*(?:\(\w+\))?\s*([^,\s]+)", text):
                if key == "format":
                    found["format"] = value
                elif key in ("width", "height") and value.isdigit():
                    found[key] = int(value)
    return found


def _appsink_queue(appsink: str) -> str:
    """A queue that mimics 'appsink drop=true max-buffers=N' in front of fdsink (or nothing)."""
    props = dict(re.findall(r"([\w-]+)\s*=\s*(\S+)", appsink))
    if props.get("drop", "false").lower() not in ("true", "1"):
        return ""
    buffers = props.get("max-buffers", "1")
    buffers = buffers if buffers.isdigit() and buffers != "0" else "1"
    return f"queue leaky=downstream max-size-buffers={buffers} max-size-bytes=0 max-size-time=0 ! "


def fdsink_pipeline(
    pipeline: str, width: Optional[int], height: Optional[int], fmt: Optional[str]
) -> Tuple[str, Tuple[int, int, str]]:
    """The pipeline with its appsink replaced by ``fdsink fd=1``, and the frames' (w, h, format).

    Options given in the config override the pipeline's caps through an appended converter and
    capsfilter; anything still unknown is an error naming what to set.
    """
    parts = split_pipeline(pipeline)
    body, appsink = parts[:-1], parts[-1]
    caps = raw_caps(pipeline)
    want = {"width": width, "height": height, "format": fmt}
    if any(v is not None for v in want.values()):
        caps.update({k: v for k, v in want.items() if v is not None})
        missing = [k for k in ("width", "height", "format") if k not in caps]
        if not missing:
            body.append("videoconvert ! videoscale ! video/x-raw,format={format},width={width},height={height}".format(**caps))
    missing = [k for k in ("format", "width", "height") if k not in caps]
    if missing:
        raise StageError(
            f"pipeline caps do not state {', '.join(missing)}; the gst-launch backend needs them: "
            f"add them to the last video/x-raw caps or set {', '.join(missing)} in the stage config"
        )
    if caps["format"] not in FORMATS:
        raise StageError(f"pipeline delivers format {caps['format']!r}; the gst-launch backend reads {sorted(FORMATS)}")
    text = " ! ".join(body) + " ! " + _appsink_queue(appsink) + "fdsink fd=1 sync=false"
    return text, (int(caps["width"]), int(caps["height"]), str(caps["format"]))


def opencv_has_gstreamer() -> bool:
    import cv2

    found = re.search(r"GStreamer:\s+(\w+)", cv2.getBuildInformation())
    return bool(found and found.group(1) == "YES")


def _elements(pipeline: str) -> List[str]:
    """Element factory names the pipeline uses (caps and pad references left out)."""
    names = []
    for part in split_pipeline(pipeline):
        word = part.split()[0] if part.split() else ""
        if re.fullmatch(r"[a-z0-9][a-z0-9_-]*", word):
            names.append(word)
    return names


class GStreamerSource(NumberedSource):
    """GStreamer pipeline ending in appsink (e.g. a Jetson CSI camera); via OpenCV or gst-launch."""

    Config = GStreamerConfig
    config: GStreamerConfig

    _proc: Optional[subprocess.Popen] = None
    _cap: Any = None

    @property
    def live(self) -> bool:
        return self.config.live

    def _backend(self) -> str:
        if self.config.backend != "auto":
            return self.config.backend
        return "opencv" if opencv_has_gstreamer() else "gst-launch"

    def check(self) -> None:
        backend = self._backend()
        if backend == "opencv":
            if not opencv_has_gstreamer():
                raise StageError("backend 'opencv' needs an OpenCV built with GStreamer; this one is not (use 'gst-launch')")
            return
        for tool in ("gst-launch-1.0", "gst-inspect-1.0"):
            if shutil.which(tool) is None:
                raise StageError(f"{tool!r} not found on PATH; install gstreamer1.0-tools")
        fdsink_pipeline(self.config.pipeline, self.config.width, self.config.height, self.config.format)
        for element in dict.fromkeys(_elements(self.config.pipeline)):
            done = subprocess.run(
                ["gst-inspect-1.0", "--exists", element], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30
            )
            if done.returncode != 0:
                raise StageError(f"GStreamer element {element!r} is not installed on this machine")

    def start(self) -> None:
        if self._backend() == "opencv":
            import cv2

            self._cap = cv2.VideoCapture(self.config.pipeline, cv2.CAP_GSTREAMER)
            if not self._cap.isOpened():
                raise StageError(f"OpenCV could not start the pipeline {self.config.pipeline!r:.120}")
            return
        text, (self._w, self._h, self._fmt) = fdsink_pipeline(
            self.config.pipeline, self.config.width, self.config.height, self.config.format
        )
        channels = FORMATS[self._fmt]
        # GStreamer pads every raw video row to a multiple of 4 bytes.
        self._row = self._w * channels
        self._stride = (self._row + 3) // 4 * 4
        self._shape = (self._h, self._w) if channels == 1 else (self._h, self._w, channels)
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            ["gst-launch-1.0", "-q", *shlex.split(text)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            # Its own session, so a Ctrl-C or SIGTERM sent to the daemon's process group does not
            # end the pipeline before this worker drains; stop() kills it, and a killed worker
            # takes it down through SIGPIPE on its next write.
            start_new_session=True,
            restore_signals=True,
        )
        self._buf = np.empty(self._stride * self._h, np.uint8)
        self._got = 0
        self._frame_ts = 0.0

    def read(self) -> Optional[Frame]:
        if self._cap is not None:
            ok, image = self._cap.read()
            if not ok:
                raise EndOfStream(self.config.pipeline)
            return self._emit(image, time.time())
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + READ_WAIT_S
        view = memoryview(self._buf.data)
        while self._got < len(self._buf):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            n = os.readv(fd, [view[self._got :]])
            if n == 0:
                self._ended()
            if self._got == 0:
                self._frame_ts = time.time()  # the first bytes of a frame mark its capture
            self._got += n
        self._got = 0
        image = self._buf.reshape(self._h, self._stride)[:, : self._row].reshape(self._shape).copy()
        return self._emit(image, self._frame_ts)

    def _ended(self) -> None:
        assert self._proc is not None
        rc = self._proc.wait(timeout=10)
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        if rc != 0:
            reason = lines[-1] if lines else f"exit status {rc}"
            raise StageError(f"gst-launch-1.0 failed: {reason!r:.300}")
        if self._got:
            raise StageError(f"pipeline ended in the middle of a frame ({self._got} of {len(self._buf)} bytes)")
        raise EndOfStream(self.config.pipeline)

    def stop(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
            self._stderr.close()
