"""Detection accuracy (mAP): moved into the package as :mod:`edgepipe.yolo.evaluation`, where
``edgepipe quantize`` and the detector's accuracy gate use it; the names stay importable here."""

from __future__ import annotations

from edgepipe.yolo.evaluation import IOU_THRESHOLDS, DetectionStats, average_precision, box_iou

__all__ = ["IOU_THRESHOLDS", "DetectionStats", "average_precision", "box_iou"]
