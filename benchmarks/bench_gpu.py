"""The detector on a CUDA GPU: fp16 vs fp32 at batch 1, 8 and 32, CUDA graphs, batching sources.

Only runs where ``torch.cuda.is_available()``; elsewhere the section says so and has no figures.
Measured, each a median over repeats with the variants alternating:

- ``fp32``/``fp16`` at batch 1, 8, 32: images per second of the ``yolov5`` stage's torch backend
  end to end (uint8 host batch -> pinned host buffer -> non-blocking copy -> normalise on the GPU
  -> forward -> candidate filter on the GPU -> rows back to the host), and of the forward alone
  on a device-resident input;
- CUDA graphs (fp16): the forward captured once per batch size and replayed; its output must
  match the eager forward;
- several synthetic sources (3 and 8) into one batching detector through ``edgepipe run``,
  against the bare loop at batch 8 (goal: pipeline / bare >= 0.9).

The timing loops take the device as a parameter, so the same code runs on the CPU (fp32, no
graphs), which is how the test suite keeps it from rotting on machines without a GPU.

    python -m benchmarks.bench_gpu [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .common import Section, median, mode_arguments, output

CFG, IMGSZ = "yolov5s-r5.0", 640
BATCHES = (1, 8, 32)


def _sync(device: Any) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _timed(calls: Dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> Dict[str, float]:
    """Median seconds per call, calls alternating within each repeat."""
    times: Dict[str, List[float]] = {k: [] for k in calls}
    for fn in calls.values():
        fn()
        fn()
    sync()
    for _ in range(repeats):
        for k, fn in calls.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}


def precision_batches(device_name: str, cfg: str = CFG, imgsz: int = IMGSZ,
                      batches: Sequence[int] = BATCHES, precisions: Sequence[str] = ("fp32", "fp16"),
                      repeats: int = 20, graphs: bool = True) -> Dict[str, Dict[str, float]]:
    """Images/s per precision and batch (``figures``): end to end through the stage's backend
    (pinned, non-blocking) and forward only; with ``graphs`` on CUDA, the fp16 forward as a
    replayed CUDA graph, whose largest difference from the eager output goes to ``checks``."""
    import numpy as np
    import torch

    from edgepipe.yolo.backends import TorchBackend
    from edgepipe.yolo.model import build_model

    device = torch.device(device_name)
    sync = _sync(device)
    torch.manual_seed(0)
    base = build_model(cfg, ch=1).fuse().eval()
    models = {p: build_model(cfg, ch=1).fuse().eval() for p in precisions}
    for p, m in models.items():
        m.load_state_dict(base.state_dict())
        m.to(device)
        if p == "fp16":
            m.half()
    backends = {p: TorchBackend(m) for p, m in models.items()}
    rng = np.random.default_rng(0)
    figures: Dict[str, float] = {}
    checks: Dict[str, float] = {}
    for batch in batches:
        host = rng.integers(0, 256, (batch, imgsz, imgsz), dtype=np.uint8)
        calls: Dict[str, Callable[[], Any]] = {}
        inputs = {}
        for p, m in models.items():
            dtype = torch.float16 if p == "fp16" else torch.float32
            inputs[p] = torch.from_numpy(host).to(device).unsqueeze(1).to(dtype) / 255.0
            calls[f"{p}_b{batch}_end_to_end"] = lambda b=backends[p], h=host: b.candidates(h, 0.25)
            calls[f"{p}_b{batch}_forward"] = lambda m=m, x=inputs[p]: m(x)
        if graphs and device.type == "cuda" and "fp16" in models:
            replay, checks[f"fp16_b{batch}_graph_max_abs_diff"] = _cuda_graph(models["fp16"], inputs["fp16"])
            calls[f"fp16_b{batch}_cuda_graph"] = replay
        with torch.inference_mode():
            seconds = _timed(calls, repeats, sync)
        for k, sec in seconds.items():
            figures[f"{k}_img_per_s"] = round(batch / sec, 3)
    return {"figures": figures, "checks": checks}


def _cuda_graph(model: Any, x: Any) -> Any:
    """(replay function, max |graph - eager|) for ``model`` on the fixed input ``x``."""
    import torch

    static_in = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the graph: kernels chosen, grids cached
            model(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_out = model(static_in)
    with torch.inference_mode():
        eager = model(static_in)
        graph.replay()
        torch.cuda.synchronize()
        diff = float((static_out.float() - eager.float()).abs().max())
    if diff > 1e-2 * max(1.0, float(eager.abs().max())):
        raise RuntimeError(f"CUDA graph output differs from the eager forward by {diff:g}")
    return graph.replay, diff


def run(smoke: bool = False) -> Section:
    import torch

    if not torch.cuda.is_available():
        return {
            "setup": {"available": False, "reason": "no CUDA device (torch.cuda.is_available() is False)",
                      "what": "fp16/fp32 at batch 1/8/32, CUDA graphs, batched sources"},
            "figures": {},
        }
    from .bench_pipeline import batching

    repeats = 5 if smoke else 30
    batches = (1, 8) if smoke else BATCHES
    imgsz = 320 if smoke else IMGSZ
    measured = precision_batches("cuda:0", CFG, imgsz, batches, repeats=repeats)
    figures = measured["figures"]
    cases = [(3, 16 if smoke else 200, 640, 480, CFG, imgsz, 8)]
    if not smoke:
        cases.append((8, 100, 640, 480, CFG, imgsz, 8))
    sources = batching(smoke, device="cuda:0", backend="torch", cases=cases)
    figures.update({f"sources_{k}": v for k, v in sources["figures"].items()})
    return {
        "setup": {
            "available": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "model": CFG, "imgsz": imgsz, "batches": list(batches),
            "repeats": repeats, "sources": sources["setup"], "checks": measured["checks"],
            "goal": "sources pipeline_per_bare >= 0.9 at batch 8",
        },
        "figures": figures,
    }


def table(section: Section) -> List[str]:
    if not section["setup"].get("available"):
        return [f"gpu: not measured: {section['setup']['reason']}"]
    return [f"gpu ({section['setup']['device']}): "
            + ", ".join(f"{k} {v:g}" for k, v in section["figures"].items())]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode_arguments(parser, long=False)
    args = parser.parse_args(argv)
    return output(run(args.smoke), table, args.json)


if __name__ == "__main__":
    sys.exit(main())
