"""Inference backends for the detector: torch (CPU or CUDA), onnxruntime and OpenVINO (CPU).

A backend turns a batch of letterboxed uint8 gray images, (B, H, W), into the rows of the
model's eval output whose objectness exceeds a threshold. All take uint8 and normalise where the
model runs (``/255`` on the device for torch, inside the graph for an exported model), and all
filter the candidate rows before anything crosses back to the host, so a 640x640 image returns a
handful of rows, not 25200.

- ``torch``: the fused model, fp32 on the CPU (input buffers reused between calls), fp16 on CUDA
  by default with pinned host buffers, non-blocking copies and CUDA graphs
  (:mod:`edgepipe.yolo.graphs`: one captured graph per input shape, replayed).
- ``onnxruntime``: the same fused model exported in memory at start (TorchScript exporter, dynamic
  batch, height and width, uint8 input), or an ``.onnx`` file written by ``edgepipe export`` or
  ``edgepipe quantize``, run by onnxruntime's CPU provider. On a 2-core x86 CPU it is about twice
  as fast as torch (benchmarks/README.md).
- ``openvino``: the exported model compiled by OpenVINO for ``openvino_device`` (``CPU``, or an
  Intel ``GPU``/``NPU`` where present) with the latency hint, one compiled model per input shape
  (static shapes ran 10% faster than a dynamic one, and a compile takes 0.2 s), fp32 or bf16
  (where the CPU has it) or the int8 of a quantized file.
- ``auto``: :func:`create_backend` alone takes onnxruntime for an fp32 CPU model when installed,
  torch otherwise and on CUDA; the detector (:mod:`edgepipe.yolo.detector`) races it at start-up
  against the low precisions that pass the accuracy gate.

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
with ``session.intra_op.allow_spinning = 0``; OpenVINO's threads are not pinned to cores
(``ENABLE_CPU_PINNING`` off), so the scheduler can move them off a core another worker needs.
``threads`` (None: the library's default, one per core) sets the size of the pool.
"""

from __future__ import annotations

import abc
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "OnnxModel",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "TorchBackend",
    "available_backends",
    "cpu_has_bf16",
    "create_backend",
    "onnx_from_model",
    "prepare_process",
    "read_onnx",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
ONNX_OPSET = 17  # the highest opset torch 2.0's exporter writes
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8 is in the graph


class BackendError(RuntimeError):
    """A backend that cannot run here (not installed, wrong device, export failed); one line."""


def prepare_process() -> None:
    """Thread settings for a detector process; call before torch is first imported.

    OpenMP threads that wait passively (sleep) instead of spinning keep their core free for the
    other workers and do not stall when one of them is preempted. An explicit
    ``OMP_WAIT_POLICY`` in the environment wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def onnxruntime_available() -> bool:
    return _installed("onnxruntime")


def openvino_available() -> bool:
    return _installed("openvino")


def available_backends(device_type: str = "cpu") -> List[str]:
    """Backends usable for ``device_type`` ('cpu' or 'cuda') in this environment, fastest first."""
    if device_type == "cuda":
        return ["torch"]
    return (["openvino"] if openvino_available() else []) + (["onnxruntime"] if onnxruntime_available() else []) + ["torch"]


def cpu_has_bf16(device: str = "CPU") -> bool:
    """Whether OpenVINO runs bf16 natively on ``device`` (AVX512-BF16 or AMX on x86)."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")
    except Exception:  # not installed, or a device OpenVINO does not know
        return False


def _split(pred: Any, keep: Any) -> Tuple[Any, Any]:
    """Rows of (B, N, no) ``pred`` where ``keep`` (B, N) is true, image by image, and the number
    of rows per image. Works on numpy arrays and torch tensors alike."""
    return pred[keep], keep.sum(1)


class Backend(abc.ABC):
    """The detector's forward pass. ``name``, ``device`` (str) and ``precision`` describe it;
    ``max_forward_batch`` (None: any) caps the images per forward pass, larger batches are split
    (see the module docstring); ``fixed_shape`` is the one (H, W) a model exported with a fixed
    input size takes (None: any multiple of the stride)."""

    name = "backend"
    device = "cpu"
    precision = "fp32"
    max_forward_batch: Optional[int] = 1
    fixed_shape: Optional[Tuple[int, int]] = None

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
        return np.ascontiguousarray(rows, np.float32), counts.astype(np.int64)

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device}"


