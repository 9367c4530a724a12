"""Pre- and post-processing around the detector: letterbox, non-maximum suppression, box scaling.

These follow the reference YOLOv5 semantics exactly (same geometry, same thresholds, same order of
results) but are written from that description, not from its code. Everything here runs on numpy
so that the letterbox and NMS stages work without importing torch; torch tensors are accepted too
(torch is imported lazily, only when the caller hands us a tensor, i.e. already has torch loaded).

NMS is an exact greedy NMS grouped per class, vectorised with numpy: within a group of boxes in
descending confidence order, the "suppressed by a kept, higher-scored box with IoU > iou_thres"
relation is a fixed point that we reach by iterating boolean matrix steps (each step settles at
least one more box, usually all of them in a handful of steps), so there is no Python loop per box.
The IoU arithmetic (float32, boxes offset by ``class * 7680``, union as ``(a1 + a2) - inter``,
strict ``>`` against the threshold in double precision) is that of torchvision's CPU kernel, which
we call instead when torchvision is importable and the caller passed torch tensors: both give the
same boxes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

__all__ = [
    "MAX_NMS",
    "MAX_WH",
    "box_iou_matrix",
    "letterbox",
    "nms_candidates",
    "non_max_suppression",
    "scale_boxes",
    "to_gray",
    "xywh2xyxy",
]

log = logging.getLogger(__name__)

MAX_WH = 7680  # class offset (pixels) that keeps boxes of different classes apart in one NMS
MAX_NMS = 30000  # at most this many boxes (the most confident) go into NMS per image
# NMS rounds: block sizes per group, and the IoU elements one round may compute (memory).
_FIRST_BLOCK, _MIN_BLOCK, _MAX_BLOCK = 32, 8, 1024
_ROUND_ELEMS = 1 << 20

Shape = Union[int, Tuple[int, int], Sequence[int]]


# --------------------------------------------------------------------------------------- letterbox


def to_gray(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W) gray, (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA -> (H, W) gray."""
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
    raise ValueError(f"image of shape {tuple(img.shape)} is neither gray (H, W) nor BGR (H, W, 3)")


def letterbox(
    img: np.ndarray,
    new_shape: Shape = 640,
    color: Union[int, Tuple[int, ...]] = 114,
    auto: bool = True,
    scaleFill: bool = False,  # noqa: N803 - the reference's argument name
    scaleup: bool = True,
    stride: int = 32,
    gray: bool = False,
) -> Tuple[np.ndarray, Tuple[float, float], Tuple[float, float]]:
    """Resize ``img`` keeping its aspect ratio and pad it to ``new_shape``, as YOLOv5 does.

    Returns ``(img, (rw, rh), (dw, dh))``: the letterboxed image, the scale applied on each axis,
    and the padding added on the left and top before rounding (half the total padding; the actual
    left/top borders are ``round(dw - 0.1)``/``round(dh - 0.1)``, right/bottom ``round(dw + 0.1)``/
    ``round(dh + 0.1)``).

    ``new_shape`` is an int (square) or ``(h, w)``. The scale is ``min(new_h / h, new_w / w)``,
    capped at 1 when ``scaleup`` is false. With ``auto`` the padding is reduced modulo ``stride``
    (a minimal rectangle whose sides are multiples of ``stride`` when ``new_shape`` is); otherwise,
    with ``scaleFill``, the image is stretched to ``new_shape`` without padding (``auto`` wins when
    both are set). The resize is bilinear and skipped when the size does not change; the border is
    the constant ``color``. ``img`` is (H, W) gray or (H, W, C); ``gray=True`` converts colour input
    to gray first (BGR channel order).
    """
    if gray:
        img = to_gray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"image of shape {tuple(img.shape)} is not (H, W) or (H, W, C)")
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"image of shape {tuple(img.shape)} is empty")
    if isinstance(new_shape, (int, np.integer)):
        new_h = new_w = int(new_shape)
    else:
        new_h, new_w = (int(v) for v in new_shape)

    r = min(new_h / h, new_w / w)
    if not scaleup:  # only scale down (better mAP on validation in the reference)
        r = min(r, 1.0)
    ratio = (r, r)
    unpad_w, unpad_h = int(round(w * r)), int(round(h * r))
    dw, dh = float(new_w - unpad_w), float(new_h - unpad_h)
    if auto:
        dw, dh = float(np.mod(dw, stride)), float(np.mod(dh, stride))
    elif scaleFill:
        dw, dh = 0.0, 0.0
        unpad_w, unpad_h = new_w, new_h
        ratio = (new_w / w, new_h / h)
    dw /= 2
    dh /= 2

    if (w, h) != (unpad_w, unpad_h):
        img = cv2.resize(img, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    if top or bottom or left or right:
        channels = 1 if img.ndim == 2 else img.shape[2]
        value = _border_value(color, channels)
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)
    return img, ratio, (dw, dh)


