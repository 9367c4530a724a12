"""ONNX export of a 1-channel YOLOv5, checked against torch with onnxruntime when it is installed.

The exported graph takes ``images`` (B, 1, H, W) float in [0, 1] (float16 with ``half``) and
returns ``output0`` (B, N, 5+nc), the same tensor the torch model returns in eval mode; NMS stays
outside the graph. It uses torch's TorchScript-based exporter (``dynamo=False`` where torch has
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


def _tolerance(reference: torch.Tensor, half: bool) -> float:
    # Absolute, scaled by the largest output (box sizes in pixels dwarf the scores).
    scale = max(1.0, float(reference.abs().max()))
    return (2e-2 if half else 1e-4) * scale


def onnx_parity(onnx_bytes: bytes, model: Model, x: torch.Tensor) -> Optional[float]:
    """Max |onnxruntime - torch| on ``x``, or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": x.cpu().numpy()})
    with torch.no_grad():
        ref = model(x)
    return float((torch.from_numpy(out).float() - ref.float().cpu()).abs().max())


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
    onnxruntime (if installed) runs the graph on a random input and the result must match torch.
    The returned dict has ``path``, ``input_shape``, ``dtype``, ``opset``, ``dynamic`` and
    ``max_abs_diff`` (None when onnxruntime is missing).
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
        output = Path(weights).with_suffix(".onnx")
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
    }
    data = _add_metadata(buf.getvalue(), meta)
    diff = None
    if check:
        # A second input shape when dynamic, to prove the free axes really are free.
        probe = x if not dynamic else torch.rand(2, ch, h + 32, w + 32).to(dev, dtype)
        diff = onnx_parity(data, model, probe)
        if diff is not None:
            with torch.no_grad():
                tol = _tolerance(model(probe), half)
            if diff > tol:
                raise ExportError(f"onnxruntime output differs from torch by {diff:.3g} (tolerance {tol:.3g})")
    out = Path(output)
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror}") from None
    return {"path": str(out), "input_shape": [1 if not dynamic else "batch", ch, h, w],
            "dtype": str(dtype).replace("torch.", ""), "opset": opset, "dynamic": dynamic,
            "max_abs_diff": diff}


__all__ = ["ExportError", "export_onnx", "parse_imgsz", "onnx_parity", "WeightsError"]
