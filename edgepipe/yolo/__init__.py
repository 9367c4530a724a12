"""YOLOv5 with one input channel: model, weights, letterbox, NMS, box scaling.

The public names follow the reference implementation's argument names and semantics. They are
imported lazily so that ``from edgepipe.yolo import letterbox`` does not import torch (only the
inference stage should pay for it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "edgepipe.yolo.model",
    "Detector": "edgepipe.yolo.detector",
    "DetectorError": "edgepipe.yolo.detector",
    "Model": "edgepipe.yolo.model",
    "load_model": "edgepipe.yolo.weights",
    "save_model": "edgepipe.yolo.weights",
    "letterbox": "edgepipe.yolo.ops",
    "non_max_suppression": "edgepipe.yolo.ops",
    "scale_boxes": "edgepipe.yolo.ops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgepipe.yolo' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
