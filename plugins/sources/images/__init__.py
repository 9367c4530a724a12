"""The ``images`` source: still images from a folder or a glob pattern, in sorted order.

Frame ids follow the sorted file names: a frame's id is its file's place in the sorted list (plus
the list's length for each pass already made when looping), and ``meta["file"]`` names the file
(the detection message carries it as ``file``), so results can be matched back to images. Gray
images stay 1-channel; colour images come as BGR. An unreadable file is skipped with one log
line, leaving a gap in the ids. A restarted images source (its worker crashed or was replaced)
continues with the file after the last one it sent. The source is finite: it ends with
:class:`EndOfStream` unless ``loop`` is set.
"""

from __future__ import annotations

import glob
import os
import time
from typing import List, Optional

from pydantic import Field

from edgepipe.messages import Frame
from edgepipe.stage import EndOfStream, StageConfig, StageError

from .._common import NumberedSource, Pacer

__all__ = ["IMAGE_EXTENSIONS", "ImagesConfig", "ImagesSource", "list_images"]

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


class ImagesConfig(StageConfig):
    path: str = Field(
        ...,
        min_length=1,
        description="A folder (its image files are read) or a glob pattern such as 'shots/*.png'.",
    )
    fps: Optional[float] = Field(
        None, gt=0, le=1000, description="Pace frames at this rate (unset: as fast as the pipeline takes them)."
    )
    loop: bool = Field(False, description="Start over after the last image instead of ending.")


def list_images(path: str) -> List[str]:
    """The image files a folder holds (by extension) or a glob matches, sorted by path."""
    if os.path.isdir(path):
        names = [os.path.join(path, n) for n in os.listdir(path)]
        files = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(n)]
    else:
        files = [n for n in glob.glob(path) if os.path.isfile(n)]
    return sorted(files)


class ImagesSource(NumberedSource):
    """Still images from a folder or glob, sorted; meta["file"] names each; finite."""

    Config = ImagesConfig
    config: ImagesConfig

    @property
    def live(self) -> bool:
        return False

    def check(self) -> None:
        if not list_images(self.config.path):
            raise StageError(f"no image files found at {self.config.path!r} (expected a folder or a glob)")

    def start(self) -> None:
        self._files = list_images(self.config.path)
        if not self._files:
            raise StageError(f"no image files found at {self.config.path!r}")
        self._position = self.resume  # the next file, counted across passes (= its frame id)
        if self.resume:
            self.log.info("Resuming %r at image %d after a restart", self.config.path, self.resume)
        self._pacer = Pacer(self.config.fps)

    def expected_frames(self) -> Optional[int]:
        return None if self.config.loop else len(self._files)

    def read(self) -> Optional[Frame]:
        import cv2

        if not self._pacer.ready():
            return None
        while True:
            if self._position >= len(self._files) and not self.config.loop:
                raise EndOfStream(self.config.path)
            name = self._files[self._position % len(self._files)]
            self._next_id = self._position
            self._position += 1
            timestamp = time.time()
            image = cv2.imread(name, cv2.IMREAD_ANYCOLOR)
            if image is not None:
                return self._emit(image, timestamp, file=name)
            self.log.warning("Skipping %r: not a readable image", name)
