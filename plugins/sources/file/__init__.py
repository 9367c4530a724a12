"""The ``file`` source: a video file decoded through OpenCV (FFmpeg).

By default it reads as fast as the pipeline takes frames and its links block, so every frame of
the file is processed exactly once, and it ends with :class:`EndOfStream`. ``realtime: true``
paces frames at the file's frame rate, so the file stands in for a live camera (and its links
then default to 'latest'); ``loop: true`` starts over at the end instead of ending. A restarted
file source (its worker crashed or was replaced) continues at the frame where it stopped, with
the same frame ids, instead of reading the file from the start again.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from pydantic import Field

from edgepipe.messages import Frame
from edgepipe.stage import EndOfStream, StageConfig, StageError

from .._common import NumberedSource, Pacer

__all__ = ["FileConfig", "FileSource"]


class FileConfig(StageConfig):
    path: str = Field(..., min_length=1, description="Video file to read (anything FFmpeg decodes).")
    realtime: bool = Field(
        False,
        description="Pace frames at the file's frame rate like a live camera (links default to "
        "'latest'); false reads as fast as the pipeline takes them, losing none.",
    )
    fps: Optional[float] = Field(
        None, gt=0, le=1000, description="Frame rate for realtime pacing when the file does not state one (or to override it)."
    )
    loop: bool = Field(False, description="Start over at the end of the file instead of ending.")


class FileSource(NumberedSource):
    """Video file through OpenCV; optional real-time pacing and looping; ends at end of file."""

    Config = FileConfig
    config: FileConfig

    @property
    def live(self) -> bool:
        return self.config.realtime

    def check(self) -> None:
        if not os.path.isfile(self.config.path):
            raise StageError(f"video file {self.config.path!r} does not exist")
        if not os.access(self.config.path, os.R_OK):
            raise StageError(f"video file {self.config.path!r} is not readable")

    def start(self) -> None:
        self._cap = self._open()
        fps = self.config.fps
        if fps is None and self.config.realtime:
            import cv2

            fps = self._cap.get(cv2.CAP_PROP_FPS) or None
            if not fps or fps > 1000:
                raise StageError(
                    f"video file {self.config.path!r} states no frame rate; set 'fps' for realtime pacing"
                )
        self._pacer = Pacer(fps if self.config.realtime else None)
        if self.resume:
            self._skip(self.resume)
            self.log.info("Resuming %r at frame %d after a restart", self.config.path, self.resume)

    def expected_frames(self) -> Optional[int]:
        """The container's frame count (None when looping, or when it does not say)."""
        import cv2

        if self.config.loop or self._cap is None:
            return None
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        return count if count > 0 else None

    def _skip(self, frames: int) -> None:
        """Continue where a previous incarnation stopped: pass over ``frames`` frames (grabbed,
        not converted). A looping file is counted on its first pass, so the rest of the skip
        takes less than one more pass however long the daemon ran."""
        done = passed = 0  # frames skipped in all, and in the current pass
        while done < frames:
            if self._cap.grab():
                done += 1
                passed += 1
                continue
            if not self.config.loop or passed == 0:
                return  # past the end: read() ends the stream
            frames = done + (frames - done) % passed
            passed = 0
            self._cap.release()
            self._cap = self._open()

    def _open(self) -> Any:
        import cv2

        self.check()  # a file gone since the last open (looping) is named as such, not as undecodable
        cap = cv2.VideoCapture(self.config.path, cv2.CAP_ANY)  # FFmpeg here, GStreamer on a Jetson build
        if not cap.isOpened():
            cap.release()
            raise StageError(f"cannot decode video file {self.config.path!r}")
        return cap

    def read(self) -> Optional[Frame]:
        if not self._pacer.ready():
            return None
        ok, image = self._cap.read()
        if not ok and self.config.loop:
            # Reopening is more reliable than seeking to 0 across containers and codecs.
            self._cap.release()
            self._cap = self._open()
            ok, image = self._cap.read()
        if not ok:
            raise EndOfStream(self.config.path)
        return self._emit(image, time.time())

    def stop(self) -> None:
        cap = getattr(self, "_cap", None)
        if cap is not None:
            cap.release()
            self._cap = None
