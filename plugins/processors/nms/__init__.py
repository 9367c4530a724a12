"""The ``nms`` stage: non-maximum suppression and mapping boxes back to original-frame pixels.

It runs the numpy NMS of :func:`edgepipe.yolo.ops.nms_candidates` (the reference semantics:
conf = objectness x class score, class-aware unless ``agnostic``, at most ``max_det`` boxes in
descending confidence) on each frame's ``candidates``, then undoes the letterbox with the frame's
recorded ``ratio`` and ``pad`` (:func:`edgepipe.yolo.ops.scale_boxes`), clipping to the original
``width`` x ``height``. The result is ``Frame.detections``, float32 (n, 6): x1, y1, x2, y2,
confidence, class id. No torch: this stage runs in a light worker beside the detector. Every
option can change in place on a SIGHUP reload (:meth:`NmsStage.reconfigure`).
"""

from __future__ import annotations

from typing import ClassVar, List, Optional, Tuple

import numpy as np
from pydantic import Field

from edgepipe.messages import Frame
from edgepipe.stage import Processor, StageConfig

from .._common import only_changed

__all__ = ["NmsConfig", "NmsStage"]


class NmsConfig(StageConfig):
    conf_thres: float = Field(0.25, ge=0, le=1, description="Keep boxes whose confidence (objectness x class score) exceeds this.")
    iou_thres: float = Field(0.45, ge=0, le=1, description="Suppress a box overlapping a better one of its class by more than this IoU.")
    classes: Optional[List[int]] = Field(None, description="Keep only these class ids (null: all classes).")
    agnostic: bool = Field(False, description="Suppress across classes (one box per object whatever its class).")
    multi_label: bool = Field(False, description="Allow several classes per box (each above conf_thres).")
    max_det: int = Field(300, ge=1, le=30000, description="Most detections kept per frame.")


class NmsStage(Processor):
    """Non-maximum suppression (numpy); boxes mapped back to original-frame pixels."""

    Config = NmsConfig
    config: NmsConfig
    accepts: ClassVar[Tuple[str, ...]] = ("candidates",)
    produces: ClassVar[Optional[str]] = "detections"

    def start(self) -> None:
        from edgepipe.yolo.ops import clip_boxes, nms_candidates, scale_boxes

        self._nms, self._scale, self._clip = nms_candidates, scale_boxes, clip_boxes

    def process(self, frames: List[Frame]) -> List[Frame]:
        cfg = self.config
        for frame in frames:
            if frame.candidates is None:
                raise ValueError(f"frame {frame.source}/{frame.frame_id} carries no candidates (is a detector upstream?)")
            det = self._nms(
                frame.candidates,
                conf_thres=cfg.conf_thres,
                iou_thres=cfg.iou_thres,
                classes=cfg.classes,
                agnostic=cfg.agnostic,
                multi_label=cfg.multi_label,
                max_det=cfg.max_det,
            )
            det = np.array(det, dtype=np.float32)  # our own writable copy: boxes are scaled in place
            original = (frame.height, frame.width)
            if len(det):
                if frame.ratio is not None and frame.pad is not None:
                    # img1_shape is unused when ratio_pad is given: the recorded values are exact.
                    self._scale(original, det, original, ratio_pad=(frame.ratio, frame.pad))
                else:
                    self._clip(det, original)
            frame.detections = det
            frame.candidates = None  # spent; the links after this stage carry only detections
        return frames

    def reconfigure(self, config: StageConfig) -> bool:
        """Thresholds, classes and limits apply from the next frame, without a restart."""
        if not only_changed(self.config, config, NmsConfig.model_fields.keys() - StageConfig.model_fields.keys()):
            return False
        self.config = config  # type: ignore[assignment]
        self.log.info("Applied new settings: conf_thres=%s iou_thres=%s", self.config.conf_thres, self.config.iou_thres)
        return True