def _border_value(color: Union[int, Tuple[int, ...]], channels: int) -> Tuple[float, ...]:
    if isinstance(color, (int, float, np.integer, np.floating)):
        return (float(color),) * max(channels, 1) + (0.0,) * (4 - max(channels, 1))
    values = tuple(float(c) for c in color)
    if channels == 1:
        return (values[0], 0.0, 0.0, 0.0)
    if len(values) < channels:
        raise ValueError(f"border color {color!r} has {len(values)} values for {channels} channels")
    return values[:channels] + (0.0,) * (4 - channels)


# --------------------------------------------------------------------------------------- boxes


def xywh2xyxy(x: Any) -> Any:
    """(..., 4) centre x, centre y, width, height -> x1, y1, x2, y2 (numpy or torch, new array)."""
    y = x.clone() if _is_tensor(x) else np.array(x, copy=True)
    half_w, half_h = x[..., 2] / 2, x[..., 3] / 2
    y[..., 0] = x[..., 0] - half_w
    y[..., 1] = x[..., 1] - half_h
    y[..., 2] = x[..., 0] + half_w
    y[..., 3] = x[..., 1] + half_h
    return y


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (..., m, 4) with every box in ``b`` (..., k, 4) -> (..., m, k).

    float32 arithmetic in the order torchvision's CPU NMS uses, so that thresholding gives the same
    decisions to the last bit. Two empty boxes have IoU NaN (never above a threshold).
    """
    a = a.astype(np.float32, copy=False)
    b = b.astype(np.float32, copy=False)
    # Contiguous coordinate columns broadcast much faster than strided views of (..., 4).
    ax1, ay1, ax2, ay2 = (np.ascontiguousarray(a[..., i])[..., :, None] for i in range(4))
    bx1, by1, bx2, by2 = (np.ascontiguousarray(b[..., i])[..., None, :] for i in range(4))
    area_a = (ax2 - ax1) * (ay2 - ay1)  # (..., m, 1)
    area_b = (bx2 - bx1) * (by2 - by1)  # (..., 1, k)
    zero = np.float32(0)
    inter = np.minimum(ax2, bx2)  # (..., m, k); becomes the width, then the intersection
    inter -= np.maximum(ax1, bx1)
    np.maximum(inter, zero, out=inter)
    ih = np.minimum(ay2, by2)
    ih -= np.maximum(ay1, by1)
    np.maximum(ih, zero, out=ih)
    inter *= ih
    union = np.add(area_a, area_b, out=ih)
    union -= inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(inter, union, out=inter)


# --------------------------------------------------------------------------------------- NMS


def _settle(over: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Greedy NMS decisions for groups of boxes sorted by descending score.

    ``over[..., i, j]`` (only i < j set) says box i would suppress box j; ``alive[..., j]`` says
    box j is still a candidate. Returns the kept mask: j is kept iff alive and no kept i < j
    suppresses it. Iterating that rule from "all alive kept" fixes at least one more box per step
    (box j is settled once every box before it is), and a repeated state is the unique solution.
    """
    keep = alive.copy()
    overf = over.astype(np.float32)
    for _ in range(over.shape[-1] + 1):
        # (..., 1, m) @ (..., m, m): how many kept boxes suppress each box
        hits = np.matmul(keep[..., None, :].astype(np.float32), overf)[..., 0, :]
        new = alive & (hits == 0)
        if np.array_equal(new, keep):
            break
        keep = new
    return keep


