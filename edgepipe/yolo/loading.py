"""How :meth:`Detector.load <edgepipe.yolo.detector.Detector.load>` makes a detector: the model
(torch weights, an untrained ``cfg``, or an ONNX file), the device, and the backend and precision,
raced at start-up when ``backend`` is auto (see :mod:`edgepipe.yolo.detector`).

Everything slow happens here, before the detector is handed back (and so before a stage reports
ready): the ONNX export, OpenVINO's compile, the accuracy gate, the race, the CUDA graph captures
and their parity check, and the warm-up passes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgepipe.yolo.backends import (
    Backend,
    BackendError,
    OnnxModel,
    OnnxRuntimeBackend,
    OpenVinoBackend,
    TorchBackend,
    cpu_has_bf16,
    onnx_from_model,
    onnxruntime_available,
    openvino_available,
    read_onnx,
)
from edgepipe.yolo.detector import PRECISIONS, Choice, Detector, DetectorError, _median_ms, is_onnx

__all__ = ["load_for_detector"]

RACE_REPEATS = 5


def _fail(exc: BaseException) -> DetectorError:
    return DetectorError((str(exc).strip().splitlines() or [type(exc).__name__])[0])


def _torch_model(weights: Optional[str], path: Any, cfg: Optional[str], seed: int, device: str,
                 half: Optional[bool], precision: Optional[str]) -> Tuple[Any, str, bool]:
    """(model fused in eval on its device and precision, label, on CUDA)."""
    import torch

    from edgepipe.yolo.model import ConfigError, build_model
    from edgepipe.yolo.weights import WeightsError, load_model, resolve_device

    try:
        dev = resolve_device(device)
    except WeightsError as exc:
        raise _fail(exc) from None
    cuda = dev.type == "cuda"
    if precision in ("bf16", "int8") and cuda:
        raise DetectorError(f"precision {precision} runs on the CPU (OpenVINO or a quantized model); on CUDA use fp16 or fp32")
    if precision == "fp16" and half is False or precision == "fp32" and half:
        raise DetectorError(f"half: {str(half).lower()} contradicts precision: {precision}")
    if half is None:
        half = precision == "fp16" or (cuda and precision is None)
    if half and not cuda:
        raise DetectorError("half: true needs a CUDA device; fp16 on the CPU is slower than fp32 and not supported")
    try:
        if weights is not None:
            try:
                model = load_model(path, device=dev, fuse=True, half=half, cfg=cfg)
            except (WeightsError, OSError) as exc:
                text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise DetectorError(f"cannot load weights {weights!r}: {text}") from None
            return model, os.path.basename(str(weights)), cuda
        if cfg is None:
            raise DetectorError("no model: give weights (or cfg for an untrained model)")
        torch.manual_seed(seed)  # the same untrained model every time
        model = build_model(cfg, ch=1).fuse().eval().to(dev)
    except (WeightsError, ConfigError) as exc:
        raise _fail(exc) from None
    if half:
        model = model.half()
    return model.requires_grad_(False), f"{cfg} (untrained, seed {seed})", cuda


def _onnx_names(onnx: OnnxModel, label: str) -> Tuple[List[str], int]:
    try:
        names = json.loads(onnx.meta["names"])
        stride = int(max(json.loads(onnx.meta.get("stride", "[32]"))))
    except (KeyError, ValueError, TypeError):
        raise DetectorError(f"{label} has no class names in its metadata: write it with `edgepipe export` "
                            "or `edgepipe quantize`") from None
    return [str(n) for n in names], stride


class _Selector:
    """The candidates of one load, their gate and race (module docstring)."""

    def __init__(self, cls: Any, names: List[str], stride: int, imgsz: Tuple[int, int], label: str,
                 threads: Optional[int], openvino_device: str, gate_images: Optional[Sequence[np.ndarray]],
                 logger: logging.Logger, options: Dict[str, Any]) -> None:
        self.cls, self.names, self.stride, self.imgsz, self.label = cls, names, stride, imgsz, label
        self.threads, self.openvino_device, self.gate_images = threads, openvino_device, gate_images
        self.log, self.options = logger, options
        self.gates: List[str] = []

    def detector(self, backend: Backend, model: Any = None, choice: Optional[Choice] = None,
                 **override: float) -> Detector:
        options = dict(self.options, **override)
        return self.cls(backend, self.names, self.stride, self.imgsz, self.label, model=model, choice=choice, **options)

    def gate(self, precision: str, ref: Backend, test: Backend) -> Tuple[bool, bool]:
        """(passed, verifiable) for ``test`` against the fp32 ``ref``, the decision recorded."""
        from edgepipe.scenes import CLASSES
        from edgepipe.yolo.evaluation import gate, gate_scenes

        if self.gate_images is not None:
            images, truths = list(self.gate_images), None
        else:
            images, truths = gate_scenes(self.imgsz)
            if tuple(self.names) != tuple(CLASSES):
                truths = None  # scenes are only pictures to a model of other classes
        nms: Dict[str, float] = {"conf_thres": 0.001, "iou_thres": 0.6} if truths is not None else {}
        result = gate(precision, self.detector(ref, None, None, **nms), self.detector(test, None, None, **nms),
                      images, truths, len(self.names))
        verdict = "passed" if result.passed else "could not check" if result.note else "failed"
        self.gates.append(f"{precision} gate {verdict}: {result.describe()}")
        return result.passed, not result.note

    def race(self, candidates: Dict[str, Backend], reason: Dict[str, str], model: Any) -> Detector:
        """The fastest candidate on the warm-up input (a letterboxed scene)."""
        from edgepipe.yolo.evaluation import gate_scenes

        if not candidates:
            raise DetectorError("no backend and precision left to run (see the gate lines above)")
        warm = gate_scenes(self.imgsz, n=1)[0][0][None]  # (1, H, W): an image, not zeros
        ms: Dict[str, float] = {}
        for backend in candidates.values():
            for _ in range(2):
                backend.candidates(warm, 0.25)
        if len(candidates) > 1:
            times: Dict[str, List[float]] = {k: [] for k in candidates}
            for _ in range(RACE_REPEATS):  # alternating, so a neighbour's load hits all alike
                for k, b in candidates.items():
                    times[k].append(_median_ms(lambda b=b: b.candidates(warm, 0.25), 1))
            ms = {k: round(float(np.median(v)), 2) for k, v in times.items()}
            best = min(ms, key=lambda k: ms[k])
        else:
            best = next(iter(candidates))
        b = candidates[best]
        for shape in _camera_shapes(self.imgsz, self.stride) if b.fixed_shape is None else []:
            b.candidates(np.full((1, *shape), 114, np.uint8), 0.25)  # compiled and allocated now, not on frame 1
        choice = Choice(b.describe(), b.precision, reason.get(best, ""), ms, list(self.gates))
        return self.detector(b, model=model, choice=choice)


def _camera_shapes(imgsz: Tuple[int, int], stride: int) -> List[Tuple[int, int]]:
    """The shapes the letterbox stage (minimal padding) makes of 16:9 and 4:3 camera frames at
    ``imgsz``: a new shape costs OpenVINO a compile and any engine its first allocations, which
    belong before the worker reports ready, not on the first frame."""
    from edgepipe.yolo.ops import letterbox

    shapes = []
    for w, h in ((1280, 720), (640, 480)):
        shape = letterbox(np.zeros((h, w), np.uint8), imgsz, stride=stride, auto=True)[0].shape
        if shape != tuple(imgsz) and shape not in shapes:
            shapes.append((int(shape[0]), int(shape[1])))
    return shapes


def load_for_detector(cls: Any, weights: Optional[str], *, cfg: Optional[str], seed: int, device: str,
                      half: Optional[bool], precision: Optional[str], backend: str, imgsz: Tuple[int, int],
                      threads: Optional[int], openvino_device: str, cuda_graphs: bool, graph_pad: str,
                      max_graphs: int, channels_last: bool, gate_images: Optional[Sequence[np.ndarray]],
                      logger: logging.Logger, options: Dict[str, Any]) -> Detector:
    if precision is not None and precision not in PRECISIONS:
        raise DetectorError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    path = None
    if weights is not None:
        from edgepipe.yolo.weights import WeightsError, weights_path

        try:
            path = weights_path(weights)
        except WeightsError as exc:
            raise _fail(exc) from None
        if not path.is_file():
            raise DetectorError(f"weights file {weights!r} not found")
        if is_onnx(path):
            return _load_onnx(cls, str(path), str(weights), device, precision, backend, imgsz, threads,
                              openvino_device, gate_images, logger, options)
    model, label, cuda = _torch_model(weights, path, cfg, seed, device, half, precision)
    names = [str(n) for n in model.names]
    stride = int(max(float(s) for s in model.stride)) if hasattr(model, "stride") else 32
    if imgsz[0] % stride or imgsz[1] % stride:
        raise DetectorError(f"imgsz {list(imgsz)} is not a multiple of the model's stride {stride}")
    sel = _Selector(cls, names, stride, imgsz, label, threads, openvino_device, gate_images, logger, options)
    if cuda:
        return _cuda(sel, model, backend, threads, cuda_graphs, graph_pad, max_graphs, channels_last, logger)
    return _cpu(sel, model, backend, precision, imgsz, threads, openvino_device)


def _cuda(sel: _Selector, model: Any, backend: str, threads: Optional[int], graphs: bool, pad: str,
          max_graphs: int, channels_last: bool, logger: logging.Logger) -> Detector:
    if backend not in ("auto", "torch"):
        raise DetectorError(f"backend {backend!r} runs on the CPU; on CUDA the backend is torch (or auto)")
    b = TorchBackend(model, threads, graphs=graphs, graph_pad=pad, max_graphs=max_graphs, logger=logger)
    if channels_last:
        b.use_channels_last()
    from edgepipe.yolo.evaluation import gate_scenes

    batch = int(sel.options.get("max_batch", 8))
    scenes = gate_scenes(sel.imgsz, n=min(batch, 4))[0]  # pictures, not a blank: a fair parity check
    warm = np.stack([scenes[i % len(scenes)] for i in range(batch)])
    reason = f"{b.precision} on CUDA"
    if graphs:
        ok = b.check_graphs(warm)  # captures batch max_batch and compares it with eager
        reason += ", CUDA graphs " + ("on (match eager)" if ok else "off (see above)")
    det = sel.detector(b, model=model, choice=Choice(b.describe(), b.precision, reason))
    det.warmup(batch=1)  # batch 1 too: a lone camera's frames
    det.warmup(batch=batch)
    return det


def _cpu(sel: _Selector, model: Any, backend: str, precision: Optional[str], imgsz: Tuple[int, int],
         threads: Optional[int], ov_device: str) -> Detector:
    if precision == "int8":
        raise DetectorError("precision int8 needs a quantized model: make one with `edgepipe quantize` and give it as weights")
    try:
        if backend == "torch" or backend == "onnxruntime":
            if precision not in (None, "fp32"):
                raise DetectorError(f"backend {backend} runs fp32 on the CPU (precision {precision} runs on OpenVINO)")
            b: Backend = TorchBackend(model, threads) if backend == "torch" else OnnxRuntimeBackend(model, imgsz, threads)
            return sel.race({b.describe(): b}, {b.describe(): "fp32 (backend and precision as configured)"}, model)
        onnx: Optional[OnnxModel] = None
        if onnxruntime_available() or openvino_available():
            onnx = onnx_from_model(model, imgsz)
        fp32: Backend
        if backend == "openvino":
            if onnx is None or not openvino_available():
                raise DetectorError("backend 'openvino' needs the openvino package (pip install 'edgepipe[openvino]')")
            fp32 = OpenVinoBackend(onnx, ov_device, "fp32", threads)
        elif onnx is not None and onnxruntime_available():
            fp32 = OnnxRuntimeBackend(onnx, imgsz, threads)
        else:
            fp32 = TorchBackend(model, threads)
    except BackendError as exc:
        raise _fail(exc) from None
    return _with_low_precision(sel, fp32, onnx, precision, ov_device, threads, model)


def _with_low_precision(sel: _Selector, fp32: Backend, onnx: Optional[OnnxModel], precision: Optional[str],
                        ov_device: str, threads: Optional[int], model: Any) -> Detector:
    """fp32 and, where it may run, bf16 on OpenVINO behind the gate; raced unless pinned."""
    candidates: Dict[str, Backend] = {}
    reason: Dict[str, str] = {}
    bf16_possible = onnx is not None and openvino_available() and (ov_device != "CPU" or cpu_has_bf16(ov_device))
    if precision in (None, "fp32"):
        key = fp32.describe()
        candidates[key] = fp32
        if precision:
            reason[key] = "fp32 (precision: fp32)"
        elif bf16_possible:
            reason[key] = "fp32"
        else:
            needs = "the openvino extra" if not openvino_available() else "a CPU with AVX512-BF16 or AMX"
            reason[key] = f"fp32 (bf16 not tried: it needs {needs})"
    if precision == "bf16" and not bf16_possible:
        raise DetectorError("precision bf16 needs OpenVINO (pip install 'edgepipe[openvino]') on a CPU with AVX512-BF16 or AMX")
    if precision in (None, "bf16") and bf16_possible:
        assert onnx is not None
        try:
            bf16 = OpenVinoBackend(onnx, ov_device, "bf16", threads)
        except BackendError as exc:
            raise _fail(exc) from None
        passed, verifiable = sel.gate("bf16", fp32, bf16)
        if passed or (precision == "bf16" and not verifiable):
            key = bf16.describe()
            candidates[key] = bf16
            reason[key] = "bf16 (" + ("accuracy gate passed" if passed else "asked for; the gate could not check it") + ")"
        elif precision == "bf16":
            raise DetectorError(f"precision bf16 fails the accuracy gate ({sel.gates[-1]}); use precision: fp32")
        elif fp32.describe() in reason:
            reason[fp32.describe()] = "fp32 (bf16 kept out by the accuracy gate)"
    return sel.race(candidates, reason, model)


def _load_onnx(cls: Any, path: str, weights: str, device: str, precision: Optional[str], backend: str,
               imgsz: Tuple[int, int], threads: Optional[int], ov_device: str,
               gate_images: Optional[Sequence[np.ndarray]], logger: logging.Logger,
               options: Dict[str, Any]) -> Detector:
    label = os.path.basename(weights)
    if device not in ("auto", "cpu"):
        raise DetectorError(f"{label} is an ONNX model, run by onnxruntime or OpenVINO here; give the .pt or "
                            "safetensors weights to run on CUDA (device: auto or cpu for this one)")
    if backend == "torch":
        raise DetectorError(f"{label} is an ONNX model: backend torch cannot run it (use onnxruntime, openvino or auto)")
    try:
        onnx = read_onnx(path)
    except BackendError as exc:
        raise _fail(exc) from None
    names, stride = _onnx_names(onnx, label)
    if onnx.shape is not None:
        imgsz = onnx.shape
    sel = _Selector(cls, names, stride, imgsz, label, threads, ov_device, gate_images, logger, options)
    if precision is not None and precision != onnx.precision and not (onnx.precision == "fp32" and precision == "bf16"):
        raise DetectorError(f"{label} is a {onnx.precision} model; precision {precision} cannot run it")
    engines = [backend] if backend != "auto" else [e for e, ok in (("onnxruntime", onnxruntime_available()),
                                                                  ("openvino", openvino_available())) if ok]
    if not engines:
        raise DetectorError(f"{label} is an ONNX model: running it needs onnxruntime or OpenVINO "
                            "(pip install 'edgepipe[onnxruntime]' or 'edgepipe[openvino]')")
    try:
        made = {e: (OnnxRuntimeBackend(onnx, imgsz, threads) if e == "onnxruntime"
                    else OpenVinoBackend(onnx, ov_device, "fp32", threads)) for e in engines}
    except BackendError as exc:
        raise _fail(exc) from None
    if onnx.precision != "int8":
        if onnx.precision == "fp16" or backend == "onnxruntime":
            b = next(iter(made.values()))
            return sel.race({b.describe(): b}, {b.describe(): f"{b.precision} ({label})"}, None)
        # fp32: the first engine is the fp32 default; OpenVINO's bf16 may race it (see above)
        first = next(iter(made.values()))
        return _with_low_precision(sel, first, onnx, precision, ov_device, threads, None)
    gate = json.loads(onnx.meta.get("gate", "{}") or "{}")
    if not gate.get("passed"):
        raise DetectorError(f"{label} is a quantized model the accuracy gate did not accept; make it again with `edgepipe quantize`")
    from edgepipe.yolo.evaluation import GateResult

    described = GateResult(**gate).describe()
    sel.gates.append(f"int8 gate passed when quantized: {described}")
    candidates: Dict[str, Backend] = {b.describe(): b for b in made.values()}
    reason = {k: "int8 (quantized model accepted by the accuracy gate)" for k in candidates}
    return sel.race(candidates, reason, None)
