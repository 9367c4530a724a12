"""The detector's backends on the CPU: torch fp32 (threads tuned) against onnxruntime.

Each backend of :mod:`edgepipe.yolo.backends` takes the same uint8 batch and returns the candidate
rows the ``yolov5`` stage passes on; the time of that call, median over repeats, is what is
compared. The variants run alternately within each repeat, in one process, so a neighbour's load
hits them alike:

- ``torch``: torch fp32 with one thread per core, OpenMP threads waiting passively (what the
  ``yolov5`` stage sets up), and the same with 1 thread;
- ``onnxruntime``: the exported model, threads sleeping when idle (the stage's setting), and the
  same with onnxruntime's default spinning threads;
- ``openvino`` (fp32) and ``openvino_bf16`` (where the CPU has bf16): OpenVINO on the same
  exported model, latency hint, threads not pinned (the stage's settings);
- ``torch_untuned``: torch with OpenMP's default waiting (threads spin), in a process of its own
  (the setting is read when torch loads), timed right after the others: not side by side;
- time to ready: ``Detector.load`` as the stage calls it with each backend pinned and with
  ``auto`` (export, compile, gate, race, warm-up), each in a fresh interpreter after torch's import.

Goal: onnxruntime at least 1.5x the tuned torch. ``python -m benchmarks.bench_backends [--smoke]``.
Run from a fresh interpreter (``run`` does that): the thread settings must precede torch's import.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .common import Section, median, mode_arguments, output, run_module

# (cfg, height, width, batch) per mode; the letterboxed shape of a 4:3 frame at that size.
CASES = {
    "smoke": [("yolov5n", 64, 64, 1)],
    "full": [("yolov5n", 256, 320, 1), ("yolov5s-r5.0", 480, 640, 1), ("yolov5s-r5.0", 480, 640, 4)],
}


def _model(cfg: str) -> Any:
    import torch

    from edgepipe.yolo.model import build_model

    torch.manual_seed(0)
    return build_model(cfg, ch=1).fuse().eval()


def _batch(batch: int, h: int, w: int) -> Any:
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (batch, h, w), dtype=np.uint8)


def alternate(calls: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Median milliseconds of each call, the calls run in turn within each repeat."""
    times: Dict[str, List[float]] = {k: [] for k in calls}
    for fn in calls.values():  # warm-up: allocations, kernel choice
        fn()
        fn()
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * median(v) for k, v in times.items()}


def measure_tuned(cfg: str, h: int, w: int, batch: int, repeats: int) -> Dict[str, Any]:
    """Tuned torch (all cores, 1 thread) and onnxruntime (sleeping, spinning), side by side."""
    from edgepipe.yolo.backends import prepare_process

    prepare_process()
    import torch

    from edgepipe.yolo.backends import (
        OnnxRuntimeBackend,
        OpenVinoBackend,
        TorchBackend,
        cpu_has_bf16,
        onnx_from_model,
        openvino_available,
    )

    cores = torch.get_num_threads()
    model = _model(cfg)
    x = _batch(batch, h, w)
    torch_b = TorchBackend(model)
    onnx = onnx_from_model(model, (h, w))
    ort_b = OnnxRuntimeBackend(onnx, (h, w))
    ort_spin = OnnxRuntimeBackend(onnx, (h, w), spin=True)
    extra: Dict[str, Callable[[], Any]] = {}
    if openvino_available():
        ov32 = OpenVinoBackend(onnx, "CPU", "fp32")
        extra["openvino"] = lambda: ov32.candidates(x, 0.25)
        if cpu_has_bf16():
            ov16 = OpenVinoBackend(onnx, "CPU", "bf16")
            extra["openvino_bf16"] = lambda: ov16.candidates(x, 0.25)

    def torch_threads(n: int) -> Callable[[], Any]:
        def call() -> Any:
            torch.set_num_threads(n)
            return torch_b.candidates(x, 0.25)

        return call

    ms = alternate(
        {
            "torch": torch_threads(cores),
            "torch_1thread": torch_threads(1),
            "onnxruntime": lambda: ort_b.candidates(x, 0.25),
            "onnxruntime_spinning": lambda: ort_spin.candidates(x, 0.25),
            **extra,
        },
        repeats,
    )
    torch.set_num_threads(cores)
    return {"threads": cores, "ms": ms}


def measure_untuned(cfg: str, h: int, w: int, batch: int, repeats: int) -> Dict[str, Any]:
    """torch as a plain script gets it: default OpenMP waiting, default threads."""
    import torch

    from edgepipe.yolo.backends import TorchBackend

    b = TorchBackend(_model(cfg))
    x = _batch(batch, h, w)
    return {"threads": torch.get_num_threads(), "ms": alternate({"torch_untuned": lambda: b.candidates(x, 0.25)}, repeats)}


def forward_ms(cfg: str, h: int, w: int, backend: str, repeats: int) -> float:
    """Median ms of the ``yolov5`` stage's forward (its default thread setup) at batch 1."""
    from edgepipe.yolo.backends import prepare_process

    prepare_process()
    from edgepipe.yolo.backends import create_backend

    b = create_backend(backend, _model(cfg), (h, w))
    x = _batch(1, h, w)
    return alternate({b.name: lambda: b.candidates(x, 0.25)}, repeats)[b.name]


READY_VARIANTS = {"torch": ("torch", None), "onnxruntime": ("onnxruntime", None),
                  "openvino": ("openvino", "fp32"), "auto": ("auto", None)}


