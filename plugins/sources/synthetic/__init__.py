"""The ``synthetic`` source: deterministic moving shapes on a noisy gray background.

It needs nothing (no camera, no file), so a pipeline runs on any machine: demos, tests and
benchmarks. The scenes come from :class:`edgepipe.scenes.SceneStream`: the same seed gives the
same frames on every run. With ``fps`` it is a live source paced like a camera; with ``count`` it
is finite, ends with :class:`EndOfStream` after that many frames, and its links block. With
``truth: true`` each frame carries its ground truth boxes in ``meta["truth"]`` as
``[class_id, x1, y1, x2, y2]`` rows in frame pixels, and the identity of the object of each row
in ``meta["truth_ids"]`` (for measuring trackers). ``exits: true`` lets objects leave the frame
(new ones come in); ``script`` replaces the random objects by straight scripted paths, so the
crossings and zone entries of a scene are known in advance.
"""

from __future__ import annotations

import time
from typing import List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgepipe.messages import Frame
from edgepipe.scenes import CLASSES
from edgepipe.stage import EndOfStream, StageConfig

from .._common import NumberedSource, Pacer

__all__ = ["SyntheticConfig", "SyntheticSource"]


class ScriptedObject(BaseModel):
    """One scripted object: a straight path at constant speed, in frame pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: Union[int, str] = Field(..., description=f"Class: one of {', '.join(CLASSES)} (or its index).")
    size: float = Field(..., ge=4, le=8192, description="Longer side of its box, pixels.")
    start: List[float] = Field(..., min_length=2, max_length=2, description="[x, y] of its centre on frame 'first'.")
    end: List[float] = Field(..., min_length=2, max_length=2, description="[x, y] of its centre on frame 'first + frames'.")
    first: int = Field(0, ge=0, description="Frame on which it appears.")
    frames: int = Field(100, ge=1, description="Frames it takes from start to end (then it is gone).")
    contrast: float = Field(90.0, ge=-200, le=200, description="Gray levels above (>0) or below (<0) the background.")

    @field_validator("shape")
    @classmethod
    def _known_shape(cls, value: Union[int, str]) -> Union[int, str]:
        if isinstance(value, int) and not 0 <= value < len(CLASSES):
            raise ValueError(f"class index {value} is not 0..{len(CLASSES) - 1}")
        if isinstance(value, str) and value not in CLASSES:
            raise ValueError(f"unknown shape {value!r}; known: {', '.join(CLASSES)}")
        return value

    @property
    def class_id(self) -> int:
        return self.shape if isinstance(self.shape, int) else CLASSES.index(self.shape)


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
    truth: bool = Field(
        False,
        description="Attach ground truth boxes to each frame as meta['truth'] and their objects' "
        "identities as meta['truth_ids'].",
    )
    exits: bool = Field(
        False,
        description="Objects leave the frame instead of bouncing off its edges; new ones (new "
        "identities) come in from the edges some frames later.",
    )
    script: Optional[List[ScriptedObject]] = Field(
        None,
        description="Scripted objects instead of 'objects' random ones: each moves in a straight "
        "line (see the README), so a scene's line crossings and zone entries are known.",
    )

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

    def frame_size(self) -> Optional[Tuple[int, int]]:
        """(width, height) of every frame, known from the config (stages downstream check pixel
        coordinates against it at validation time)."""
        return self.config.width, self.config.height

    def start(self) -> None:
        from edgepipe.scenes import SceneStream, ScriptedPath

        cfg = self.config
        script = None
        if cfg.script is not None:
            script = [
                ScriptedPath(class_id=o.class_id, size=o.size, start=(o.start[0], o.start[1]),
                             end=(o.end[0], o.end[1]), first=o.first, frames=o.frames, contrast=o.contrast)
                for o in cfg.script
            ]
        self._scenes = SceneStream(
            cfg.width,
            cfg.height,
            seed=cfg.seed,
            objects=cfg.objects,
            size_range=(float(cfg.size_range[0]), float(cfg.size_range[1])) if cfg.size_range else None,
            exits=cfg.exits,
            script=script,
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
            rows = [[int(r[0])] + r[1:] for r in truth.tolist()]
            return self._emit(image, timestamp, truth=rows, truth_ids=list(self._scenes.last_ids))
        return self._emit(image, timestamp)
