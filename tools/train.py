"""Train the demo detector (1-channel YOLOv5, the four scene classes) on generated scenes.

One command, reproducible from its seed, resumable::

    python -m tools.train --size n --imgsz 256 --steps 3500 --batch 16 --seed 0 --out runs/demo \\
        --export edgepipe/data/demo-yolov5n.safetensors

Every batch is generated on the fly (tools.data, seeded by ``[seed, step]``); the model starts
from scratch with the Detect bias priors. AdamW (or SGD) with a linear warmup and cosine decay,
an exponential moving average (EMA) of the weights, and a checkpoint every ``--save-every``
steps in ``OUT/last.pt`` (plain tensors and numbers, read back with ``weights_only=True``) from
which the same command resumes. ``OUT/log.jsonl`` gets the losses, the learning rate, the
seconds per step and, every ``--val-every`` steps, mAP on a small held-out set. At the end the
EMA weights are exported (fp16) with edgepipe's own weights format when ``--export`` is given.
``--init WEIGHTS`` fine-tunes a model instead (docs/training.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning
# threads of a niced training run waste most of the time they get. Must precede the torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from edgepipe.scenes import CLASSES  # noqa: E402
from edgepipe.yolo.model import Model, build_model  # noqa: E402
from tools.data import training_batch  # noqa: E402
from tools.loss import YoloLoss  # noqa: E402

log = logging.getLogger("tools.train")

# Arguments that must match when a run resumes (the rest may change, e.g. --steps to extend).
_FIXED = ("size", "imgsz", "batch", "seed", "optimizer", "min_size", "max_size", "min_visible",
          "place_visible", "init")
# What a checkpoint written before an argument existed ran with.
_FIXED_BEFORE = {"min_visible": 0.6, "place_visible": None, "init": None}


class ModelEMA:
    """Exponential moving average of a model's parameters and buffers. The decay ramps up as
    ``decay * (1 - exp(-updates / tau))`` so early, fast-changing weights are not frozen in."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0,
                 updates: int = 0) -> None:
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Convolution weights decay; BatchNorm weights and all biases do not."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and not isinstance(module, nn.BatchNorm2d):
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.937, nesterov=True)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.937, 0.999))


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * lrf``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.lrf + (1 - args.lrf) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def new_model(args: argparse.Namespace) -> Model:
    torch.manual_seed(args.seed)
    model = build_model(f"yolov5{args.size}", ch=1, nc=len(CLASSES))
    model.names = list(CLASSES)
    return model