class TorchBackend(Backend):
    """The torch model itself (already fused, in eval, on its device, in its precision).

    Each call's input is copied into a buffer kept from the previous call of the same shape: on
    the CPU the uint8-to-float conversion writes into a reused float buffer; on CUDA the uint8
    batch goes through a pinned host buffer with a non-blocking copy and is normalised on the GPU,
    inside a replayed CUDA graph when ``graphs`` is on (:class:`~edgepipe.yolo.graphs.GraphCache`;
    ``graph_pad``, ``max_graphs``, ``graph_runtime`` are its options and its CUDA seam). Calls are
    sequential (the worker's one thread), and each ends by copying its result to the host, which
    waits for the GPU, so a buffer is never overwritten while a copy reads it.
    """

    name = "torch"

    def __init__(self, model: Any, threads: Optional[int] = None, graphs: bool = False,
                 graph_pad: str = "pad", max_graphs: int = 6, graph_runtime: Any = None,
                 logger: Optional[logging.Logger] = None) -> None:
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
        self.channels_last = False
        if threads:
            torch.set_num_threads(threads)
        self._buffers: Dict[Tuple[int, ...], Any] = {}  # input shape -> staging buffer
        self.graphs: Any = None
        if graphs:
            from edgepipe.yolo.graphs import CudaGraphRuntime, GraphCache

            runtime = graph_runtime or CudaGraphRuntime()
            self.graphs = GraphCache(
                self._normalised_forward, lambda key: torch.empty(key, dtype=torch.uint8, device=self._device),
                runtime, self._device, max_graphs=max_graphs, pad=graph_pad,
                half=self.precision == "fp16", logger=logger,
            )

    def use_channels_last(self, on: bool = True) -> None:
        """Weights in channels-last memory order (faster for large batches on some GPUs); the
        captured graphs are dropped, being recorded for the other layout."""
        torch = self._torch
        self.model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        self.channels_last = on
        if self.graphs is not None:
            self.graphs.graphs.clear()

    def _normalised_forward(self, x: Any) -> Any:
        """uint8 (B, H, W) on the device -> the model's output (B, N, 5+nc)."""
        torch = self._torch
        y = (x.to(self._dtype) / 255.0).unsqueeze(1)
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        return self.model(y)

    def _host(self, batch: np.ndarray) -> Any:
        """The pinned host copy of a uint8 batch (one shape at a time: pinned memory is scarce)."""
        torch = self._torch
        shape = tuple(batch.shape)
        buf = self._buffers.get(shape)
        if buf is None:
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            self._buffers = {shape: buf}
        buf.numpy()[...] = batch
        return buf

    def _input(self, batch: np.ndarray) -> Any:
        """(B, 1, H, W) model input on the device, in [0, 1], in the model's dtype."""
        torch = self._torch
        if self.cuda:
            x = self._host(batch).to(self._device, non_blocking=True)
            return (x.to(self._dtype) / 255.0).unsqueeze(1)
        shape = tuple(batch.shape)
        buf = self._buffers.get(shape)
        if buf is None:
            buf = torch.empty(shape, dtype=self._dtype)
            if len(self._buffers) >= 4:  # a few letterbox shapes at most; forget the oldest
                self._buffers.pop(next(iter(self._buffers)))
            self._buffers[shape] = buf
        torch.div(torch.from_numpy(batch), 255.0, out=buf)
        return buf.unsqueeze(1)

    def _pred(self, batch: np.ndarray) -> Any:
        if self.graphs is not None and self.graphs.enabled:
            return self.graphs(self._host(batch))
        x = self._input(batch)
        if self.channels_last:
            x = x.contiguous(memory_format=self._torch.channels_last)
        return self.model(x)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self._pred(batch).float().cpu().numpy()

    def _candidates(self, batch: np.ndarray, conf_thres: float) -> Tuple[np.ndarray, np.ndarray]:
        # Filtered where the model ran: only the kept rows travel back from a GPU.
        with self._torch.inference_mode():
            pred = self._pred(batch)  # (B, N, 5+nc)
            rows, counts = _split(pred, pred[..., 4] > conf_thres)
            return rows.float().cpu().numpy(), counts.cpu().numpy().astype(np.int64)

    def check_graphs(self, batch: np.ndarray) -> bool:
        """Capture the graph of ``batch``'s shape and compare it with the eager forward (the
        start-up parity check); False when graphs are off or were turned off by the check."""
        if self.graphs is None:
            return False
        with self._torch.inference_mode():
            return self.graphs.check(self._host(batch))


# ---------------------------------------------------------------------------------------- ONNX


@dataclass
class OnnxModel:
    """An ONNX graph for the onnxruntime and OpenVINO backends.

    ``input_dtype`` is 'uint8' for the graphs exported here (normalisation inside) and 'float32'
    or 'float16' for ``edgepipe export``'s ((B, 1, H, W) in [0, 1]); ``fixed`` is (B, H, W) when
    the input shape is fixed; ``precision`` is 'fp32', 'fp16' or 'int8' (a quantized graph);
    ``meta`` the file's metadata (class names, strides, the accuracy gate of a quantized model).
    """

    data: bytes
    input_dtype: str = "uint8"
    fixed: Optional[Tuple[int, int, int]] = None
    precision: str = "fp32"
    meta: Dict[str, str] = field(default_factory=dict)
    label: str = "model"

    def feed(self, batch: np.ndarray) -> np.ndarray:
        """The graph's input for a uint8 (B, H, W) batch."""
        if self.input_dtype == "uint8":
            return np.ascontiguousarray(batch, np.uint8)
        dtype = np.float16 if self.input_dtype == "float16" else np.float32
        return (batch[:, None].astype(np.float32) / np.float32(255.0)).astype(dtype, copy=False)

    @property
    def shape(self) -> Optional[Tuple[int, int]]:
        return None if self.fixed is None else (self.fixed[1], self.fixed[2])


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


