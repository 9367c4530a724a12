"""The YOLOv5 training loss: target assignment, CIoU box loss, objectness and class BCE.

Written from the published description of YOLOv5's loss (no code from the reference):

- Assignment: a target goes to every anchor of a level whose width and height ratios to the
  anchor are all within ``anchor_t`` (4.0), in the cell holding its centre and in the two
  neighbouring cells whose shared edges its centre is nearest to (the decoded centre
  ``2*sigmoid - 0.5`` spans -0.5..1.5 cells, so a neighbour can reach it).
- Box: 1 - CIoU between the decoded prediction and the target, averaged over assignments.
- Objectness: BCE against the (detached, clamped at 0) IoU of each assigned prediction, 0
  elsewhere; levels weighted 4.0 / 1.0 / 0.4 (P3 / P4 / P5).
- Class: BCE against one-hot targets on the assigned predictions.
- Gains: box 0.05, obj 1.0 x (imgsz / 640)^2, cls 0.5 x nc / 80 (each x 3 / nl); the total is
  multiplied by the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn

# Neighbour cells: centre, then left, up, right, down (as offsets subtracted from the centre).
_OFFSETS = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5], [-0.5, 0.0], [0.0, -0.5]])


@dataclass
class LevelTargets:
    """Assignments on one level: indices into (B, na, ny, nx), the target box relative to its
    cell (x, y offset in cells, w, h in cells), the matched anchors (cells) and class ids."""

    image: torch.Tensor  # (n,) long
    anchor: torch.Tensor  # (n,) long
    gy: torch.Tensor  # (n,) long
    gx: torch.Tensor  # (n,) long
    box: torch.Tensor  # (n, 4)
    anchors: torch.Tensor  # (n, 2)
    cls: torch.Tensor  # (n,) long


def build_targets(
    targets: torch.Tensor,
    anchors: torch.Tensor,
    strides: Sequence[float],
    shapes: Sequence[Tuple[int, int]],
    anchor_t: float = 4.0,
) -> List[LevelTargets]:
    """Assign ``targets`` (n, 6) rows ``[image, class, cx, cy, w, h]`` in input pixels to the
    levels. ``anchors`` is (nl, na, 2) in grid units (pixels / stride), ``shapes`` the (ny, nx)
    of each level's grid."""
    out = []
    offsets = _OFFSETS.to(targets.device)
    for i, (stride, (ny, nx)) in enumerate(zip(strides, shapes)):
        anc = anchors[i]  # (na, 2)
        t = targets[:, 2:6] / stride  # (n, 4) in cells
        ratio = t[None, :, 2:4] / anc[:, None, :]  # (na, n, 2)
        fit = torch.max(ratio, 1.0 / ratio).max(2).values < anchor_t  # (na, n)
        a_idx, t_idx = fit.nonzero(as_tuple=True)
        gxy = t[t_idx, 0:2]
        gwh = t[t_idx, 2:4]
        frac = gxy % 1.0
        inv = torch.tensor([nx, ny], dtype=gxy.dtype, device=gxy.device) - gxy
        low = (frac < 0.5) & (gxy > 1.0)  # nearer the left / top edge: that neighbour too
        high = ((inv % 1.0) < 0.5) & (inv > 1.0)  # nearer the right / bottom edge
        use = torch.stack([torch.ones_like(low[:, 0]), low[:, 0], low[:, 1], high[:, 0], high[:, 1]])
        sel = use.nonzero(as_tuple=False)  # (m, 2): which offset, which assignment
        k, j = sel[:, 0], sel[:, 1]
        cxy = gxy[j] - offsets[k]
        cell = cxy.long()
        gx = cell[:, 0].clamp(0, nx - 1)
        gy = cell[:, 1].clamp(0, ny - 1)
        rel = gxy[j] - torch.stack([gx, gy], 1).to(gxy.dtype)
        out.append(LevelTargets(
            image=targets[t_idx[j], 0].long(),
            anchor=a_idx[j],
            gy=gy,
            gx=gx,
            box=torch.cat([rel, gwh[j]], 1),
            anchors=anc[a_idx[j]],
            cls=targets[t_idx[j], 1].long(),
        ))
    return out


