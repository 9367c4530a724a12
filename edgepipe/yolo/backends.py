"""Inference backends for the detector: torch (CPU or CUDA) and onnxruntime (CPU).

A backend turns a batch of letterboxed uint8 gray images, (B, H, W), into the rows of the
model's eval output whose objectness exceeds a threshold. Both take uint8 and normalise where the
model runs (``/255`` on the device for torch, inside the graph for onnxruntime), and both filter
the candidate rows before anything crosses back to the host, so a 640x640 image returns a handful
of rows, not 25200.

- ``torch``: the fused model, fp32 on the CPU (input buffers reused between calls), fp16 on CUDA
  by default with pinned host buffers and non-blocking copies.
- ``onnxruntime``: the same fused model exported in memory at start (TorchScript exporter, dynamic
  batch, height and width, uint8 input), run by onnxruntime's CPU provider. On a 2-core x86 CPU it
  is about twice as fast as torch (benchmarks/README.md).
- ``auto`` (the default): onnxruntime on the CPU when it is installed (the optional extra
  ``edgepipe[onnxruntime]``), torch otherwise and on CUDA. When the export fails the detector
  falls back to torch and logs why.

Batches: on a GPU a batch is one forward pass. On the CPU the images of a batch go through the
model one at a time (:attr:`Backend.max_forward_batch` = 1): one image's activations stay in the
caches, a batch's do not. Measured on 2 x86 cores, yolov5s at 640x480 ran 1.2-1.4x faster per
image at batch 1 than at batch 4, and ``edgepipe run`` on a video file went from 0.6x to 1.3x
the bare loop's frame rate when its detector stopped running batches of 8; at 320 pixels a batch
of 4 gained at most 5% with onnxruntime.

Threads: on a small device every worker process shares the same few cores, so the detector's
thread pools must not spin while they wait: spinning OpenMP threads (torch) or onnxruntime
workers that lose their core to another process stall every layer's barrier. Measured on 2 busy
cores, torch with 2 spinning threads ran yolov5n 5-40x slower than with 1; with passive waiting
2 threads beat 1. :func:`prepare_process` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the
environment says otherwise) and must run before torch is imported; onnxruntime sessions are made
with ``session.intra_op.allow_spinning = 0``. ``threads`` (None: the library's default, one per
core) sets the size of the pool.
"""

from __future__ import annotations

import abc
import io
import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "OnnxRuntimeBackend",
    "TorchBackend",
    "available_backends",
    "create_backend",
    "prepare_process",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
ONNX_OPSET = 17  # the highest opset torch 2.0's exporter writes


class BackendError(RuntimeError):
    """A backend that cannot run here (not installed, wrong device, export failed); one line."""