def _over(a: np.ndarray, b: np.ndarray, iou_thres: float) -> np.ndarray:
    # Compared in double precision like torchvision's kernel (float32 IoU > double threshold).
    return box_iou_matrix(a, b) > np.float64(iou_thres)


def _greedy_keep(boxes: np.ndarray, groups: np.ndarray, iou_thres: float) -> np.ndarray:
    """Exact greedy NMS, independently within each group.

    ``boxes`` (n, 4) float32 x1y1x2y2 are sorted by descending score; ``groups`` (n,) ints.
    Returns the kept indices, ascending (so in descending score order).

    All groups advance together in rounds over their next block of boxes (blocks grow from 32 as
    long as the IoU tensors stay within ``_ROUND_ELEMS``): first the boxes already kept in a group
    suppress the block's boxes, then the survivors settle among themselves (:func:`_settle`).
    Early kept boxes usually suppress most of the rest, so the work is about n x kept, not n^2.
    """
    n = len(boxes)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return np.flatnonzero(keep)
    order = np.argsort(groups, kind="stable")  # groups contiguous, score order kept inside
    gs = groups[order]
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    sizes = np.diff(np.r_[starts, n])
    done = np.zeros(len(starts), dtype=np.int64)  # boxes of each group already decided
    kept = np.zeros((len(starts), 0, 4), dtype=np.float32)  # kept boxes per group, left-aligned
    n_kept = np.zeros(len(starts), dtype=np.int64)
    block = _FIRST_BLOCK
    while True:
        active = np.flatnonzero(done < sizes)
        if not len(active):
            break
        left = sizes[active] - done[active]
        k_max = int(n_kept[active].max())
        b = min(block, int(left.max()))
        b = max(min(b, _ROUND_ELEMS // (len(active) * max(k_max, b))), min(b, _MIN_BLOCK))
        col = np.arange(b)
        alive = col[None, :] < left[:, None]  # (A, b)
        idx = order[np.minimum((starts[active] + done[active])[:, None] + col[None, :], n - 1)]
        if k_max:
            prior = kept[active, :k_max]  # (A, k, 4)
            prior_ok = np.arange(k_max)[None, :] < n_kept[active][:, None]
            hit = _over(boxes[idx], prior, iou_thres) & prior_ok[:, None, :]  # (A, b, k)
            alive &= ~hit.any(axis=2)
        m = int(alive.sum(axis=1).max())
        if m:
            # Survivors to the front of each row, then settle them among themselves.
            front = np.argsort(~alive, axis=1, kind="stable")[:, :m]
            idx = np.take_along_axis(idx, front, axis=1)
            alive = np.take_along_axis(alive, front, axis=1)
            blk = boxes[idx]  # (A, m, 4)
            over = _over(blk, blk, iou_thres) & _upper(m) & alive[:, None, :]
            won = _settle(over, alive)  # (A, m)
            keep[idx[won]] = True
            n_won = won.sum(axis=1)
            need = int((n_kept[active] + n_won).max())
            if need > kept.shape[1]:
                grown = np.zeros((len(starts), max(need, 2 * kept.shape[1]), 4), dtype=np.float32)
                grown[:, : kept.shape[1]] = kept
                kept = grown
            slot = n_kept[active][:, None] + np.cumsum(won, axis=1) - 1
            rows = np.broadcast_to(active[:, None], won.shape)
            kept[rows[won], slot[won]] = blk[won]
            n_kept[active] += n_won
        done[active] += b
        block = min(2 * block, _MAX_BLOCK)
    return np.flatnonzero(keep)


_UPPER = np.zeros((0, 0), dtype=bool)


def _upper(m: int) -> np.ndarray:
    """(m, m) strictly upper triangular mask: box i can only suppress a later box j > i."""
    global _UPPER
    if _UPPER.shape[0] < m:
        _UPPER = np.triu(np.ones((m, m), dtype=bool), k=1)
    return _UPPER[:m, :m]


_torchvision_nms: Optional[Callable[..., Any]] = None
_torchvision_checked = False


def _load_torchvision_nms() -> Optional[Callable[..., Any]]:
    """torchvision.ops.nms when it imports and works with this torch, else None (checked once)."""
    global _torchvision_nms, _torchvision_checked
    if not _torchvision_checked:
        _torchvision_checked = True
        try:
            import torch
            from torchvision.ops import nms

            nms(torch.zeros((1, 4)), torch.ones(1), 0.5)  # a mismatched build fails here
            _torchvision_nms = nms
        except ImportError:
            pass
        except Exception as exc:  # torchvision built against another torch: use our own NMS
            log.warning("Torchvision NMS unusable (%s), using edgepipe's own NMS", type(exc).__name__)
    return _torchvision_nms


def _torchvision_keep(
    offset_boxes: np.ndarray, iou_thres: float, nms: Callable[..., Any]
) -> np.ndarray:
    """Kept indices from a torchvision-style ``nms(boxes, scores, iou)`` kernel.

    The boxes are already in our (stable) descending-confidence order and offset per class, so the
    kernel gets strictly decreasing rank scores: its own sort then cannot reorder ties differently.
    """
    import torch

    n = len(offset_boxes)
    ranks = torch.arange(n, 0, -1, dtype=torch.float32)
    keep = nms(torch.from_numpy(np.ascontiguousarray(offset_boxes)), ranks, float(iou_thres))
    return np.sort(keep.cpu().numpy().astype(np.int64))


def _check_thresholds(conf_thres: float, iou_thres: float, max_det: int) -> None:
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres={conf_thres!r} is outside [0, 1]")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres={iou_thres!r} is outside [0, 1]")
    if max_det < 0:
        raise ValueError(f"max_det={max_det!r} is negative")


def nms_candidates(
    rows: np.ndarray,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Optional[Sequence[int]] = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
    *,
    _kernel: Optional[Callable[..., Any]] = None,
) -> np.ndarray:
    """NMS over one image's detector rows -> (n, 6) float32 [x1, y1, x2, y2, conf, cls].

    ``rows`` is (k, 5+nc): cx, cy, w, h, objectness, class scores (after sigmoid). It may be any
    subset of the image's rows that holds every row with objectness > ``conf_thres`` (the detector
    stage sends only those). Reference semantics: rows with objectness > conf_thres; conf =
    objectness x class score; the best class (or, with ``multi_label``, every class with conf >
    conf_thres); rows with conf > conf_thres; only ``classes`` if given; the ``MAX_NMS`` most
    confident into NMS, class-aware unless ``agnostic``; kept boxes in descending confidence (ties
    in input order), at most ``max_det``. Computed in float32.
    """
    _check_thresholds(conf_thres, iou_thres, max_det)
    x = np.asarray(rows)
    if x.ndim != 2 or x.shape[1] < 6:
        raise ValueError(f"candidate rows must be (k, 5+nc) with nc >= 1, got {tuple(x.shape)}")
    x = x.astype(np.float32, copy=False)
    x = x[x[:, 4] > conf_thres]
    if not len(x):
        return np.zeros((0, 6), dtype=np.float32)

    scores = x[:, 5:] * x[:, 4:5]  # conf = obj * cls, (k, nc)
    box = xywh2xyxy(x[:, :4])
    if multi_label and scores.shape[1] > 1:
        i, j = np.nonzero(scores > conf_thres)  # row-major: by box, then class
        det = np.concatenate([box[i], scores[i, j, None], j[:, None].astype(np.float32)], axis=1)
    else:
        j = scores.argmax(axis=1)
        conf = scores[np.arange(len(scores)), j]
        det = np.concatenate([box, conf[:, None], j[:, None].astype(np.float32)], axis=1)
        det = det[conf > conf_thres]
    if classes is not None:
        det = det[np.isin(det[:, 5], np.asarray(list(classes), dtype=np.float32))]
    if not len(det):
        return np.zeros((0, 6), dtype=np.float32)

    det = det[np.argsort(-det[:, 4], kind="stable")[:MAX_NMS]]
    offsets = det[:, 5:6] * np.float32(0 if agnostic else MAX_WH)
    offset_boxes = det[:, :4] + offsets
    if _kernel is not None:
        keep = _torchvision_keep(offset_boxes, iou_thres, _kernel)
    else:
        groups = np.zeros(len(det), dtype=np.int64) if agnostic else det[:, 5].astype(np.int64)
        keep = _greedy_keep(offset_boxes, groups, iou_thres)
    return np.ascontiguousarray(det[keep[:max_det]])


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def non_max_suppression(
    prediction: Any,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Optional[Sequence[int]] = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
) -> List[Any]:
    """Per-image NMS over the model's eval output (B, N, 5+nc) -> list of (n, 6) per image.

    Each result is [x1, y1, x2, y2, conf, cls] in input pixels, in descending confidence; see
    :func:`nms_candidates` for the semantics. A numpy ``prediction`` gives float32 numpy arrays
    (no torch import); a torch tensor gives tensors of its dtype on its device. The candidate
    filter runs where the tensor is; the rest on the CPU, through torchvision's kernel when it is
    importable (same results).
    """
    _check_thresholds(conf_thres, iou_thres, max_det)
    tensor = _is_tensor(prediction)
    pred = prediction.detach() if tensor else np.asarray(prediction)
    if pred.ndim != 3 or pred.shape[2] < 6:
        raise ValueError(f"prediction must be (B, N, 5+nc) with nc >= 1, got {tuple(pred.shape)}")
    kernel = _load_torchvision_nms() if tensor else None
    out = []
    for x in pred:
        if tensor:
            # The same float32 comparison as nms_candidates, on the tensor's device.
            x = x[x[:, 4].float() > conf_thres].float().cpu().numpy()
        det = nms_candidates(
            x, conf_thres, iou_thres, classes, agnostic, multi_label, max_det, _kernel=kernel
        )
        if tensor:
            det = sys.modules["torch"].from_numpy(det).to(pred.device, dtype=pred.dtype)
        out.append(det)
    return out


# --------------------------------------------------------------------------------------- scaling


def scale_boxes(
    img1_shape: Sequence[int],
    boxes: Any,
    img0_shape: Sequence[int],
    ratio_pad: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
) -> Any:
    """Map boxes (..., 4+) x1y1x2y2 from letterboxed ``img1_shape`` (h, w) to ``img0_shape``.

    Modifies ``boxes`` in place (numpy array or torch tensor) and returns it, clipped to the
    original image. Without ``ratio_pad`` the gain and padding are recomputed from the shapes
    (``gain = min(h1/h0, w1/w0)``, ``pad = ((w1 - w0*gain)/2, (h1 - h0*gain)/2)``, unrounded);
    with ``ratio_pad = ((rw, rh), (dw, dh))`` from :func:`letterbox` the recorded ``rw`` and pad
    are used.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad_w = (img1_shape[1] - img0_shape[1] * gain) / 2
        pad_h = (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain = ratio_pad[0][0]
        pad_w, pad_h = ratio_pad[1][0], ratio_pad[1][1]
    boxes[..., 0] -= pad_w
    boxes[..., 2] -= pad_w
    boxes[..., 1] -= pad_h
    boxes[..., 3] -= pad_h
    boxes[..., :4] /= gain
    return clip_boxes(boxes, img0_shape)


def clip_boxes(boxes: Any, shape: Sequence[int]) -> Any:
    """Clip x1y1x2y2 boxes (..., 4+) in place to an image of ``shape`` (h, w); returns them."""
    h, w = shape[0], shape[1]
    if _is_tensor(boxes):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = np.clip(boxes[..., [0, 2]], 0, w)
        boxes[..., [1, 3]] = np.clip(boxes[..., [1, 3]], 0, h)
    return boxes