def onnx_from_model(model: Any, imgsz: Tuple[int, int]) -> OnnxModel:
    """The fused fp32 CPU torch ``model`` exported in memory with a uint8 input (see above)."""
    if not _cpu_fp32(model):
        raise BackendError("the ONNX backends run an fp32 model on the CPU (device: cpu, half: false)")
    return OnnxModel(export_uint8_onnx(model, imgsz))


def read_onnx(path: str) -> OnnxModel:
    """An ``.onnx`` file as written by ``edgepipe export`` or ``edgepipe quantize``: its input
    kind and shape and its metadata; BackendError (one line) when it is not such a model."""
    try:
        import onnx
    except ImportError:
        raise BackendError(f"{path} is an ONNX model: running it needs onnxruntime or OpenVINO "
                           "(pip install 'edgepipe[onnxruntime]' or 'edgepipe[openvino]')") from None
    try:
        data = open(path, "rb").read()
        proto = onnx.load_from_string(data)
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # protobuf's decode errors
        raise BackendError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    graph_inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(graph_inputs) != 1:
        raise BackendError(f"{path} has {len(graph_inputs)} inputs; a YOLOv5 export has one ('images')")
    tensor = graph_inputs[0].type.tensor_type
    kinds = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    if tensor.elem_type not in kinds:
        raise BackendError(f"{path}: input type {tensor.elem_type} is not uint8, float32 or float16")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    kind = kinds[tensor.elem_type]
    spatial = dims[-2:]
    if (kind == "uint8" and len(dims) != 3) or (kind != "uint8" and (len(dims) != 4 or dims[1] not in (1, None))):
        raise BackendError(f"{path}: input shape {dims} is not (B, 1, H, W) gray (or (B, H, W) uint8)")
    meta = {p.key: p.value for p in proto.metadata_props}
    fixed = None
    if all(d is not None for d in spatial):
        fixed = (int(dims[0] or 1), int(spatial[0]), int(spatial[1]))  # type: ignore[arg-type]
    precision = meta.get("precision") or ("fp16" if kind == "float16" else "fp32")
    return OnnxModel(data, kind, fixed, precision, meta, os.path.basename(path))


