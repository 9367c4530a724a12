"""Measure a detector on held-out generated scenes: mAP@0.5 and mAP@0.5:0.95.

    python -m tools.evaluate edgepipe/data/demo-yolov5n.safetensors --seed 12345 --n 500
    python -m tools.evaluate WEIGHTS --frame 1280x720 --imgsz 640 --min-size 28 --max-size 300
    python -m tools.evaluate WEIGHTS --frame 720x1280 --imgsz 640 --stream

Without ``--frame``, scenes are rendered at the model's input size (``--imgsz`` square) with
objects of 12 to 160 px, as the demo model's goal is stated. With ``--frame WxH`` full frames are
rendered (objects sized in frame pixels), letterboxed to ``--imgsz`` the way the pipeline does,
and the detections mapped back to the frame before matching: the end-to-end geometry without the
daemon; ``--stream`` takes those frames from the synthetic source's moving-shapes video instead.
WEIGHTS is any file edgepipe loads, or a training checkpoint (``runs/*/last.pt``: its
EMA weights). AP uses COCO's 101-point interpolation unless ``--ap continuous``; NMS runs at
``conf_thres`` 0.001 and ``iou_thres`` 0.6, the usual settings for measuring mAP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from edgepipe.scenes import CLASSES, SceneStream, render_scene
from edgepipe.yolo.detector import Detector
from edgepipe.yolo.evaluation import DetectionStats

CONF_THRES = 0.001
IOU_THRES = 0.6


def detector_of(model: torch.nn.Module, imgsz: int, batch: int = 16) -> Detector:
    """The model (as it is: training-time or loaded, on its device) behind the yolo library's
    Detector, with the NMS settings for measuring mAP; frames letterboxed with minimal padding,
    as the pipeline's letterbox stage does."""
    return Detector.from_model(model, "torch", imgsz, conf_thres=CONF_THRES, iou_thres=IOU_THRES,
                               max_batch=batch, auto=True)


def evaluate_scenes(model: torch.nn.Module, seed: int, n: int, imgsz: int,
                    size_range: Tuple[float, float], batch: int = 16,
                    method: str = "101") -> Dict[str, Any]:
    """mAP on ``n`` scenes rendered directly at ``imgsz`` x ``imgsz`` from ``seed``."""
    was_training = model.training
    model.eval()
    detector = detector_of(model, imgsz, batch)
    rng = np.random.default_rng(seed)
    stats = DetectionStats(len(CLASSES), method)
    done = 0
    while done < n:
        k = min(batch, n - done)
        scenes = [render_scene(rng, imgsz, imgsz, size_range=size_range) for _ in range(k)]
        for det, (_img, truth) in zip(detector([s[0] for s in scenes]), scenes):
            stats.add(det, truth)
        done += k
    model.train(was_training)
    return stats.summary(CLASSES)


def _evaluate_letterboxed(model: torch.nn.Module, frames: Iterator[Tuple[np.ndarray, np.ndarray]],
                          imgsz: int, method: str) -> Dict[str, Any]:
    """mAP over (frame, truth) pairs: each frame letterboxed to ``imgsz`` (minimal stride-32
    padding, as the pipeline's letterbox stage does) and its boxes mapped back to the frame."""
    was_training = model.training
    model.eval()
    detector = detector_of(model, imgsz, 1)
    stats = DetectionStats(len(CLASSES), method)
    for img, truth in frames:
        stats.add(detector([img])[0], truth)
    model.train(was_training)
    return stats.summary(CLASSES)


def evaluate_frames(model: torch.nn.Module, seed: int, n: int, frame: Tuple[int, int], imgsz: int,
                    size_range: Tuple[float, float], method: str = "101") -> Dict[str, Any]:
    """mAP on ``n`` random scenes of ``frame`` = (width, height) pixels, letterboxed."""
    rng = np.random.default_rng(seed)
    frames = (render_scene(rng, frame[0], frame[1], size_range=size_range) for _ in range(n))
    return _evaluate_letterboxed(model, frames, imgsz, method)


def evaluate_stream(model: torch.nn.Module, seed: int, n: int, frame: Tuple[int, int], imgsz: int,
                    size_range: Tuple[float, float], objects: int = 6, every: int = 5,
                    method: str = "101") -> Dict[str, Any]:
    """mAP on ``n`` frames of the synthetic source's video (:class:`SceneStream`, every
    ``every``-th frame so that they differ), letterboxed."""
    stream = SceneStream(frame[0], frame[1], seed=seed, objects=objects, size_range=size_range)

    def frames() -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        for i in range(n * every):
            img, truth = stream.next()
            if i % every == 0:
                yield img, truth

    return _evaluate_letterboxed(model, frames(), imgsz, method)


def load_any(path: Path) -> torch.nn.Module:
    """A model from a weights file edgepipe loads, or a training checkpoint's EMA weights."""
    if path.suffix == ".pt" and path.name == "last.pt":
        from tools.train import ema_model, load_checkpoint, parse_args

        ckpt = load_checkpoint(path)
        args = parse_args([])
        for key, value in json.loads(ckpt["args"]).items():
            setattr(args, key, value)
        return ema_model(ckpt, args).float()
    from edgepipe.yolo.weights import load_model

    return load_model(path, device="cpu", half=False).float()


def _frame(text: str) -> Tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"frame size {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"frame size {text!r}: both sides must be at least 32")
    return w, h


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--seed", type=int, default=12345, help="scene seed (training never uses it)")
    p.add_argument("--n", type=int, default=500, help="number of images or frames")
    p.add_argument("--imgsz", type=int, default=320, help="model input size")
    p.add_argument("--frame", type=_frame, default=None, help="render WIDTHxHEIGHT frames and letterbox them")
    p.add_argument("--stream", action="store_true",
                   help="with --frame: frames of the synthetic source's moving-shapes video instead of random scenes")
    p.add_argument("--objects", type=int, default=6, help="shapes in the --stream video")
    p.add_argument("--min-size", type=float, default=None, help="smallest object px (12, or 28 with --frame)")
    p.add_argument("--max-size", type=float, default=None, help="largest object px (160, or 300 with --frame)")
    p.add_argument("--ap", default="101", choices=["101", "continuous"], help="AP interpolation")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not args.weights.is_file():
        p.error(f"weights file {args.weights} does not exist")
    torch.set_num_threads(args.threads)
    model = load_any(args.weights)
    t0 = time.monotonic()
    if args.frame is None:
        size_range = (args.min_size or 12.0, args.max_size or 160.0)
        res = evaluate_scenes(model, args.seed, args.n, args.imgsz, size_range, method=args.ap)
    else:
        size_range = (args.min_size or 28.0, args.max_size or 300.0)
        if args.stream:
            res = evaluate_stream(model, args.seed, args.n, args.frame, args.imgsz, size_range,
                                  objects=args.objects, method=args.ap)
        else:
            res = evaluate_frames(model, args.seed, args.n, args.frame, args.imgsz, size_range, method=args.ap)
    res.update({"weights": str(args.weights), "seed": args.seed, "n": args.n, "imgsz": args.imgsz,
                "frame": None if args.frame is None else "x".join(map(str, args.frame)),
                "source": "scenes" if args.frame is None else ("stream" if args.stream else "frames"),
                "object_px": list(size_range), "seconds": round(time.monotonic() - t0, 1)})
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
