"""The ``letterbox`` stage: turn source frames into the detector's 1-channel letterboxed input.

Colour frames are converted to gray (BGR order), then resized keeping the aspect ratio and padded
with gray 114 to ``imgsz`` as YOLOv5 does (:func:`edgepipe.yolo.ops.letterbox`). The frame keeps
its original ``width``/``height`` and gains ``ratio`` and ``pad``, which the NMS stage uses to map
boxes back to original pixels. With ``auto: true`` (the reference's default) padding is trimmed
to the nearest multiple of ``stride``, so each camera resolution gets its own minimal input
shape; ``auto: false`` pads every frame to exactly ``imgsz``, so frames of cameras with different
resolutions can share one detector batch. ``keep_original: true`` carries the source frame along
for sinks that draw on it (costs a copy's worth of bandwidth on every link after this one); it is
turned on by itself when such a sink (``needs_original``: preview, video, zmq_pub with frames) is
downstream, unless the config sets it.
"""

from __future__ import annotations

from typing import ClassVar, List, Optional, Tuple

from pydantic import Field, model_validator

from edgepipe.messages import Frame
from edgepipe.stage import Processor, StageConfig

from .._common import ImageSize, parse_imgsz

__all__ = ["LetterboxConfig", "LetterboxStage"]


class LetterboxConfig(StageConfig):
    imgsz: ImageSize = Field(
        640,
        description="Detector input size: an int (square) or [height, width], multiples of stride.",
    )
    auto: bool = Field(
        True,
        description="Trim the padding to a multiple of stride (a minimal rectangle per resolution); "
        "false pads every frame to exactly imgsz (one shape for all cameras, so they batch together).",
    )
    stride: int = Field(32, ge=1, le=256, description="The model's largest stride; input sides are multiples of it.")
    color: int = Field(114, ge=0, le=255, description="Gray level of the padding.")
    scaleup: bool = Field(True, description="Enlarge frames smaller than imgsz (false: only shrink).")
    keep_original: bool = Field(
        False,
        description="Carry the source frame along (Frame.original) for sinks that draw on it. "
        "Default: true when such a sink (preview, video, zmq_pub with frames_fps) is downstream.",
    )

    @model_validator(mode="after")
    def _stride_multiple(self) -> LetterboxConfig:
        parse_imgsz(self.imgsz, self.stride)
        return self


class LetterboxStage(Processor):
    """Gray letterbox for the detector (imgsz, auto); records ratio/pad for box mapping."""

    Config = LetterboxConfig
    config: LetterboxConfig
    accepts: ClassVar[Tuple[str, ...]] = ("frames",)
    produces: ClassVar[Optional[str]] = "letterboxed"
    keep_original_option: ClassVar[Optional[str]] = "keep_original"

    def __init__(self, config: LetterboxConfig, context):
        super().__init__(config, context)
        self._shape = parse_imgsz(config.imgsz, config.stride)

    def start(self) -> None:
        from edgepipe.yolo.ops import letterbox, to_gray

        self._letterbox, self._to_gray = letterbox, to_gray

    def process(self, frames: List[Frame]) -> List[Frame]:
        cfg = self.config
        for frame in frames:
            if frame.image is None:
                raise ValueError(f"frame {frame.source}/{frame.frame_id} carries no image to letterbox")
            original = frame.image
            gray = self._to_gray(original)
            frame.height, frame.width = int(gray.shape[0]), int(gray.shape[1])
            image, ratio, pad = self._letterbox(
                gray, self._shape, color=cfg.color, auto=cfg.auto, scaleup=cfg.scaleup, stride=cfg.stride
            )
            frame.image = image
            frame.ratio, frame.pad = (float(ratio[0]), float(ratio[1])), (float(pad[0]), float(pad[1]))
            if cfg.keep_original:
                frame.original = original
        return frames