def ready_seconds(cfg: str, h: int, w: int, variant: str) -> float:
    """Seconds of ``Detector.load`` as the stage calls it (in a fresh interpreter, after torch's
    import): what the backend adds before the worker reports ready."""
    from edgepipe.yolo.backends import prepare_process

    prepare_process()
    import torch  # noqa: F401 - imported before the clock starts: every backend pays it alike

    from edgepipe.yolo.detector import Detector

    backend, precision = READY_VARIANTS[variant]
    t0 = time.perf_counter()
    Detector.load(cfg=cfg, device="cpu", backend=backend, precision=precision, imgsz=(h, w))
    return time.perf_counter() - t0


def letterboxed_shape(width: int, height: int, imgsz: int) -> Tuple[int, int]:
    """(h, w) the letterbox stage (auto: true) makes of a width x height frame at ``imgsz``."""
    import numpy as np

    from edgepipe.yolo.ops import letterbox

    img, _, _ = letterbox(np.zeros((height, width), np.uint8), imgsz)
    return int(img.shape[0]), int(img.shape[1])


def run(smoke: bool = False) -> Section:
    """Every case, each in fresh interpreters (tuned, then untuned)."""
    repeats = 3 if smoke else 20
    figures: Dict[str, float] = {}
    cases = []
    threads = None
    for cfg, h, w, batch in CASES["smoke" if smoke else "full"]:
        args = [cfg, str(h), str(w), str(batch), str(repeats)]
        tuned = run_module("bench_backends", ["--measure", "tuned", *args])
        untuned = run_module("bench_backends", ["--measure", "untuned", *args], unset=["OMP_WAIT_POLICY"])
        ms = dict(tuned["ms"], **untuned["ms"])
        key = f"{cfg}_{w}x{h}_b{batch}"
        for name, value in ms.items():
            figures[f"{key}_{name}_ms"] = round(value, 3)
        figures[f"{key}_onnxruntime_per_torch"] = round(ms["torch"] / ms["onnxruntime"], 3)
        figures[f"{key}_torch_tuned_per_untuned"] = round(ms["torch_untuned"] / ms["torch"], 3)
        for name in ("openvino", "openvino_bf16"):
            if name in ms:
                figures[f"{key}_{name}_per_onnxruntime"] = round(ms["onnxruntime"] / ms[name], 3)
        if batch == 1:
            from edgepipe.yolo.backends import openvino_available

            for variant in READY_VARIANTS:
                if variant != "openvino" or openvino_available():
                    got = run_module("bench_backends", ["--ready", cfg, str(h), str(w), variant])
                    figures[f"{key}_ready_{variant}_s"] = round(got["s"], 3)
        threads = tuned["threads"]
        cases.append(key)
    return {
        "setup": {
            "what": "candidates(batch) of the yolov5 stage's backends as the stage calls them (on the "
            "CPU a batch runs one image at a time), fp32, median ms; ratios are speed-ups (higher: "
            "the first one named is faster)",
            "cases": cases,
            "threads": threads,
            "repeats": repeats,
            "goal": "onnxruntime_per_torch >= 1.5; openvino_bf16_per_onnxruntime > 1 where the CPU has bf16",
            "ready": "seconds of Detector.load per backend (export, compile, gate, race, warm-up), after torch's import",
        },
        "figures": figures,
    }


def table(section: Section) -> List[str]:
    f = section["figures"]
    cols = ("torch_untuned", "torch", "torch_1thread", "onnxruntime", "onnxruntime_spinning", "openvino", "openvino_bf16")
    lines = [f"{'case':>26}  " + "  ".join(f"{c + ' ms':>22}" for c in cols) + f"  {'ort/torch':>9}"]
    for key in section["setup"]["cases"]:
        lines.append(
            f"{key:>26}  " + "  ".join(f"{f.get(f'{key}_{c}_ms', float('nan')):>22.1f}" for c in cols)
            + f"  {f[f'{key}_onnxruntime_per_torch']:>9.2f}"
        )
        ready = {k.rsplit("_ready_", 1)[1][:-2]: v for k, v in f.items() if k.startswith(key + "_ready_")}
        if ready:
            lines.append(f"{'':>26}  time to ready: " + ", ".join(f"{k} {v:.2f} s" for k, v in ready.items()))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode_arguments(parser, long=False)
    parser.add_argument("--measure", nargs=6, metavar=("WHICH", "CFG", "H", "W", "BATCH", "REPEATS"),
                        help=argparse.SUPPRESS)  # one measuring interpreter
    parser.add_argument("--forward", nargs=5, metavar=("CFG", "H", "W", "BACKEND", "REPEATS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--ready", nargs=4, metavar=("CFG", "H", "W", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ready:
        cfg, h, w, variant = args.ready
        print(json.dumps({"s": ready_seconds(cfg, int(h), int(w), variant)}))
        return 0
    if args.measure:
        which, cfg, h, w, batch, repeats = args.measure
        fn = measure_tuned if which == "tuned" else measure_untuned
        print(json.dumps(fn(cfg, int(h), int(w), int(batch), int(repeats))))
        return 0
    if args.forward:
        cfg, h, w, backend, repeats = args.forward
        print(json.dumps({"ms": forward_ms(cfg, int(h), int(w), backend, int(repeats))}))
        return 0
    return output(run(args.smoke), table, args.json)


if __name__ == "__main__":
    sys.exit(main())
