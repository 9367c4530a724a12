"""Detection accuracy: per-class average precision and mAP at IoU 0.5 and 0.5:0.95.

Matching follows COCO: per image and class, detections in descending confidence each take the
unmatched ground-truth box of highest IoU at or above the threshold (else they are false
positives). AP is the area under the precision-recall curve with precision made monotone
(the running maximum from the right), sampled at 101 recall points 0, 0.01, ..., 1 (COCO's
interpolation) or integrated continuously (every recall step; VOC 2010+). mAP averages AP over
the classes that have ground truth; mAP@0.5:0.95 also averages over the ten IoU thresholds
0.50, 0.55, ..., 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of x1, y1, x2, y2 boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def average_precision(recall: np.ndarray, precision: np.ndarray, method: str = "101") -> float:
    """Area under a precision-recall curve given as points in order of decreasing confidence
    (recall non-decreasing). Precision at recall r is the best precision at any recall >= r."""
    recall = np.asarray(recall, np.float64)
    envelope = np.maximum.accumulate(np.asarray(precision, np.float64)[::-1])[::-1]
    if method == "101":
        levels = np.linspace(0, 1, 101)
        idx = np.searchsorted(recall, levels, side="left")  # first point reaching each level
        reached = idx < len(recall)
        return float(np.sum(envelope[idx[reached]]) / len(levels))
    if method == "continuous":
        r = np.concatenate([[0.0], recall])
        return float(np.sum((r[1:] - r[:-1]) * envelope))
    raise ValueError(f"AP method {method!r} is not '101' or 'continuous'")


@dataclass
class DetectionStats:
    """Accumulates detections and ground truth image by image; :meth:`summary` gives the
    numbers. ``method`` is the AP interpolation ('101' or 'continuous')."""

    nc: int
    method: str = "101"
    _scores: List[np.ndarray] = field(default_factory=list)
    _classes: List[np.ndarray] = field(default_factory=list)
    _tp: List[np.ndarray] = field(default_factory=list)  # (n, 10) bool per IoU threshold
    _gt_count: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self._gt_count = np.zeros(self.nc, np.int64)

    def add(self, det: np.ndarray, gt: np.ndarray) -> None:
        """``det`` (n, 6) rows x1, y1, x2, y2, conf, class; ``gt`` (m, 5) rows class, x1, y1, x2,
        y2 (the scene truth layout), both in the same pixel coordinates."""
        det = np.asarray(det, np.float64).reshape(-1, 6)
        gt = np.asarray(gt, np.float64).reshape(-1, 5)
        for c in gt[:, 0].astype(int):
            if not 0 <= c < self.nc:
                raise ValueError(f"ground-truth class {c} is outside 0..{self.nc - 1}")
            self._gt_count[c] += 1
        tp = np.zeros((len(det), len(IOU_THRESHOLDS)), bool)
        for c in np.unique(det[:, 5]).astype(int):
            di = np.nonzero(det[:, 5] == c)[0]
            di = di[np.argsort(-det[di, 4], kind="stable")]
            g = gt[gt[:, 0] == c, 1:]
            if not len(g):
                continue
            iou = box_iou(det[di, :4], g)  # (nd, ng)
            for k, thr in enumerate(IOU_THRESHOLDS):
                taken = np.zeros(len(g), bool)
                for row, d in enumerate(di):
                    cand = np.where(taken, -1.0, iou[row])
                    best = int(np.argmax(cand))
                    if cand[best] >= thr:
                        taken[best] = True
                        tp[d, k] = True
        self._scores.append(det[:, 4])
        self._classes.append(det[:, 5].astype(int))
        self._tp.append(tp)

    def ap(self) -> np.ndarray:
        """(nc, 10) AP per class and IoU threshold; NaN for classes without ground truth."""
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        classes = np.concatenate(self._classes) if self._classes else np.zeros(0, int)
        tp = np.concatenate(self._tp) if self._tp else np.zeros((0, len(IOU_THRESHOLDS)), bool)
        out = np.full((self.nc, len(IOU_THRESHOLDS)), np.nan)
        for c in range(self.nc):
            n_gt = int(self._gt_count[c])
            if n_gt == 0:
                continue
            sel = np.nonzero(classes == c)[0]
            sel = sel[np.argsort(-scores[sel], kind="stable")]
            hits = tp[sel].astype(np.float64)  # (nd, 10)
            ctp = np.cumsum(hits, 0)
            cfp = np.cumsum(1.0 - hits, 0)
            for k in range(len(IOU_THRESHOLDS)):
                recall = ctp[:, k] / n_gt
                precision = ctp[:, k] / np.maximum(ctp[:, k] + cfp[:, k], 1e-12)
                out[c, k] = average_precision(recall, precision, self.method)
        return out

    def summary(self, names: Sequence[str]) -> Dict[str, object]:
        """mAP@0.5, mAP@0.5:0.95, per-class AP@0.5 and ground-truth counts."""
        ap = self.ap()
        valid = ~np.isnan(ap[:, 0])
        return {
            "mAP50": float(np.mean(ap[valid, 0])) if valid.any() else 0.0,
            "mAP50_95": float(np.mean(ap[valid])) if valid.any() else 0.0,
            "per_class_AP50": {names[c]: (None if np.isnan(ap[c, 0]) else round(float(ap[c, 0]), 4))
                               for c in range(self.nc)},
            "ground_truth": {names[c]: int(self._gt_count[c]) for c in range(self.nc)},
            "interpolation": self.method,
        }
