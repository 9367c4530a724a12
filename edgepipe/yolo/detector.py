"""One detector: load or build the model, pick device, precision and backend, letterbox, forward,
NMS, scale the boxes back to the image.

The ``yolov5`` stage, ``edgepipe detect``, ``tools/evaluate.py`` and the benchmarks all run
YOLOv5 through :class:`Detector`, so a speed-up (CUDA graphs, OpenVINO, low precision) reaches
every one of them, and none of them repeats this logic. Two ways in:

- the batch API, for the stage: :meth:`Detector.candidates` takes a uint8 batch of letterboxed
  gray images (B, H, W) and returns the rows whose objectness passes the threshold (NMS runs in
  the next stage, possibly another process);
- the image API, for everything else: ``detector(images)`` takes images of any size (gray or
  BGR), letterboxes them, runs the model (batches of one shape), applies NMS and returns the
  detections per image, (n, 6) x1, y1, x2, y2, conf, cls in that image's pixels.
  :meth:`Detector.detect` does the same and also says where the time went.

:meth:`Detector.load` reads ``weights`` (any file :mod:`edgepipe.yolo.weights` reads,
``builtin:<name>``, or an ``.onnx`` written by ``edgepipe export`` or ``edgepipe quantize``) or
builds ``cfg`` untrained from ``seed``; resolves the device (:func:`edgepipe.yolo.weights.
resolve_device`, the one place that does); and chooses the backend (:mod:`edgepipe.yolo.backends`).
With ``backend: auto`` on the CPU it races, on the warm-up input, the default fp32 engine
(onnxruntime when installed, else torch) against every lower precision that passed the accuracy
gate (:func:`edgepipe.yolo.evaluation.gate`): bf16 on OpenVINO where the CPU has it, and the
engines that run a quantized int8 file. OpenVINO fp32 does not race: it ran within 15% of
onnxruntime fp32 here, and one fp32 engine keeps start-up short and the choice stable.
:attr:`Detector.choice` says what runs and why.

This module knows nothing of the daemon (no stage, worker or metrics import).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edgepipe.yolo.backends import Backend, BackendError, create_backend
from edgepipe.yolo.ops import letterbox, nms_candidates, scale_boxes, to_gray

__all__ = ["PRECISIONS", "Choice", "Detector", "DetectorError", "is_onnx"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
Size = Union[int, Sequence[int]]


class DetectorError(ValueError):
    """A detector that cannot be made as asked (weights, device, precision, backend); one line."""


@dataclass
class Choice:
    """What runs and why: the backend's description, the precision's reason, the start-up race
    (candidate -> median ms on the warm-up input) and the gate decisions."""

    backend: str
    precision: str
    reason: str = ""
    race_ms: Dict[str, float] = field(default_factory=dict)
    gates: List[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [self.reason] if self.reason else []
        if len(self.race_ms) > 1:
            parts.append("raced " + ", ".join(f"{k} {v:.1f} ms" for k, v in self.race_ms.items()))
        return "; ".join(parts + self.gates)


def _pair(imgsz: Size) -> Tuple[int, int]:
    if isinstance(imgsz, (int, np.integer)):
        return int(imgsz), int(imgsz)
    dims = [int(v) for v in imgsz]
    return (dims[0], dims[0]) if len(dims) == 1 else (dims[0], dims[1])


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


class Detector:
    """YOLOv5 behind one call (see the module docstring).

    ``names``, ``stride``, ``imgsz`` (h, w), ``label`` (what was loaded), ``backend``
    (:class:`~edgepipe.yolo.backends.Backend`), ``device`` and ``precision`` describe it;
    ``conf_thres``, ``iou_thres``, ``classes``, ``agnostic``, ``multi_label``, ``max_det`` are NMS's;
    ``auto`` letterboxes with minimal stride padding (else to exactly ``imgsz``); ``max_batch``
    bounds a forward pass of the image API. ``model`` is the torch model when there is one.
    """

    def __init__(self, backend: Backend, names: Sequence[str], stride: int = 32, imgsz: Size = 640,
                 label: str = "model", *, conf_thres: float = 0.25, iou_thres: float = 0.45,
                 classes: Optional[Sequence[int]] = None, agnostic: bool = False,
                 multi_label: bool = False, max_det: int = 300, auto: bool = True, max_batch: int = 8,
                 model: Any = None, choice: Optional[Choice] = None) -> None:
        self.backend = backend
        self.names = [str(n) for n in names]
        self.stride = int(stride)
        self.imgsz = backend.fixed_shape or _pair(imgsz)
        if self.imgsz[0] % self.stride or self.imgsz[1] % self.stride:
            raise DetectorError(f"imgsz {list(self.imgsz)} is not a multiple of the model's stride {self.stride}")
        self.label = label
        self.conf_thres, self.iou_thres, self.max_det = conf_thres, iou_thres, max_det
        self.classes = None if classes is None else list(classes)
        self.agnostic, self.multi_label = agnostic, multi_label
        self.auto = auto and backend.fixed_shape is None  # a fixed-size export takes exactly imgsz
        self.max_batch = max_batch
        self.model = model
        self.choice = choice or Choice(backend.describe(), backend.precision)

    # ------------------------------------------------------------------------------ describing

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def precision(self) -> str:
        return self.backend.precision

    def describe(self) -> str:
        """One line: model, backend, precision, device, classes, input size."""
        return (f"{self.label!r} on {self.device} ({self.precision}, backend {self.backend.name}, "
                f"{self.nc} classes, input {self.imgsz[1]}x{self.imgsz[0]})")

    # ------------------------------------------------------------------------------ batch API

    def candidates(self, batch: np.ndarray, conf_thres: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W) letterboxed gray -> (rows (k, 5+nc) float32 whose objectness passes
        ``conf_thres`` (default: the detector's), image by image; rows per image (B,))."""
        fixed = self.backend.fixed_shape
        if fixed is not None and tuple(batch.shape[1:]) != tuple(fixed):
            raise ValueError(f"the model takes exactly {fixed[1]}x{fixed[0]} input (exported with a fixed size), "
                             f"got {batch.shape[2]}x{batch.shape[1]}: letterbox with auto: false and imgsz "
                             f"{list(fixed)}, or export with --dynamic")
        return self.backend.candidates(batch, self.conf_thres if conf_thres is None else conf_thres)

    def warmup(self, shape: Optional[Tuple[int, int]] = None, batch: int = 1, passes: int = 2) -> None:
        """Run ``passes`` forward passes on a blank batch: kernels chosen, memory allocated,
        shapes compiled, before the first real frame."""
        h, w = shape or self.imgsz
        blank = np.full((batch, h, w), 114, np.uint8)
        for _ in range(passes):
            self.candidates(blank)

    # ------------------------------------------------------------------------------ image API

    def letterbox(self, image: np.ndarray) -> Tuple[np.ndarray, Tuple[float, float], Tuple[float, float]]:
        """(letterboxed uint8 gray (H, W), ratio, pad) of a gray or BGR image."""
        return letterbox(to_gray(image), self.imgsz, auto=self.auto, stride=self.stride)

    def nms(self, rows: np.ndarray) -> np.ndarray:
        """One image's candidate rows -> (n, 6) detections in letterboxed pixels."""
        return nms_candidates(rows, self.conf_thres, self.iou_thres, self.classes, self.agnostic,
                              self.multi_label, self.max_det)

    def detect(self, images: Sequence[np.ndarray]) -> Tuple[List[np.ndarray], Dict[str, float]]:
        """Detections per image ((n, 6) float32 in the image's pixels) and the seconds spent in
        ``letterbox``, ``inference`` and ``nms`` (with the boxes' scaling) over all of them."""
        t0 = time.perf_counter()
        prepared = [self.letterbox(img) for img in images]
        t1 = time.perf_counter()
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, (lb, _, _) in enumerate(prepared):
            groups.setdefault(lb.shape, []).append(i)
        rows: List[np.ndarray] = [np.zeros((0, 5 + self.nc), np.float32)] * len(prepared)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start : start + self.max_batch]
                found, counts = self.candidates(np.stack([prepared[i][0] for i in chunk]))
                offsets = np.concatenate([[0], np.cumsum(counts)])
                for j, i in enumerate(chunk):
                    rows[i] = found[offsets[j] : offsets[j + 1]]
        t2 = time.perf_counter()
        out = []
        for (lb, ratio, pad), r, img in zip(prepared, rows, images):
            det = self.nms(r)
            if len(det):
                scale_boxes(lb.shape, det, img.shape[:2], ratio_pad=(ratio, pad))
            out.append(det)
        t3 = time.perf_counter()
        return out, {"letterbox": t1 - t0, "inference": t2 - t1, "nms": t3 - t2}

    def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]]) -> Any:
        """Detections per image in that image's pixels; one image in, one array out."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype == np.uint8 and \
                (images.ndim == 2 or images.shape[2] in (1, 3, 4)):
            return self.detect([images])[0][0]
        return self.detect(list(images))[0]

    # ------------------------------------------------------------------------------ making one

    @classmethod
    def from_model(cls, model: Any, backend: str = "torch", imgsz: Size = 640, label: str = "model",
                   threads: Optional[int] = None, logger: Optional[logging.Logger] = None,
                   **options: Any) -> Detector:
        """A detector around a torch model already built (fused or not, in eval on its device):
        evaluation of a training run, benchmarks. ``options`` are :class:`Detector`'s."""
        try:
            b = create_backend(backend, model, _pair(imgsz), threads, logger)
        except BackendError as exc:
            raise DetectorError(str(exc)) from None
        return cls(b, list(model.names), int(max(float(s) for s in model.stride)), imgsz, label,
                   model=model, **options)

    @classmethod
    def load(cls, weights: Optional[str] = None, *, cfg: Optional[str] = None, seed: int = 0,
             device: str = "auto", half: Optional[bool] = None, precision: Optional[str] = None,
             backend: str = "auto", imgsz: Size = 640, threads: Optional[int] = None,
             openvino_device: str = "CPU", cuda_graphs: bool = True, graph_pad: str = "pad",
             max_graphs: int = 6, channels_last: bool = False, gate_images: Optional[Sequence[np.ndarray]] = None,
             logger: Optional[logging.Logger] = None, **options: Any) -> Detector:
        """Load ``weights`` (or build ``cfg`` untrained from ``seed``) and choose how it runs.

        With ``weights``, ``cfg`` names the architecture of a plain state dict only.
        ``device`` auto/cpu/cuda[:N]; ``half`` fp16 (default on CUDA); ``precision`` None (the
        fastest that passes the gate on the CPU; fp16 on CUDA), fp32, fp16 (CUDA), bf16
        (OpenVINO); ``backend`` auto/torch/onnxruntime/openvino; ``threads`` the CPU pool;
        ``cuda_graphs``, ``graph_pad``, ``max_graphs``, ``channels_last`` the torch backend's on
        CUDA; ``gate_images`` the user's own frames for the bf16 gate (else generated scenes).
        DetectorError (one line) for anything that cannot be done.
        """
        from edgepipe.yolo.loading import load_for_detector

        return load_for_detector(
            cls, weights, cfg=cfg, seed=seed, device=device, half=half, precision=precision,
            backend=backend, imgsz=_pair(imgsz), threads=threads, openvino_device=openvino_device,
            cuda_graphs=cuda_graphs, graph_pad=graph_pad, max_graphs=max_graphs,
            channels_last=channels_last, gate_images=gate_images, logger=logger or log, options=options,
        )


def is_onnx(path: Union[str, Path]) -> bool:
    return Path(str(path)).suffix.lower() == ".onnx"