class OnnxRuntimeBackend(Backend):
    """onnxruntime's CPU provider on an exported model (see module doc)."""

    name = "onnxruntime"

    def __init__(self, model: Any, imgsz: Optional[Tuple[int, int]] = None, threads: Optional[int] = None,
                 spin: bool = False) -> None:
        """``model``: a fused fp32 CPU torch model (exported here) or an :class:`OnnxModel`;
        ``spin``: let idle workers spin (onnxruntime's own default; benchmarks compare it)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "backend 'onnxruntime' needs the onnxruntime package (pip install 'edgepipe[onnxruntime]')"
            ) from None
        if not isinstance(model, OnnxModel):
            if not _cpu_fp32(model):
                raise BackendError("backend 'onnxruntime' runs an fp32 model on the CPU (device: cpu, half: false)")
            model = onnx_from_model(model, imgsz or (640, 640))
        self.onnx = model
        self.precision = model.precision
        self.fixed_shape = model.shape
        self.max_forward_batch = 1  # one image per pass on the CPU (module doc), and fixed exports
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: one per physical core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Waiting workers sleep instead of spinning: the other processes need the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(model.data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types vary across versions
            raise BackendError(f"onnxruntime cannot load the exported model: {exc}") from None
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name
        self.version = ort.__version__

    def forward(self, batch: np.ndarray) -> np.ndarray:
        (pred,) = self.session.run([self._output], {self._input: self.onnx.feed(batch)})
        return np.asarray(pred, np.float32)


class OpenVinoBackend(Backend):
    """OpenVINO on an exported model: one compiled model per input shape (static shapes are
    faster than a dynamic one), the latency hint, ``precision`` fp32 or bf16 as the inference
    precision hint (an int8 graph carries its own), threads not pinned to cores."""

    name = "openvino"

    def __init__(self, model: OnnxModel, device: str = "CPU", precision: Optional[str] = None,
                 threads: Optional[int] = None, max_shapes: int = 4) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendError("backend 'openvino' needs the openvino package (pip install 'edgepipe[openvino]')") from None
        self._ov = ov
        self.core = ov.Core()
        if device.split(".")[0] not in ("AUTO",) and device not in self.core.available_devices:
            raise BackendError(f"OpenVINO device {device!r} is not present here (present: {', '.join(self.core.available_devices)})")
        self.onnx = model
        # The CPU is the CPU whichever engine runs on it; an Intel GPU/NPU is OpenVINO's own.
        self.device = "cpu" if device == "CPU" else f"openvino:{device}"
        self.ov_device = device
        self.precision = model.precision if model.precision in ("int8", "fp16") else (precision or "fp32")
        if self.precision == "bf16" and device == "CPU" and not cpu_has_bf16(device):
            raise BackendError("precision bf16 needs a CPU with AVX512-BF16 or AMX (this one has neither)")
        self.fixed_shape = model.shape
        self.max_forward_batch = 1
        self.max_shapes = max_shapes
        self.threads = threads
        try:
            self._model = self.core.read_model(model.data)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise BackendError(f"OpenVINO cannot read the model: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from None
        self._compiled: Dict[Tuple[int, ...], Any] = {}  # input shape -> infer request
        self.version = ov.get_version() if hasattr(ov, "get_version") else ov.__version__

    def _config(self) -> Dict[str, Any]:
        config: Dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.ov_device.startswith("CPU"):
            config["INFERENCE_PRECISION_HINT"] = _OV_PRECISION[self.precision]
            config["ENABLE_CPU_PINNING"] = False
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = int(self.threads)
        return config

    def compile(self, shape: Tuple[int, ...]) -> Any:
        """The infer request for input ``shape`` (compiled on first use; a few shapes kept)."""
        request = self._compiled.get(shape)
        if request is not None:
            return request
        if len(self._compiled) >= self.max_shapes:
            self._compiled.pop(next(iter(self._compiled)))
        model = self._model.clone()
        model.reshape({model.inputs[0].get_any_name(): list(shape)})
        try:
            compiled = self.core.compile_model(model, self.ov_device, self._config())
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BackendError(f"OpenVINO cannot compile the model for {self.ov_device} at {list(shape)}: {first}") from None
        request = compiled.create_infer_request()
        self._compiled[shape] = request
        return request

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """The output as a view of the request's buffer (overwritten by its next call)."""
        x = self.onnx.feed(batch)
        request = self.compile(tuple(x.shape))
        request.infer({0: x})
        return np.asarray(request.get_output_tensor(0).data, np.float32)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self._infer(batch).copy()

    def _candidates(self, batch: np.ndarray, conf_thres: float) -> Tuple[np.ndarray, np.ndarray]:
        pred = self._infer(batch)  # the mask copies the few rows kept out of the buffer
        rows, counts = _split(pred, pred[..., 4] > conf_thres)
        return np.ascontiguousarray(rows, np.float32), counts.astype(np.int64)


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
    precision: Optional[str] = None,
    openvino_device: str = "CPU",
    **torch_options: Any,
) -> Backend:
    """The backend ``name`` ('auto', 'torch', 'onnxruntime' or 'openvino') for ``model``: a
    torch model (fused, eval, on its device and in its precision) or an :class:`OnnxModel`.
    ``imgsz`` (h, w) is the shape the export traces with; ``precision`` ('fp32' or 'bf16') is
    OpenVINO's; ``torch_options`` go to :class:`TorchBackend` (CUDA graphs).

    'auto' picks onnxruntime for an fp32 CPU model when it is installed and falls back to torch
    (logging the reason) when it cannot be used; torch otherwise; for an ONNX model onnxruntime,
    else OpenVINO. An explicitly named backend that cannot run raises :class:`BackendError`.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    logger = logger or log
    if isinstance(model, OnnxModel):
        if name == "torch":
            raise BackendError(f"{model.label} is an ONNX model: backend torch cannot run it (use onnxruntime, openvino or auto)")
        if name == "auto":
            name = "onnxruntime" if onnxruntime_available() or not openvino_available() else "openvino"
    if name == "torch":
        return TorchBackend(model, threads, logger=logger, **torch_options)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(model, imgsz, threads)
    if name == "openvino":
        if not openvino_available():
            raise BackendError("backend 'openvino' needs the openvino package (pip install 'edgepipe[openvino]')")
        onnx_model = model if isinstance(model, OnnxModel) else onnx_from_model(model, imgsz)
        return OpenVinoBackend(onnx_model, openvino_device, precision, threads)
    if _cpu_fp32(model) and onnxruntime_available():
        try:
            return OnnxRuntimeBackend(model, imgsz, threads)
        except BackendError as exc:
            logger.warning("Backend onnxruntime unusable, using torch: %s", exc)
    return TorchBackend(model, threads, logger=logger, **torch_options)
