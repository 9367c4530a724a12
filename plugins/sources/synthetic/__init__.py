"""The ``synthetic`` source: deterministic moving shapes on a noisy gray background.

It needs nothing (no camera, no file), so a pipeline runs on any machine: demos, tests and
benchmarks. The scenes come from :class:`edgepipe.scenes.SceneStream`: the same seed gives the
same frames on every run. With ``fps`` it is a live source paced like a camera; with ``count`` it
is finite, ends with :class:`EndOfStream` after that many frames, and its links block. With
``truth: true`` each frame carries its ground truth boxes in ``meta["truth"]`` as
``[class_id, x1, y1, x2, y2]`` rows in frame pixels.
"""

from __future__ import annotations

import time
from typing import List, Optional

from pydantic import Field, model_validator

from edgepipe.messages import Frame
from edgepipe.stage import EndOfStream, StageConfig

from .._common import NumberedSource, Pacer

__all__ = ["SyntheticConfig", "SyntheticSource"]


class SyntheticConfig(StageConfig):
    width: int = Field(640, ge=16, le=8192, description="Frame width in pixels.")
    height: int = Field(480, ge=16, le=8192, description="Frame height in pixels.")
    fps: Optional[float] = Field(
        10.0,
        gt=0,
        le=1000,
        description="Frames per second (a live, paced source); null with 'count' to produce "
        "frames as fast as the pipeline takes them.",
    )
    count: Optional[int] = Field(
        None, ge=1, description="End after this many frames (a finite source whose links block); unset: endless."
    )
    seed: int = Field(0, ge=0, description="Scene seed: the same seed gives the same frames.")
    objects: int = Field(4, ge=0, le=256, description="Number of moving objects in the scene.")
    size_range: Optional[List[int]] = Field(
        None,
        min_length=2,
        max_length=2,
        description="[min, max] object size in pixels (unset: the scene's default for the frame size).",
    )
    truth: bool = Field(False, description="Attach ground truth boxes to each frame as meta['truth'].")

    @model_validator(mode="after")
    def _endless_needs_pace(self) -> SyntheticConfig:
        if self.fps is None and self.count is None:
            raise ValueError("set fps (a live, paced source) or count (a finite one); an unpaced endless source would flood the pipeline")
        if self.size_range is not None and not 1 <= self.size_range[0] <= self.size_range[1]:
            raise ValueError(f"size_range must be [min, max] with 1 <= min <= max, got {self.size_range}")
        return self


class SyntheticSource(NumberedSource):
    """Deterministic moving shapes on a noisy gray background; needs no camera or file."""

    Config = SyntheticConfig
    config: SyntheticConfig

    @property
    def live(self) -> bool:
        return self.config.count is None

    def start(self) -> None:
        from edgepipe.scenes import SceneStream

        cfg = self.config
        self._scenes = SceneStream(
            cfg.width,
            cfg.height,
            seed=cfg.seed,
            objects=cfg.objects,
            size_range=(float(cfg.size_range[0]), float(cfg.size_range[1])) if cfg.size_range else None,
        )
        self._pacer = Pacer(cfg.fps)

    def expected_frames(self) -> Optional[int]:
        return self.config.count

    def read(self) -> Optional[Frame]:
        if self.config.count is not None and self._next_id >= self.config.count:
            raise EndOfStream(self.name)
        if not self._pacer.ready():
            return None
        image, truth = self._scenes.next()
        timestamp = time.time()
        if self.config.truth:
            return self._emit(image, timestamp, truth=[[int(r[0])] + r[1:] for r in truth.tolist()])
        return self._emit(image, timestamp)
