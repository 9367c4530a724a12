"""Detection accuracy: mAP at IoU 0.5 and 0.5:0.95, box agreement, and the low-precision gate.

Matching follows COCO: per image and class, detections in descending confidence each take the
unmatched ground-truth box of highest IoU at or above the threshold (else they are false
positives). AP is the area under the precision-recall curve with precision made monotone
(the running maximum from the right), sampled at 101 recall points 0, 0.01, ..., 1 (COCO's
interpolation) or integrated continuously (every recall step; VOC 2010+). mAP averages AP over
the classes that have ground truth; mAP@0.5:0.95 also averages over the ten IoU thresholds
0.50, 0.55, ..., 0.95.

The accuracy gate (:func:`gate`) decides whether a lower precision (bf16, a quantized int8
model) may replace fp32: for the demo model on its generated scenes (:mod:`edgepipe.scenes`
knows their truth) its mAP@0.5 must be within 0.01 of fp32's; for any other model, on frames
without labels, its boxes must agree with fp32's (:func:`agreement`: each box matched by one of
the same class with IoU >= 0.5; F1 of the two sets at least 0.9) over at least
:data:`MIN_GATE_BOXES` fp32 boxes: a model that finds nothing on the gate frames (an untrained
one) cannot be checked, and so keeps fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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


# ------------------------------------------------------------------------------ the accuracy gate

MAP_TOLERANCE = 0.01  # largest mAP@0.5 drop a low precision may cost on the demo scenes
MIN_AGREEMENT = 0.9  # smallest box agreement (F1 against fp32) on a user's frames
MIN_GATE_BOXES = 10  # fp32 boxes needed before agreement means anything
GATE_SEED = 20_251_127  # scenes no training or evaluation run draws (tools/ use 0-99999)


def agreement(ref: Sequence[np.ndarray], test: Sequence[np.ndarray], iou: float = 0.5) -> Dict[str, Any]:
    """How far ``test``'s detections agree with ``ref``'s, image by image ((n, 6) rows x1, y1,
    x2, y2, conf, class): greedy matching in ``ref``'s confidence order, same class, IoU >=
    ``iou``. Returns ``matched``, ``ref_boxes``, ``test_boxes`` and ``f1`` (1.0 when both are
    empty)."""
    matched = n_ref = n_test = 0
    for r, t in zip(ref, test):
        r = np.asarray(r, np.float64).reshape(-1, 6)
        t = np.asarray(t, np.float64).reshape(-1, 6)
        n_ref += len(r)
        n_test += len(t)
        if not len(r) or not len(t):
            continue
        overlap = box_iou(r[:, :4], t[:, :4])
        overlap[r[:, 5][:, None] != t[:, 5][None, :]] = 0.0
        taken = np.zeros(len(t), bool)
        for i in np.argsort(-r[:, 4], kind="stable"):
            cand = np.where(taken, -1.0, overlap[i])
            j = int(np.argmax(cand))
            if cand[j] >= iou:
                taken[j] = True
                matched += 1
    total = n_ref + n_test
    return {"matched": matched, "ref_boxes": n_ref, "test_boxes": n_test,
            "f1": 1.0 if total == 0 else round(2.0 * matched / total, 4)}


def gate_scenes(imgsz: Tuple[int, int], n: int = 16, seed: int = GATE_SEED) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """``n`` generated gray scenes of ``imgsz`` (h, w) and their truth (class, x1, y1, x2, y2):
    held out from every training and evaluation run (their seed is not one of theirs)."""
    from edgepipe.scenes import render_scene

    rng = np.random.default_rng(seed)
    h, w = imgsz
    lo = max(8.0, min(h, w) / 40)
    pairs = [render_scene(rng, w, h, size_range=(lo, min(h, w) / 3)) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@dataclass
class GateResult:
    """One decision of the accuracy gate: ``metric`` ('mAP@0.5' or 'agreement'), fp32's and the
    low precision's value, whether it passed, and on what."""

    precision: str
    metric: str
    reference: float
    value: float
    passed: bool
    images: int
    boxes: int
    note: str = ""

    def describe(self) -> str:
        if self.note:
            return f"{self.precision} {self.note} ({self.images} images)"
        if self.metric == "mAP@0.5":
            text = (f"{self.precision} mAP@0.5 {self.value:.3f} vs fp32 {self.reference:.3f} on {self.images} "
                    f"held-out scenes (allowed drop {MAP_TOLERANCE})")
        else:
            text = (f"{self.precision} boxes agree with fp32: {100 * self.value:.1f}% (F1 over {self.boxes} fp32 "
                    f"boxes on {self.images} frames; needed {100 * MIN_AGREEMENT:.0f}%)")
        return text

    def to_json(self) -> Dict[str, Any]:
        return {"precision": self.precision, "metric": self.metric, "reference": round(self.reference, 4),
                "value": round(self.value, 4), "passed": self.passed, "images": self.images,
                "boxes": self.boxes, "note": self.note}


Detect = Callable[[List[np.ndarray]], List[np.ndarray]]


def gate(precision: str, ref: Detect, test: Detect, images: Sequence[np.ndarray],
         truths: Optional[Sequence[np.ndarray]] = None, nc: int = 0) -> GateResult:
    """The accuracy gate: ``ref`` (fp32) and ``test`` (the low precision) each map a list of
    images to detections per image in their pixels (a :class:`~edgepipe.yolo.detector.Detector`
    does). With ``truths`` (scenes of the demo classes; ``nc`` classes) mAP@0.5, else box
    agreement (module docstring)."""
    images = list(images)
    got_ref, got_test = ref(images), test(images)
    boxes = int(sum(len(d) for d in got_ref))
    if truths is not None:
        maps = []
        for dets in (got_ref, got_test):
            stats = DetectionStats(nc)
            for d, t in zip(dets, truths):
                stats.add(d, t)
            maps.append(float(stats.summary([str(i) for i in range(nc)])["mAP50"]))  # type: ignore[arg-type]
        return GateResult(precision, "mAP@0.5", maps[0], maps[1], maps[0] - maps[1] <= MAP_TOLERANCE,
                          len(images), boxes)
    agree = agreement(got_ref, got_test)
    if boxes < MIN_GATE_BOXES:
        return GateResult(precision, "agreement", 1.0, agree["f1"], False, len(images), boxes,
                          f"not checked: fp32 finds only {boxes} boxes on the gate images (at least {MIN_GATE_BOXES} needed)")
    return GateResult(precision, "agreement", 1.0, agree["f1"], agree["f1"] >= MIN_AGREEMENT, len(images), boxes)


IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")


def read_images(folder: str, limit: Optional[int] = None) -> List[np.ndarray]:
    """The images of ``folder`` (sorted by name, at most ``limit``) as gray uint8 arrays;
    ValueError (one line) when it holds none that OpenCV reads."""
    import os

    import cv2

    try:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    except OSError as exc:
        raise ValueError(f"cannot list {folder!r}: {exc.strerror or exc}") from None
    out: List[np.ndarray] = []
    for name in names:
        if limit is not None and len(out) >= limit:
            break
        img = cv2.imread(os.path.join(folder, name), cv2.IMREAD_GRAYSCALE)
        if img is not None:
            out.append(img)
    if not out:
        raise ValueError(f"no images in {folder!r} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return out
