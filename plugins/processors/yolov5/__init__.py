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

Loading, device, precision, backend, warm-up and the forward pass are the yolo library's
:class:`~edgepipe.yolo.detector.Detector`, the same object ``edgepipe detect`` and the benchmarks
use. ``backend: auto`` races, at start-up, onnxruntime (or torch) fp32 against the lower
precisions that pass the accuracy gate (bf16 on OpenVINO where the CPU has it; a quantized int8
file from ``edgepipe quantize``) and takes the fastest; on CUDA it is torch in fp16 with CUDA
graphs. The start-up log line and ``edgepipe_detector_info`` say which runs and why.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

import numpy as np
from pydantic import Field, field_validator, model_validator

from edgepipe.messages import Frame
from edgepipe.metrics import BATCH_BUCKETS, PROCESSING_BUCKETS
from edgepipe.stage import Processor, StageConfig, StageError
from edgepipe.yolo.builtin import WeightsRef, check_weights_readable

from .._common import ImageSize, only_changed, parse_imgsz

__all__ = ["YoloV5Config", "YoloV5Stage"]


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
    precision: Optional[str] = Field(
        None,
        pattern=r"^(fp32|fp16|bf16)$",
        description="null: fp16 on CUDA; on the CPU the fastest of fp32 and the lower precisions that "
        "pass the accuracy gate (bf16 on OpenVINO where the CPU has it). fp32, fp16 (CUDA) or bf16 "
        "(OpenVINO) pin it. int8 comes from a model made by `edgepipe quantize`.",
    )
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
        pattern="^(auto|torch|onnxruntime|openvino)$",
        description="Inference engine: 'auto' (on the CPU the fastest at start-up of onnxruntime or torch "
        "fp32 and the low precisions that pass the gate; torch on CUDA), 'torch', 'onnxruntime' (CPU, "
        "the edgepipe[onnxruntime] extra) or 'openvino' (the edgepipe[openvino] extra).",
    )
    openvino_device: str = Field(
        "CPU",
        pattern=r"^(CPU|GPU(\.\d+)?|NPU|AUTO)$",
        description="OpenVINO's device: CPU, an Intel GPU (GPU, GPU.N) or NPU where present, or AUTO.",
    )
    cuda_graphs: bool = Field(
        True, description="On CUDA, capture one CUDA graph per input shape and replay it (falls back to "
        "eager, with one log line, where capture fails or differs from eager)."
    )
    graph_pad: str = Field(
        "pad",
        pattern="^(pad|eager)$",
        description="A batch smaller than a captured one: 'pad' it to that graph's size (measured "
        "faster) or run it 'eager'.",
    )
    max_graphs: int = Field(6, ge=1, le=64, description="Most CUDA graphs kept (least recently used dropped).")
    channels_last: bool = Field(
        False, description="On CUDA, channels-last memory format (faster for large batches on some GPUs)."
    )
    gate_images: Optional[str] = Field(
        None,
        description="A folder of your own frames for the accuracy gate of bf16 (box agreement with "
        "fp32); null: generated scenes, which only the demo model's classes are checked on.",
    )
    keep_image: bool = Field(
        False, description="Keep Frame.image (the letterboxed picture) for sinks that draw on it."
    )

    @field_validator("gate_images")
    @classmethod
    def _gate_images(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not os.path.isdir(os.path.expanduser(value)):
            raise ValueError(f"no such folder {value!r}")
        return value

    @model_validator(mode="after")
    def _half_and_precision(self) -> YoloV5Config:
        if self.half is not None and self.precision is not None and self.half != (self.precision == "fp16"):
            raise ValueError(f"half: {str(self.half).lower()} contradicts precision: {self.precision}")
        return self

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


class YoloV5Stage(Processor):
    """1-channel YOLOv5 inference (torch with CUDA graphs, onnxruntime, OpenVINO); batched; passes on candidates only."""

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

        for name, module in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
            if self.config.backend == name and importlib.util.find_spec(module) is None:
                raise StageError(f"backend '{name}' needs the {module} package (pip install 'edgepipe[{name}]') or backend: auto")
        if self.config.weights is not None:
            try:
                check_weights_readable(self.config.weights)
            except ValueError as exc:
                raise StageError(f"weights: {exc}") from None

    def start(self) -> None:
        from edgepipe.yolo.backends import prepare_process

        prepare_process()  # before torch loads: its OpenMP threads must not spin (see backends)
        from edgepipe.yolo.detector import Detector, DetectorError

        cfg = self.config
        try:
            self.detector = Detector.load(
                cfg.weights, cfg=cfg.cfg if cfg.weights is None else None, seed=cfg.seed, device=cfg.device,
                half=cfg.half, precision=cfg.precision, backend=cfg.backend, imgsz=self._imgsz,
                threads=cfg.threads, openvino_device=cfg.openvino_device, cuda_graphs=cfg.cuda_graphs,
                graph_pad=cfg.graph_pad, max_graphs=cfg.max_graphs, channels_last=cfg.channels_last,
                gate_images=self._gate_images(), logger=self.log, conf_thres=cfg.conf_thres,
                max_batch=cfg.max_batch, auto=False,
            )
        except DetectorError as exc:
            raise StageError(str(exc)) from None
        d = self.detector
        self.names: List[str] = d.names
        self.stride = d.stride
        self.backend = d.backend
        self.half = d.precision == "fp16"
        self.cuda = d.device.startswith("cuda")
        self.device: Any = d.device  # a torch.device on CUDA (an ONNX model on the CPU needs no torch)
        if self.cuda:
            import torch

            self._torch = torch
            self.device = torch.device(d.device)
        self.info.clear()
        self.info.labels(device=d.device, precision=d.precision, backend=d.backend.name, model=d.label).set(1)
        if self.cuda:
            self.gpu_memory.labels(str(self.device)).set(self._torch.cuda.memory_allocated(self.device))
        self.log.info(
            "Model %r ready on %s (%s, backend %s, %d classes, input %dx%d): %s",
            d.label, d.device, d.precision, d.backend.name, len(self.names), self._imgsz[1], self._imgsz[0],
            d.choice.describe(),
        )

    def _gate_images(self) -> Optional[List[np.ndarray]]:
        """Up to 16 of the user's frames from ``gate_images`` (gray), or None."""
        folder = self.config.gate_images
        if folder is None:
            return None
        from edgepipe.yolo.evaluation import read_images

        try:
            return read_images(os.path.expanduser(folder), limit=16)
        except ValueError as exc:
            raise StageError(f"gate_images: {exc}") from None

    def _forward(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W) -> (candidate rows (k, 5+nc) float32, rows per image (B,))."""
        return self.detector.candidates(batch, self.config.conf_thres)

    def _input(self, frame: Frame) -> np.ndarray:
        """The frame's detector input: (H, W) uint8 gray, letterboxed here if nobody did."""
        from edgepipe.yolo.ops import to_gray

        if frame.image is None:
            raise ValueError(f"frame {frame.source}/{frame.frame_id} carries no image")
        image = to_gray(frame.image)
        if frame.ratio is None:
            frame.height, frame.width = int(image.shape[0]), int(image.shape[1])
            image, ratio, pad = self.detector.letterbox(image)  # to exactly imgsz (auto: false)
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
        if self.cuda:
            self.gpu_memory.labels(str(self.device)).set(self._torch.cuda.memory_allocated(self.device))
        return frames

    def reconfigure(self, config: StageConfig) -> bool:
        """conf_thres and keep_image change in place; anything else reloads the worker."""
        if not only_changed(self.config, config, ("conf_thres", "keep_image")):
            return False
        self.config = config  # type: ignore[assignment]
        return True
