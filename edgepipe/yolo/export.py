"""ONNX export of a 1-channel YOLOv5, checked against torch with onnxruntime when it is installed.

The exported graph takes ``images`` (B, 1, H, W) float in [0, 1] (float16 with ``half``) and
returns ``output0`` (B, N, 5+nc), the same tensor the torch model returns in eval mode; NMS stays
outside the graph. The check against torch uses a tolerance that fits the precision (boxes
relative to their size, scores absolute: :func:`compare_outputs`), and a graph that fails it is
not written. It uses torch's TorchScript-based exporter (``dynamo=False`` where torch has
the newer one), which needs no extra packages and works from torch 2.0 on. Class names, strides
and the input size go into the ONNX metadata (when the ``onnx`` package is present).
"""

from __future__ import annotations

import inspect
import io
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from edgepipe.yolo.builtin import PREFIX as BUILTIN_PREFIX
from edgepipe.yolo.model import Model
from edgepipe.yolo.weights import PathLike, WeightsError, load_model, resolve_device

DEFAULT_OPSET = 17  # the highest opset torch 2.0's exporter writes
MIN_OPSET = 12


class ExportError(ValueError):
    """An export that cannot be done or whose result does not match torch; one line."""


def parse_imgsz(value: Union[int, str, Sequence[int]]) -> Tuple[int, int]:
    """(h, w) from 640, "640", "384,640", "384x640" or (384, 640); each a positive multiple of 32."""
    if isinstance(value, int):
        dims = [value]
    elif isinstance(value, str):
        parts = value.lower().replace("x", ",").split(",")
        try:
            dims = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise ExportError(f"image size {value!r} is not a number or H,W pair") from None
    else:
        dims = [int(v) for v in value]
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or any(d <= 0 or d % 32 for d in dims):
        raise ExportError(f"image size {value!r}: expected one or two positive multiples of 32")
    return dims[0], dims[1]


def _export_kwargs() -> Dict[str, Any]:
    # torch >= 2.5 has the dynamo exporter (default from 2.9, needing onnxscript); torch 2.0 has
    # no such argument.
    params = inspect.signature(torch.onnx.export).parameters
    return {"dynamo": False} if "dynamo" in params else {}


# Tolerances per precision: boxes (pixels) relative to their value, scores (in [0, 1]) absolute.
# fp16 keeps 11 significant bits: a box edge near 640 px moves in steps of 0.5 px (0.08%), and
# rounding through the network's layers adds a few steps; fp32 differs only in summation order.
TOLERANCE = {"fp16": (5e-3, 1e-2), "fp32": (1e-4, 1e-4)}


def compare_outputs(got: Any, ref: Any, precision: str) -> Dict[str, Any]:
    """How far ``got`` is from ``ref`` ((B, N, 5+nc) arrays), judged by ``precision``'s
    tolerance: ``box_px`` (largest box difference in pixels), ``box_rel`` (largest difference
    relative to the value, at least 1 px), ``score`` (largest score difference), the allowed
    ``box_rel_tol`` and ``score_tol``, and ``ok``."""
    import numpy as np

    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    diff = np.abs(got - ref)
    box_rel_tol, score_tol = TOLERANCE[precision]
    box_rel = float((diff[..., :4] / np.maximum(np.abs(ref[..., :4]), 1.0)).max()) if diff.size else 0.0
    score = float(diff[..., 4:].max()) if diff.size else 0.0
    return {"precision": precision, "box_px": float(diff[..., :4].max()) if diff.size else 0.0,
            "box_rel": box_rel, "score": score, "box_rel_tol": box_rel_tol, "score_tol": score_tol,
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "ok": bool(box_rel <= box_rel_tol and score <= score_tol)}


def describe_parity(p: Dict[str, Any]) -> str:
    """One readable clause for :func:`compare_outputs`'s result."""
    return (f"boxes differ by at most {p['box_px']:.3g} px ({100 * p['box_rel']:.3g}% of the value; "
            f"allowed {100 * p['box_rel_tol']:.3g}%), scores by at most {p['score']:.3g} (allowed {p['score_tol']:g})")