def bbox_ciou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of boxes (n, 4) cx, cy, w, h against (n, 4): IoU minus the normalised centre
    distance and the aspect-ratio consistency term (Zheng et al., 2020)."""
    b1x1, b1x2 = b1[:, 0] - b1[:, 2] / 2, b1[:, 0] + b1[:, 2] / 2
    b1y1, b1y2 = b1[:, 1] - b1[:, 3] / 2, b1[:, 1] + b1[:, 3] / 2
    b2x1, b2x2 = b2[:, 0] - b2[:, 2] / 2, b2[:, 0] + b2[:, 2] / 2
    b2y1, b2y2 = b2[:, 1] - b2[:, 3] / 2, b2[:, 1] + b2[:, 3] / 2
    w1, h1 = b1[:, 2], b1[:, 3] + eps
    w2, h2 = b2[:, 2], b2[:, 3] + eps
    inter = (torch.min(b1x2, b2x2) - torch.max(b1x1, b2x1)).clamp(0) * \
        (torch.min(b1y2, b2y2) - torch.max(b1y1, b2y1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1x2, b2x2) - torch.min(b1x1, b2x1)
    ch = torch.max(b1y2, b2y2) - torch.min(b1y1, b2y1)
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = (b2[:, 0] - b1[:, 0]) ** 2 + (b2[:, 1] - b1[:, 1]) ** 2
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class YoloLoss:
    """Callable ``loss(preds, targets) -> (total, parts)`` for a model's training output
    ``preds`` (list of (B, na, ny, nx, 5+nc) raw tensors) and targets (n, 6)
    ``[image, class, cx, cy, w, h]`` in input pixels. ``parts`` is a detached (3,) tensor of the
    box, objectness and class terms (before the batch-size factor)."""

    balance = (4.0, 1.0, 0.4)

    def __init__(self, anchors: torch.Tensor, strides: Sequence[float], nc: int, imgsz: int,
                 anchor_t: float = 4.0, box: float = 0.05, obj: float = 1.0, cls: float = 0.5) -> None:
        self.anchors = anchors.detach().float()
        self.strides = [float(s) for s in strides]
        self.nc = nc
        self.anchor_t = anchor_t
        nl = len(self.strides)
        self.box_gain = box * 3 / nl
        self.obj_gain = obj * (imgsz / 640) ** 2 * 3 / nl
        self.cls_gain = cls * nc / 80 * 3 / nl
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, preds: List[torch.Tensor], targets: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        device = preds[0].device
        shapes = [(int(p.shape[2]), int(p.shape[3])) for p in preds]
        assigned = build_targets(targets.to(device), self.anchors.to(device), self.strides, shapes,
                                 self.anchor_t)
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        for p, t, weight in zip(preds, assigned, self.balance):
            p = p.float()
            tobj = torch.zeros(p.shape[:4], device=device)
            if t.image.numel():
                ps = p[t.image, t.anchor, t.gy, t.gx]  # (n, 5+nc)
                pxy = ps[:, 0:2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * t.anchors
                iou = bbox_ciou(torch.cat([pxy, pwh], 1), t.box)
                lbox = lbox + (1.0 - iou).mean()
                score = iou.detach().clamp(0)
                order = score.argsort()  # where cells collide, the best IoU is written last
                tobj[t.image[order], t.anchor[order], t.gy[order], t.gx[order]] = score[order]
                onehot = torch.zeros_like(ps[:, 5:])
                onehot[torch.arange(len(t.cls), device=device), t.cls] = 1.0
                lcls = lcls + self.bce(ps[:, 5:], onehot)
            lobj = lobj + self.bce(p[..., 4], tobj) * weight
        parts = torch.stack([lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain])
        return parts.sum() * preds[0].shape[0], parts.detach()