def start_from(model: Model, ema: ModelEMA, ref: str) -> None:
    """Fine-tuning: the model and its EMA start from the weights ``ref`` (a weights file or
    ``builtin:demo``) instead of from scratch; they must be of this run's size and classes."""
    from edgepipe.yolo.weights import WeightsError, read_weights

    try:
        weights = read_weights(ref)
    except WeightsError as exc:
        raise SystemExit(f"--init {ref}: {exc}") from None
    sd = {k: v.float() if v.is_floating_point() else v for k, v in weights.state_dict.items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SystemExit(f"--init {ref}: does not fit a 1-channel {len(CLASSES)}-class model of this "
                         f"size ({first})") from None
    ema.ema.load_state_dict(model.state_dict())
    log.info("Starting from the weights %s (%s)", ref, weights.source)


def save_checkpoint(path: Path, model: nn.Module, ema: ModelEMA, opt: torch.optim.Optimizer,
                    step: int, train_seconds: float, args: argparse.Namespace) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    state = {
        "model": model.state_dict(),
        "ema": ema.ema.state_dict(),
        "ema_updates": ema.updates,
        "optimizer": opt.state_dict(),
        "step": step,
        "train_seconds": train_seconds,
        "args": json.dumps(vars(args), sort_keys=True, default=str),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`; never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SystemExit(f"checkpoint {path}: cannot read it ({type(exc).__name__}: {exc})") from None


def ema_model(ckpt: Dict[str, Any], args: argparse.Namespace) -> Model:
    """The checkpoint's EMA weights in a fresh model, eval mode."""
    model = new_model(args)
    model.load_state_dict(ckpt["ema"])
    return model.eval()


def export(model: Model, path: Path, args: argparse.Namespace, step: int, train_seconds: float) -> None:
    """Save the model in half precision in edgepipe's safetensors format (class names, the
    architecture and how it was trained in the metadata)."""
    from edgepipe.yolo.weights import save_model

    half = copy.deepcopy(model).half().eval()
    half.names = list(CLASSES)
    meta = {
        "trained_by": "tools.train",
        "training": json.dumps({"steps": step, "seed": args.seed, "imgsz": args.imgsz,
                                "batch": args.batch, "train_seconds": round(train_seconds),
                                "object_px": [args.min_size, args.max_size],
                                "min_visible": args.min_visible, "place_visible": args.place_visible,
                                "init": args.init}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(half, path, metadata=meta)
    log.info("Exported %s (%.1f MB)", path, path.stat().st_size / 1e6)


def quick_val(model: Model, args: argparse.Namespace, n: int) -> Dict[str, Any]:
    from tools.evaluate import evaluate_scenes

    return evaluate_scenes(model, seed=999, n=n, imgsz=320, size_range=(12.0, 160.0))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="n", choices=["n", "s", "m", "l", "x"], help="model size")
    p.add_argument("--imgsz", type=int, default=256, help="square training input, multiple of 32")
    p.add_argument("--steps", type=int, default=3500, help="total optimizer steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (resumed if it has last.pt)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=0.002, help="peak learning rate")
    p.add_argument("--lrf", type=float, default=0.05, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=200, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--min-size", type=float, default=8.0, help="smallest object (input pixels)")
    p.add_argument("--max-size", type=float, default=170.0, help="largest object (input pixels)")
    p.add_argument("--min-visible", type=float, default=0.6,
                   help="label objects down to this fraction of their area in sight (partly covered or "
                        "out of the frame)")
    p.add_argument("--place-visible", type=float, default=None,
                   help="place shapes down to this fraction in sight (default: --min-visible + 0.1; lower "
                        "shows objects too little visible to be labelled, which the model learns not to report)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="fine-tune: start from these weights (a file or builtin:demo) instead of from scratch")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (results differ across devices)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--val-every", type=int, default=500, help="held-out mAP every N steps (0: never)")
    p.add_argument("--val-n", type=int, default=100, help="images in that held-out check")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop (after a checkpoint) once this chunk ran this long; 0: no limit")
    p.add_argument("--chunk-steps", type=int, default=0,
                   help="stop (after a checkpoint) once this chunk ran this many steps; 0: no limit")
    p.add_argument("--export", type=Path, default=None, help="write the final EMA weights here (fp16)")
    p.add_argument("--export-only", action="store_true", help="export the checkpoint's EMA and exit")
    args = p.parse_args(argv)
    if args.imgsz % 32 or args.imgsz < 64:
        p.error(f"--imgsz {args.imgsz}: expected a multiple of 32, at least 64")
    if not 0.05 <= args.min_visible <= 0.9:
        p.error(f"--min-visible {args.min_visible}: expected a fraction from 0.05 to 0.9")
    if args.place_visible is not None and not 0.05 <= args.place_visible <= 0.95:
        p.error(f"--place-visible {args.place_visible}: expected a fraction from 0.05 to 0.95")
    if not 0 < args.min_size <= args.max_size:
        p.error(f"--min-size {args.min_size} / --max-size {args.max_size}: expected 0 < min <= max")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "last.pt"

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available")
    model = new_model(args).to(device)
    opt = make_optimizer(model, args)
    ema = ModelEMA(model)
    step, train_seconds = 0, 0.0
    if ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        saved = json.loads(ckpt["args"])
        for key in _FIXED:
            was = saved.get(key, _FIXED_BEFORE.get(key))
            if was != getattr(args, key):
                raise SystemExit(f"{ckpt_path}: --{key.replace('_', '-')} was {was!r} in this run, "
                                 f"got {getattr(args, key)!r} (use another --out for a new run)")
        model.load_state_dict(ckpt["model"])
        ema.ema.load_state_dict(ckpt["ema"])
        ema.updates = int(ckpt["ema_updates"])
        opt.load_state_dict(ckpt["optimizer"])
        step, train_seconds = int(ckpt["step"]), float(ckpt["train_seconds"])
        log.info("Resumed %s at step %d of %d (%.0f s trained so far)", ckpt_path, step, args.steps, train_seconds)
    elif args.export_only:
        raise SystemExit(f"--export-only: no checkpoint at {ckpt_path}")
    elif args.init is not None:
        start_from(model, ema, args.init)

    if args.export_only:
        if args.export is None:
            raise SystemExit("--export-only needs --export PATH")
        export(ema.ema.cpu(), args.export, args, step, train_seconds)
        return 0

    loss_fn = YoloLoss(model.detect.anchors, model.detect.stride.tolist(), len(CLASSES), args.imgsz)
    size_range = (args.min_size, args.max_size)
    chunk_start, chunk_first = time.monotonic(), step
    logf = (args.out / "log.jsonl").open("a", encoding="utf-8")
    model.train()
    while step < args.steps:
        t0 = time.monotonic()
        images, targets = training_batch(args.seed, step, args.batch, args.imgsz, size_range,
                                         min_visible=args.min_visible, place_visible=args.place_visible)
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        preds = model(torch.from_numpy(images).to(device))
        loss, parts = loss_fn(preds, torch.from_numpy(targets).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        opt.step()
        ema.update(model)
        step += 1
        dt = time.monotonic() - t0
        train_seconds += dt
        if step % args.log_every == 0 or step == args.steps:
            rec = {"step": step, "lr": round(lr, 6), "box": round(float(parts[0]), 5),
                   "obj": round(float(parts[1]), 5), "cls": round(float(parts[2]), 5),
                   "targets": int(len(targets)), "s_per_step": round(dt, 3),
                   "train_seconds": round(train_seconds, 1)}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log.info("Step %d/%d loss box %.4f obj %.4f cls %.4f lr %.5f %.2f s/step", step, args.steps,
                     rec["box"], rec["obj"], rec["cls"], lr, dt)
        done = step == args.steps
        out_of_time = (args.max_minutes > 0 and time.monotonic() - chunk_start > args.max_minutes * 60) or \
            (args.chunk_steps > 0 and step - chunk_first >= args.chunk_steps)
        if step % args.save_every == 0 or done or out_of_time:
            save_checkpoint(ckpt_path, model, ema, opt, step, train_seconds, args)
        if args.val_every and (step % args.val_every == 0 or done):
            res = quick_val(ema.ema, args, args.val_n)
            logf.write(json.dumps({"step": step, "val": res}) + "\n")
            logf.flush()
            log.info("Held-out check at step %d: mAP@0.5 %.3f mAP@0.5:0.95 %.3f", step, res["mAP50"], res["mAP50_95"])
        if out_of_time and not done:
            log.info("Stopping this chunk at step %d after %.1f min; run the same command to go on",
                     step, (time.monotonic() - chunk_start) / 60)
            return 0
    log.info("Finished %d steps in %.0f s of training", step, train_seconds)
    if args.export is not None:
        export(ema.ema.cpu(), args.export, args, step, train_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
