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
  against the bare loop at batch 8 (goal: pipeline / bare >= 0.9);
- the ``yolov5`` stage's own path end to end (:class:`~edgepipe.yolo.detector.Detector`: uint8
  host batch in, candidates out, CUDA graphs) against the bare CUDA-graph forward of the same
  model on a device-resident input, at batch 1 and 8 (goal: >= 0.8); partial batches padded to a
  captured graph against run eagerly (``graph_pad``), and channels-last against the default
  layout (``channels_last``), which set those options' defaults;
- 8 cheap sources (small synthetic scenes, one letterbox stage each) into one detector at batch
  8 through ``edgepipe run`` (goal >= 2000 frames/s on an H100/H200-class card), and one
  1280x720 video through ``edgepipe run``, each with every stage's own rate beside the
  pipeline's (so one can see which stage is the limit: decode, for the single stream).

The timing loops take the device as a parameter, so the same code runs on the CPU (fp32, no
graphs), which is how the test suite keeps it from rotting on machines without a GPU.

    python -m benchmarks.bench_gpu [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .common import (
    DaemonRun,
    Section,
    free_local_port,
    median,
    mode_arguments,
    output,
    publish_times,
    read_jsonl,
    scrape,
    stage_rates,
    steady_rate,
    tempdir,
    write_video,
)

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
            last = copy.deepcopy(models["fp16"]).to(memory_format=torch.channels_last)
            x_last = inputs["fp16"].contiguous(memory_format=torch.channels_last)
            calls[f"fp16_b{batch}_cuda_graph_channels_last"], _ = _cuda_graph(last, x_last)
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


def stage_vs_graph(device_name: str, cfg: str = CFG, imgsz: int = IMGSZ, batches: Sequence[int] = (1, 8),
                   repeats: int = 20, partial: Sequence[int] = (3, 5), max_batch: int = 8) -> Dict[str, float]:
    """Images/s of the yolov5 stage's Detector (uint8 host batch in, candidates out; CUDA graphs,
    pad and eager partial batches; channels-last) against the bare CUDA-graph forward of its
    model on a device-resident input. On the CPU (dry runs) the graph rows are left out."""
    import numpy as np
    import torch

    from edgepipe.yolo.detector import Detector

    device = torch.device(device_name)
    sync = _sync(device)
    cuda = device.type == "cuda"
    common = dict(cfg=cfg, seed=0, device=device_name, imgsz=imgsz, backend="torch", max_batch=max_batch)
    variants = {"stage": Detector.load(**common)}
    if cuda:
        variants["stage_eager_partial"] = Detector.load(graph_pad="eager", **common)
        variants["stage_channels_last"] = Detector.load(channels_last=True, **common)
    rng = np.random.default_rng(1)
    figures: Dict[str, float] = {}
    model = variants["stage"].model
    for batch in sorted(set(batches) | set(partial)):
        host = rng.integers(0, 256, (batch, imgsz, imgsz), dtype=np.uint8)
        calls: Dict[str, Callable[[], Any]] = {
            name: (lambda d=d, h=host: d.candidates(h)) for name, d in variants.items()
            if name == "stage" or (name == "stage_eager_partial" and batch in partial)
            or (name == "stage_channels_last" and batch not in partial)
        }
        if cuda and batch not in partial:
            x = torch.from_numpy(host).to(device).unsqueeze(1).to(next(model.parameters()).dtype) / 255.0
            calls["bare_graph"], _ = _cuda_graph(model, x)
        with torch.inference_mode():
            seconds = _timed(calls, repeats, sync)
        for k, sec in seconds.items():
            figures[f"b{batch}_{k}_img_per_s"] = round(batch / sec, 3)
        if "bare_graph" in seconds:
            figures[f"b{batch}_stage_per_bare_graph"] = round(seconds["bare_graph"] / seconds["stage"], 3)
        if "stage_eager_partial" in seconds:
            figures[f"b{batch}_pad_per_eager"] = round(seconds["stage_eager_partial"] / seconds["stage"], 3)
    return figures


def _run_daemon(config: Dict[str, Any], workdir: Path, expected: int, timeout: float) -> Dict[str, Any]:
    """``edgepipe run`` on ``config`` until its finite sources end: pipeline frames/s (publish
    times), each stage's own rate (last /metrics scrape), time to ready, the detector's line."""
    port = free_local_port()
    config = dict(config, metrics={"listen": f"127.0.0.1:{port}"}, runtime={"status_interval": 3600})
    t0 = time.monotonic()
    with DaemonRun(config, workdir) as daemon:
        daemon.wait_ready(timeout=timeout)
        ready = time.monotonic() - t0
        last = ""
        assert daemon.proc is not None
        deadline = time.monotonic() + timeout
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            last = scrape(port) or last
            time.sleep(0.2)
        daemon.wait_exit(timeout=30)
        line = next((ln for ln in daemon.log.splitlines() if "ready on" in ln), "")
    messages = read_jsonl(workdir / "out.jsonl")
    if len(messages) != expected:
        raise RuntimeError(f"the pipeline published {len(messages)} of {expected} frames")
    return {"fps": steady_rate(sorted(publish_times(messages))), "stages": stage_rates(last), "ready_s": ready,
            "detector": line.split(": ", 1)[-1][:300]}


def cheap_sources(workdir: Path, device: str, sources: int = 8, per_source: int = 400, width: int = 160,
                  height: int = 120, cfg: str = CFG, imgsz: int = IMGSZ, batch: int = 8) -> Dict[str, Any]:
    """``sources`` small synthetic scenes (160x120, one shape: about 0.6 ms a frame on a busy
    2-core x86, so 8 of them make thousands of frames a second), each with its own letterbox
    stage (so no single pre-processing process caps the rate), into one detector at ``batch``."""
    stages: Dict[str, Any] = {}
    for i in range(sources):
        stages[f"cam{i}"] = {"type": "synthetic", "width": width, "height": height, "fps": None,
                             "count": per_source, "seed": i, "objects": 1}
        stages[f"prep{i}"] = {"type": "letterbox", "inputs": [f"cam{i}"], "imgsz": imgsz, "auto": False}
    stages.update({
        "detector": {"type": "yolov5", "inputs": [f"prep{i}" for i in range(sources)], "weights": None, "cfg": cfg,
                     "seed": 0, "device": device, "imgsz": imgsz, "backend": "torch", "max_batch": batch,
                     "max_wait_ms": 5.0},
        "post": {"type": "nms", "inputs": ["detector"]},
        "out": {"type": "jsonl", "inputs": ["post"], "path": str(workdir / "out.jsonl")},
    })
    return _run_daemon({"name": "bench-gpu-sources", "stages": stages}, workdir, sources * per_source, 600)


def single_stream(workdir: Path, device: str, frames: int = 300, width: int = 1280, height: int = 720,
                  cfg: str = CFG, imgsz: int = IMGSZ) -> Dict[str, Any]:
    """One 1280x720 video file through ``edgepipe run``."""
    workdir.mkdir(parents=True, exist_ok=True)
    video = write_video(workdir / "stream.mp4", width, height, frames)
    stages = {
        "video": {"type": "file", "path": str(video)},
        "prep": {"type": "letterbox", "inputs": ["video"], "imgsz": imgsz},
        "detector": {"type": "yolov5", "inputs": ["prep"], "weights": None, "cfg": cfg, "seed": 0,
                     "device": device, "imgsz": imgsz, "backend": "torch"},
        "post": {"type": "nms", "inputs": ["detector"]},
        "out": {"type": "jsonl", "inputs": ["post"], "path": str(workdir / "out.jsonl")},
    }
    return _run_daemon({"name": "bench-gpu-stream", "stages": stages}, workdir, frames, 600)


def _daemon_figures(prefix: str, got: Dict[str, Any]) -> Dict[str, float]:
    out = {f"{prefix}_pipeline_fps": round(got["fps"], 2), f"{prefix}_ready_s": round(got["ready_s"], 2)}
    out.update({f"{prefix}_stage_{k}_own_fps": round(v, 2) for k, v in got["stages"].items()})
    return out


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
    figures.update({f"detector_{k}": v for k, v in stage_vs_graph("cuda:0", CFG, imgsz, repeats=repeats).items()})
    cases = [(3, 16 if smoke else 200, 640, 480, CFG, imgsz, 8)]
    if not smoke:
        cases.append((8, 100, 640, 480, CFG, imgsz, 8))
    sources = batching(smoke, device="cuda:0", backend="torch", cases=cases)
    figures.update({f"sources_{k}": v for k, v in sources["figures"].items()})
    daemons: Dict[str, str] = {}
    with tempdir("ep-gpu-") as tmp:
        cheap = cheap_sources(Path(tmp) / "cheap", "cuda:0", per_source=40 if smoke else 400, imgsz=imgsz)
        figures.update(_daemon_figures("cheap8", cheap))
        stream = single_stream(Path(tmp) / "stream", "cuda:0", frames=30 if smoke else 300, imgsz=imgsz)
        figures.update(_daemon_figures("stream1280", stream))
        daemons = {"cheap8": cheap["detector"], "stream1280": stream["detector"]}
    return {
        "setup": {
            "available": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "model": CFG, "imgsz": imgsz, "batches": list(batches),
            "repeats": repeats, "sources": sources["setup"], "checks": measured["checks"], "detectors": daemons,
            "goal": "sources pipeline_per_bare >= 0.9 at batch 8; detector_b1/b8_stage_per_bare_graph >= 0.8; "
                    "cheap8_pipeline_fps >= 2000 on an H100/H200; stream1280 limited by the video stage",
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


__all__ = ["cheap_sources", "precision_batches", "run", "single_stream", "stage_vs_graph", "table"]


if __name__ == "__main__":
    sys.exit(main())
