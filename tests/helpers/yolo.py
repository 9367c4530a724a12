"""Helpers for the model tests: randomised-but-sane weights, gray inputs, relative error."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch

from edgepipe.yolo.model import Model


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest elementwise relative error (every YOLOv5 output is a positive quantity)."""
    return ((out - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()


def randomize(model: Model, seed: int = 0) -> Model:
    """Random weights and BatchNorm statistics, exactly representable in fp16.

    Convolution weights are scaled by their fan-in so activations stay O(1): a saturated model
    would hide errors in sigmoids pinned at 0 and 1.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or name.endswith("anchors"):
                continue
            u = torch.rand(t.shape, generator=g)
            if name.endswith(("running_var", "bn.weight")):
                v = u + 0.5
            elif t.dim() == 4:
                v = (u - 0.5) * 2 * (3 / t[0].numel()) ** 0.5
            else:
                v = (u - 0.5) * 0.2
            t.copy_(v.half().float())
    return model


def gray_batch(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """(b, 1, h, w) uniform [0, 1) from a fixed seed."""
    return torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(seed))


def detector_info(stage: Any) -> Dict[str, str]:
    """The labels of a yolov5 stage's ``edgepipe_detector_info`` (device, precision, backend,
    model), as ``/metrics`` shows them."""
    series = stage.metrics.get("edgepipe_detector_info")
    (values,) = series.children  # one label set at a time
    return dict(zip(series.label_names, values))


def gray_images(batch: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(batch, h, w) uint8 noise from a fixed seed: a batch of gray frames as a detector gets them."""
    return np.random.default_rng(seed).integers(0, 256, (batch, h, w), dtype=np.uint8)