def onnx_parity(onnx_bytes: bytes, model: Model, x: torch.Tensor) -> Optional[Dict[str, Any]]:
    """onnxruntime against torch on ``x`` (:func:`compare_outputs`, judged by the model's
    precision), or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": x.cpu().numpy()})
    with torch.no_grad():
        ref = model(x)
    precision = "fp16" if x.dtype == torch.float16 else "fp32"
    return compare_outputs(out, ref.float().cpu().numpy(), precision)


def _add_metadata(onnx_bytes: bytes, meta: Dict[str, str]) -> bytes:
    try:
        import onnx
    except ImportError:
        return onnx_bytes
    proto = onnx.load_from_string(onnx_bytes)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def export_onnx(weights: Union[PathLike, Model], output: Optional[PathLike] = None,
                imgsz: Union[int, str, Sequence[int]] = 640, half: bool = False, dynamic: bool = False,
                opset: int = DEFAULT_OPSET, device: str = "auto", check: bool = True) -> Dict[str, Any]:
    """Export ``weights`` (a path or a Model) to ONNX; returns what was written.

    ``half`` exports float16 (torch must support half convolutions on ``device``: CUDA, or a
    recent torch on the CPU). ``dynamic`` makes batch, height and width free. With ``check``,
    onnxruntime (if installed) runs the graph on a random input and the result must match torch
    within the precision's tolerance (:func:`compare_outputs`), else nothing is written. The
    returned dict has ``path``, ``input_shape``, ``dtype``, ``opset``, ``dynamic``,
    ``max_abs_diff`` and ``parity`` (both None when onnxruntime is missing). The file is usable as
    ``weights:`` and by ``edgepipe detect``: class names, strides, input size, the architecture
    and the precision are in its metadata.
    """
    h, w = parse_imgsz(imgsz)
    if not MIN_OPSET <= opset <= 20:
        raise ExportError(f"opset {opset} is out of range (use {MIN_OPSET}-20; {DEFAULT_OPSET} works with torch 2.0)")
    dev = resolve_device(device)
    if isinstance(weights, Model):
        model = weights.eval()
        source = "model"
    else:
        model = load_model(weights, device=dev, fuse=True, half=half)
        source = str(weights)
    if output is None:
        if isinstance(weights, Model):
            raise ExportError("an output path is needed when exporting a model object")
        name = str(weights)
        output = Path(name[len(BUILTIN_PREFIX):] + ".onnx") if name.startswith(BUILTIN_PREFIX) else Path(weights).with_suffix(".onnx")
    dtype = torch.float16 if half else torch.float32
    model = model.to(dev).to(dtype)
    ch = int(model.yaml.get("ch", 1))
    x = torch.rand(1, ch, h, w, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    with torch.no_grad():
        model(x)  # a dry run: shapes fit, kernels exist for this dtype on this device
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
            # The TorchScript exporter takes file objects too.
            torch.onnx.export(
                model, (x,), buf, opset_version=opset, input_names=["images"], output_names=["output0"],  # type: ignore[arg-type]
                dynamic_axes=axes if dynamic else None, do_constant_folding=True, **_export_kwargs())
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed: {first}") from None
    meta = {
        "producer": "edgepipe",
        "format": "edgepipe.yolov5",
        "names": json.dumps(list(model.names)),
        "stride": json.dumps([int(s) for s in model.stride]),
        "imgsz": json.dumps([h, w]),
        "source": source,
        "nc": str(model.nc),
        "ch": str(ch),
        "arch": json.dumps(model.yaml, default=str),
        "precision": "fp16" if half else "fp32",
        "dynamic": "true" if dynamic else "false",
    }
    data = _add_metadata(buf.getvalue(), meta)
    parity = None
    if check:
        # A second input shape when dynamic, to prove the free axes really are free.
        probe = x if not dynamic else torch.rand(2, ch, h + 32, w + 32).to(dev, dtype)
        parity = onnx_parity(data, model, probe)
        if parity is not None and not parity["ok"]:
            raise ExportError(f"onnxruntime output does not match torch within {parity['precision']} tolerance: "
                              f"{describe_parity(parity)}; nothing written")
    out = Path(output)
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror}") from None
    return {"path": str(out), "input_shape": [1 if not dynamic else "batch", ch, h, w],
            "dtype": str(dtype).replace("torch.", ""), "opset": opset, "dynamic": dynamic,
            "max_abs_diff": None if parity is None else parity["max_abs_diff"], "parity": parity}


__all__ = ["ExportError", "compare_outputs", "describe_parity", "export_onnx", "onnx_parity", "parse_imgsz",
           "WeightsError"]
