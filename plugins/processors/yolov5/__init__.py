"""The ``yolov5`` stage: batched 1-channel YOLOv5 inference (torch or onnxruntime).

The model is loaded (or, without weights, built from ``cfg`` with a fixed ``seed``: an untrained
network whose outputs are deterministic, for pipelines that must run before a trained model
exists), Conv+BN fused, moved to the device (CUDA in fp16 when available, else CPU in fp32) and
warmed up in ``start()``, so the worker reports ready only when the first real frame will be
fast. torch is imported there and nowhere else: the supervisor and the other stages never pay for
it.

The runtime hands ``process`` up to ``max_batch`` frames, gathered across sources for at most
``max_wait_ms``. Frames are grouped by their letterboxed shape (a tensor batch needs one shape);
each group's uint8 images travel to the device as uint8 and are normalised there (``/255``, fp16
on CUDA), a quarter of the bytes of a float transfer. Only the rows whose objectness exceeds
``conf_thres`` come back (``Frame.candidates``, float32 (k, 5+nc): cx, cy, w, h, obj, class
scores in letterboxed pixels), not the full (N, 5+nc) prediction: a 640x640 image has 25200
rows, of which a handful matter. ``Frame.image`` is dropped afterwards (``keep_image: true`` keeps
it for sinks that draw on the letterboxed picture). Frames that arrive without letterboxing are
letterboxed here to ``imgsz`` (gray, padded to exactly that shape).

The forward pass runs on a backend (:mod:`edgepipe.yolo.backends`): ``backend: auto`` takes
onnxruntime on the CPU when it is installed (about twice torch's speed there) and torch on CUDA;
the start-up log line and ``edgepipe_detector_info`` say which.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

import numpy as np
from pydantic import Field, field_validator

from edgepipe.messages import Frame
from edgepipe.metrics import BATCH_BUCKETS, PROCESSING_BUCKETS
from edgepipe.stage import Processor, StageConfig, StageError
from edgepipe.yolo.builtin import WeightsRef

from .._common import ImageSize, only_changed, parse_imgsz

__all__ = ["YoloV5Config", "YoloV5Stage", "pick_device"]


class YoloV5Config(StageConfig):
    weights: Optional[WeightsRef] = Field(
        None,
        description="Model file: edgepipe safetensors, a YOLOv5 .pt checkpoint (read safely, "
        "never unpickled blindly) or a state_dict; 'builtin:demo' is the packaged demo model "
        "(circle, square, triangle, cross). null: build 'cfg' untrained from 'seed'.",
    )
    cfg: str = Field(
        "yolov5s-r5.0",
        description="Architecture when weights is null: a shipped name (yolov5s-r5.0, yolov5n, "
        "yolov5s, yolov5m, yolov5l, yolov5x) or a model YAML file.",
    )
    seed: int = Field(0, ge=0, description="Seed for the untrained model's initial weights (weights: null).")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.",
    )
    half: Optional[bool] = Field(None, description="fp16 inference; null: fp16 on CUDA, fp32 on CPU.")
    imgsz: ImageSize = Field(
        640,
        description="Input size (int or [height, width]) for the warm-up and for frames that "
        "arrive without a letterbox stage in front.",
    )
    conf_thres: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Pass on only prediction rows with objectness above this (NMS applies its own, "
        "usually equal, threshold to the final confidence).",
    )
    max_batch: int = Field(8, ge=1, le=256, description="Most frames in one forward pass.")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="Longest wait for a batch to fill once a frame is ready, in ms."
    )
    threads: Optional[int] = Field(None, ge=1, le=256, description="CPU threads of the backend (null: one per core).")
    backend: str = Field(
        "auto",
        pattern="^(auto|torch|onnxruntime)$",
        description="Inference engine: 'auto' (onnxruntime on the CPU when installed, else torch), "
        "'torch', or 'onnxruntime' (CPU, fp32; the edgepipe[onnxruntime] extra).",
    )
    keep_image: bool = Field(
        False, description="Keep Frame.image (the letterboxed picture) for sinks that draw on it."
    )

    @field_validator("imgsz")
    @classmethod
    def _stride(cls, value: Union[int, List[int]]) -> Union[int, List[int]]:
        parse_imgsz(value)  # a multiple of 32; the model's own stride is checked at start
        return value

    @field_validator("cfg")
    @classmethod
    def _cfg_file(cls, value: str) -> str:
        # Shipped names are checked when the model is built (their table lives beside torch code).
        if value.endswith((".yaml", ".yml")) and not os.path.isfile(os.path.expanduser(value)):
            raise ValueError(f"no such model config file {value!r}")
        return value


def pick_device(requested: str) -> Tuple[Any, bool]:
    """(torch.device, is_cuda) for 'auto'/'cpu'/'cuda[:N]'; StageError when CUDA is asked for but absent."""
    import torch

    if requested == "auto":
        requested = "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StageError(f"device {requested!r} requested but CUDA is not available (use device: auto or cpu)")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise StageError(f"device {requested!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device("cuda", index), True
    return torch.device("cpu"), False


class YoloV5Stage(Processor):
    """1-channel YOLOv5 inference (torch, CUDA fp16 or CPU); batched; passes on candidates only."""

    Config = YoloV5Config
    config: YoloV5Config
    accepts: ClassVar[Tuple[str, ...]] = ("letterboxed", "frames")
    produces: ClassVar[Optional[str]] = "candidates"

    def __init__(self, config: YoloV5Config, context):
        super().__init__(config, context)
        self._imgsz = parse_imgsz(config.imgsz)
        m = self.metrics
        self.batch_size = m.histogram(
            "edgepipe_detector_batch_size", "Frames per inference batch.", BATCH_BUCKETS
        )
        self.inference_seconds = m.histogram(
            "edgepipe_detector_inference_seconds", "Time spent in one forward pass.", PROCESSING_BUCKETS
        )
        self.info = m.gauge(
            "edgepipe_detector_info",
            "The detector's device, precision, backend and model (always 1).",
            labels=("device", "precision", "backend", "model"),
        )
        self.gpu_memory = m.gauge(
            "edgepipe_gpu_memory_allocated_bytes",
            "GPU memory the stage's process has allocated (CUDA only).",
            labels=("device",),
        )

    def check(self) -> None:
        import importlib.util

        if self.config.backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
            raise StageError("backend 'onnxruntime' needs the onnxruntime package (pip install 'edgepipe[onnxruntime]') or backend: auto")

    def start(self) -> None:
        from edgepipe.yolo.backends import BackendError, create_backend, prepare_process

        prepare_process()  # before torch loads: its OpenMP threads must not spin (see backends)
        import torch

        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._torch = torch
        self.device, cuda = pick_device(cfg.device)
        self.half = cuda if cfg.half is None else cfg.half
        if self.half and not cuda:
            raise StageError("half: true needs a CUDA device; fp16 on the CPU is slower than fp32 and not supported")
        self.model, label = self._load(cuda)
        channels = int(getattr(self.model, "yaml", {}).get("ch", 1))
        if channels != 1:
            raise StageError(f"model {label!r} takes {channels} input channels; edgepipe feeds 1-channel gray (convert it with `edgepipe weights convert`)")
        self.names: List[str] = [str(n) for n in self.model.names]
        self.stride = int(max(self.model.stride)) if hasattr(self.model, "stride") else 32
        if self._imgsz[0] % self.stride or self._imgsz[1] % self.stride:
            raise StageError(f"imgsz {cfg.imgsz} is not a multiple of the model's stride {self.stride}")
        try:
            self.backend = create_backend(cfg.backend, self.model, self._imgsz, cfg.threads, self.log)
        except BackendError as exc:
            raise StageError(str(exc)) from None
        self.info.clear()
        self.info.labels(
            device=str(self.device), precision="fp16" if self.half else "fp32", backend=self.backend.name, model=label
        ).set(1)
        # Warm up: the first passes pick kernels and allocate; do it before reporting ready.
        warm = np.zeros((1, *self._imgsz), np.uint8)
        for _ in range(2):
            self._forward(warm)
        if cuda:
            self.gpu_memory.labels(str(self.device)).set(torch.cuda.memory_allocated(self.device))
        self.log.info(
            "Model %r ready on %s (%s, backend %s, %d classes, input %dx%d)",
            label, self.device, "fp16" if self.half else "fp32", self.backend.name, len(self.names),
            self._imgsz[1], self._imgsz[0],
        )

    def _load(self, cuda: bool) -> Tuple[Any, str]:
        cfg = self.config
        if cfg.weights is not None:
            from edgepipe.yolo.weights import load_model

            try:
                model = load_model(cfg.weights, device=str(self.device), fuse=True, half=self.half)
            except (OSError, ValueError) as exc:
                raise StageError(f"cannot load weights {cfg.weights!r}: {exc}") from None
            return model, os.path.basename(cfg.weights)
        from edgepipe.yolo.model import ConfigError, build_model

        torch = self._torch
        torch.manual_seed(cfg.seed)
        try:
            model = build_model(cfg.cfg, ch=1)
        except ConfigError as exc:
            raise StageError(str(exc)) from None
        model = model.fuse().eval().to(self.device)
        if self.half:
            model = model.half()
        return model, f"{cfg.cfg} (untrained, seed {cfg.seed})"

    def _forward(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W) -> (candidate rows (k, 5+nc) float32, rows per image (B,))."""
        return self.backend.candidates(batch, self.config.conf_thres)

    def _input(self, frame: Frame) -> np.ndarray:
        """The frame's detector input: (H, W) uint8 gray, letterboxed here if nobody did."""
        from edgepipe.yolo.ops import letterbox, to_gray

        if frame.image is None:
            raise ValueError(f"frame {frame.source}/{frame.frame_id} carries no image")
        image = to_gray(frame.image)
        if frame.ratio is None:
            frame.height, frame.width = int(image.shape[0]), int(image.shape[1])
            image, ratio, pad = letterbox(image, self._imgsz, auto=False, stride=self.stride)
            frame.ratio, frame.pad = (float(ratio[0]), float(ratio[1])), (float(pad[0]), float(pad[1]))
        if image.shape[0] % self.stride or image.shape[1] % self.stride:
            raise ValueError(
                f"frame {frame.source}/{frame.frame_id} is {image.shape[1]}x{image.shape[0]}, not a "
                f"multiple of the model's stride {self.stride} (letterbox stride mismatch?)"
            )
        return image

    def process(self, frames: List[Frame]) -> List[Frame]:
        inputs = [self._input(f) for f in frames]
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, image in enumerate(inputs):
            groups.setdefault(image.shape, []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.config.max_batch):
                chunk = members[start : start + self.config.max_batch]
                batch = np.stack([inputs[i] for i in chunk])  # (B, H, W), a fresh writable array
                t0 = time.perf_counter()
                rows, counts = self._forward(batch)
                self.inference_seconds.observe(time.perf_counter() - t0)
                self.batch_size.observe(len(chunk))
                offsets = np.concatenate([[0], np.cumsum(counts)])
                for j, i in enumerate(chunk):
                    frames[i].candidates = np.ascontiguousarray(rows[offsets[j] : offsets[j + 1]])
                    frames[i].names = self.names
                    if self.config.keep_image:
                        frames[i].image = inputs[i]
                    else:
                        frames[i].image = None
        if self.device.type == "cuda":
            self.gpu_memory.labels(str(self.device)).set(self._torch.cuda.memory_allocated(self.device))
        return frames

    def reconfigure(self, config: StageConfig) -> bool:
        """conf_thres and keep_image change in place; anything else reloads the worker."""
        if not only_changed(self.config, config, ("conf_thres", "keep_image")):
            return False
        self.config = config  # type: ignore[assignment]
        return True