def prepare_process() -> None:
    """Thread settings for a detector process; call before torch is first imported.

    OpenMP threads that wait passively (sleep) instead of spinning keep their core free for the
    other workers and do not stall when one of them is preempted. An explicit
    ``OMP_WAIT_POLICY`` in the environment wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device_type: str = "cpu") -> List[str]:
    """Backends usable for ``device_type`` ('cpu' or 'cuda') in this environment, fastest first."""
    if device_type == "cuda":
        return ["torch"]
    return (["onnxruntime"] if onnxruntime_available() else []) + ["torch"]


def _split(pred: Any, keep: Any) -> Tuple[Any, Any]:
    """Rows of (B, N, no) ``pred`` where ``keep`` (B, N) is true, image by image, and the number
    of rows per image. Works on numpy arrays and torch tensors alike."""
    return pred[keep], keep.sum(1)


class Backend(abc.ABC):
    """The detector's forward pass. ``name``, ``device`` (str) and ``precision`` describe it;
    ``max_forward_batch`` (None: any) caps the images per forward pass, larger batches are split
    (see the module docstring)."""

    name = "backend"
    device = "cpu"
    precision = "fp32"
    max_forward_batch: Optional[int] = 1

    @abc.abstractmethod
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W) -> float32 (B, N, 5+nc): the model's full eval output."""

    def candidates(self, batch: np.ndarray, conf_thres: float) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W) -> (rows (k, 5+nc) float32 with objectness > conf_thres, image by
        image; rows per image (B,) int64)."""
        parts = [self._candidates(chunk, conf_thres) for chunk in self._chunks(batch)]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _chunks(self, batch: np.ndarray) -> List[np.ndarray]:
        step = self.max_forward_batch or len(batch)
        return [batch[i : i + step] for i in range(0, len(batch), step)]

    def _candidates(self, batch: np.ndarray, conf_thres: float) -> Tuple[np.ndarray, np.ndarray]:
        pred = self.forward(batch)
        rows, counts = _split(pred, pred[..., 4] > conf_thres)
        return rows, counts.astype(np.int64)

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device}"


class TorchBackend(Backend):
    """The torch model itself (already fused, in eval, on its device, in its precision).

    Each call's input is copied into a buffer kept from the previous call of the same shape: on
    the CPU the uint8-to-float conversion writes into a reused float buffer; on CUDA the uint8
    batch goes through a pinned host buffer with a non-blocking copy and is normalised on the GPU.
    Calls are sequential (the worker's one thread), and each ends by copying its result to the
    host, which waits for the GPU, so a buffer is never overwritten while a copy reads it.
    """

    name = "torch"

    def __init__(self, model: Any, threads: Optional[int] = None) -> None:
        import torch

        self._torch = torch
        self.model = model
        param = next(model.parameters())
        self._device = param.device
        self._dtype = param.dtype
        self.device = str(self._device)
        self.precision = "fp16" if self._dtype == torch.float16 else "fp32"
        self.cuda = self._device.type == "cuda"
        self.max_forward_batch = None if self.cuda else 1
        if threads:
            torch.set_num_threads(threads)
        self._buffers: Dict[Tuple[int, ...], Any] = {}  # input shape -> staging buffer

    def _input(self, batch: np.ndarray) -> Any:
        """(B, 1, H, W) model input on the device, in [0, 1], in the model's dtype."""
        torch = self._torch
        shape = tuple(batch.shape)
        buf = self._buffers.get(shape)
        if self.cuda:
            if buf is None:
                buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
                self._buffers = {shape: buf}  # one shape at a time: pinned memory is scarce
            buf.numpy()[...] = batch
            x = buf.to(self._device, non_blocking=True)
            return (x.to(self._dtype) / 255.0).unsqueeze(1)
        if buf is None:
            buf = torch.empty(shape, dtype=self._dtype)
            if len(self._buffers) >= 4:  # a few letterbox shapes at most; forget the oldest
                self._buffers.pop(next(iter(self._buffers)))
            self._buffers[shape] = buf
        torch.div(torch.from_numpy(batch), 255.0, out=buf)
        return buf.unsqueeze(1)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(self._input(batch)).float().cpu().numpy()

    def _candidates(self, batch: np.ndarray, conf_thres: float) -> Tuple[np.ndarray, np.ndarray]:
        # Filtered where the model ran: only the kept rows travel back from a GPU.
        with self._torch.inference_mode():
            pred = self.model(self._input(batch))  # (B, N, 5+nc)
            rows, counts = _split(pred, pred[..., 4] > conf_thres)
            return rows.float().cpu().numpy(), counts.cpu().numpy().astype(np.int64)


def _uint8_input(model: Any) -> Any:
    """``model`` behind a uint8 (B, H, W) input that it normalises itself: the graph exported
    for onnxruntime takes the letterboxed frames as they are."""
    from torch import nn

    class Uint8Input(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: Any) -> Any:  # (B, H, W) uint8
            return self.inner(images.unsqueeze(1).float() / 255.0)  # (B, N, 5+nc)

    return Uint8Input(model).eval()


def export_uint8_onnx(model: Any, imgsz: Tuple[int, int], opset: int = ONNX_OPSET) -> bytes:
    """The fused fp32 CPU ``model`` as ONNX bytes with a uint8 (batch, height, width) input
    ``images`` and output ``output0`` (batch, N, 5+nc); BackendError if the export fails."""
    import torch

    from edgepipe.yolo.export import _export_kwargs

    wrapped = _uint8_input(model)
    probe = torch.zeros((1, *imgsz), dtype=torch.uint8)
    axes = {"images": {0: "batch", 1: "height", 2: "width"}, "output0": {0: "batch", 1: "anchors"}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
            torch.onnx.export(
                wrapped, (probe,), buf, opset_version=opset, input_names=["images"],  # type: ignore[arg-type]
                output_names=["output0"], dynamic_axes=axes, do_constant_folding=True,
                **_export_kwargs(),
            )
    except Exception as exc:  # the exporter raises many types; the backend just cannot be used
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackendError(f"ONNX export for onnxruntime failed: {first}") from None
    return buf.getvalue()


class OnnxRuntimeBackend(Backend):
    """onnxruntime's CPU provider on the model exported with a uint8 input (see module doc)."""

    name = "onnxruntime"

    def __init__(self, model: Any, imgsz: Tuple[int, int], threads: Optional[int] = None,
                 spin: bool = False) -> None:
        """``spin``: let idle workers spin (onnxruntime's own default; benchmarks compare it)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "backend 'onnxruntime' needs the onnxruntime package (pip install 'edgepipe[onnxruntime]')"
            ) from None
        if not _cpu_fp32(model):
            raise BackendError("backend 'onnxruntime' runs an fp32 model on the CPU (device: cpu, half: false)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: one per physical core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Waiting workers sleep instead of spinning: the other processes need the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        data = export_uint8_onnx(model, imgsz)
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types vary across versions
            raise BackendError(f"onnxruntime cannot load the exported model: {exc}") from None
        self.version = ort.__version__

    def forward(self, batch: np.ndarray) -> np.ndarray:
        (pred,) = self.session.run(["output0"], {"images": np.ascontiguousarray(batch, np.uint8)})
        return pred


def _cpu_fp32(model: Any) -> bool:
    import torch

    param = next(model.parameters())
    return param.device.type == "cpu" and param.dtype == torch.float32


def create_backend(
    name: str,
    model: Any,
    imgsz: Tuple[int, int],
    threads: Optional[int] = None,
    logger: Optional[logging.Logger] = None,
) -> Backend:
    """The backend ``name`` ('auto', 'torch' or 'onnxruntime') for ``model`` (fused, eval, on
    its device and in its precision). ``imgsz`` (h, w) is the shape the export traces with.

    'auto' picks onnxruntime for an fp32 CPU model when it is installed and falls back to torch
    (logging the reason) when it cannot be used; torch otherwise. An explicitly named backend
    that cannot run raises :class:`BackendError`.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    logger = logger or log
    if name == "torch":
        return TorchBackend(model, threads)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(model, imgsz, threads)
    if _cpu_fp32(model) and onnxruntime_available():
        try:
            return OnnxRuntimeBackend(model, imgsz, threads)
        except BackendError as exc:
            logger.warning("Backend onnxruntime unusable, using torch: %s", exc)
    return TorchBackend(model, threads)
