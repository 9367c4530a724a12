"""The GPU check in one run: the CUDA-marked tests and the GPU benchmark rows, results to a folder.

    python -m benchmarks.gpu_check OUT_DIR [--budget 420]     # on a machine with CUDA
    python -m benchmarks.gpu_check OUT_DIR --dry-run            # here: the same steps, tiny, on the CPU

Made for a borrowed GPU machine with a few minutes on it (benchmarks/README.md, "GPU", says how to
run it there): each part runs in its own try block, so one failure does not lose the others; the
results are rewritten after every part (``gpu_check.json`` and ``gpu_check.md`` in OUT_DIR), so a
run cut short still leaves what it measured; a part that would start after the time budget is
skipped and says so. Parts, in order:

1. ``cuda_tests``: ``pytest -m cuda`` on the test files that hold CUDA tests;
2. ``graphs``: eager vs CUDA-graph forward (and channels-last graphs), fp16, 640x640,
   yolov5s-r5.0 ch=1, batch 1/8/32;
3. ``stage``: the yolov5 stage's Detector end to end (uint8 host batch in, candidates out) vs the
   bare CUDA-graph forward at batch 1 and 8 (goal >= 0.8), padded vs eager partial batches (3, 5)
   and channels-last at the full sizes;
4. ``sources8``: 8 cheap synthetic sources into one detector at batch 8 through ``edgepipe run``
   (goal >= 2000 frames/s), each stage's own rate;
5. ``stream1280``: one 1280x720 video through ``edgepipe run``, each stage's own rate beside the
   pipeline's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

PARTS = ("cuda_tests", "graphs", "stage", "sources8", "stream1280")
CUDA_TEST_FILES = ["tests/test_detector.py", "tests/plugins/processors/test_yolov5.py", "tests/test_bench.py"]


def _environment() -> Dict[str, Any]:
    import torch

    env: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    return env


def _cuda_tests(out: Path, dry: bool, timeout: float) -> Dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs", *CUDA_TEST_FILES]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(root), timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or [""]
    # On the GPU every selected test must pass (a skip there means CUDA was not seen); in a dry
    # run on the CPU they all skip.
    ok = proc.returncode == 0 and (dry or "skipped" not in tail[0])
    return {"returncode": proc.returncode, "summary": tail[0], "passed": ok}


def _parts(dry: bool) -> Dict[str, Callable[[Path], Dict[str, Any]]]:
    from .bench_gpu import (
        _daemon_figures,
        cheap_sources,
        precision_batches,
        single_stream,
        stage_vs_graph,
    )

    device = "cpu" if dry else "cuda:0"
    cfg, imgsz = ("yolov5n", 64) if dry else ("yolov5s-r5.0", 640)

    def graphs(_: Path) -> Dict[str, Any]:
        got = precision_batches(device, cfg, imgsz, batches=(1, 2) if dry else (1, 8, 32),
                                precisions=("fp32",) if dry else ("fp16",), repeats=2 if dry else 30,
                                graphs=not dry)
        f = got["figures"]
        for b in (1, 8, 32):
            if f"fp16_b{b}_cuda_graph_img_per_s" in f:
                f[f"fp16_b{b}_graph_per_eager"] = round(f[f"fp16_b{b}_cuda_graph_img_per_s"] / f[f"fp16_b{b}_forward_img_per_s"], 3)
        return got

    def stage(_: Path) -> Dict[str, Any]:
        return {"figures": stage_vs_graph(device, cfg, imgsz, batches=(1, 2) if dry else (1, 8, 32),
                                          repeats=2 if dry else 30, partial=(3,) if dry else (3, 5),
                                          max_batch=4 if dry else 8)}

    def sources8(tmp: Path) -> Dict[str, Any]:
        got = cheap_sources(tmp / "sources8", device, sources=2 if dry else 8, per_source=6 if dry else 400,
                            width=64 if dry else 160, height=48 if dry else 120, cfg=cfg, imgsz=imgsz,
                            batch=2 if dry else 8)
        return {"figures": _daemon_figures("sources8", got), "detector": got["detector"]}

    def stream1280(tmp: Path) -> Dict[str, Any]:
        got = single_stream(tmp / "stream1280", device, frames=8 if dry else 300, width=128 if dry else 1280,
                            height=72 if dry else 720, cfg=cfg, imgsz=imgsz)
        return {"figures": _daemon_figures("stream1280", got), "detector": got["detector"]}

    return {"graphs": graphs, "stage": stage, "sources8": sources8, "stream1280": stream1280}


def markdown(doc: Dict[str, Any]) -> str:
    """The results as a page to paste into benchmarks/README.md."""
    env = doc["environment"]
    lines = [f"# GPU check ({'dry run on the CPU' if doc['dry_run'] else env.get('device', '?')})", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}, {env.get('cpus')} CPUs, "
             f"load {env.get('load_average_1min')}; {env.get('nvidia_smi') or ''}", "",
             f"{doc['seconds']:.0f} s in all.", ""]
    for name, part in doc["parts"].items():
        lines.append(f"## {name}: {part['status']} ({part.get('seconds', 0):.0f} s)")
        if part.get("error"):
            lines.append(f"    {part['error']}")
        result = part.get("result") or {}
        if "summary" in result:
            lines.append(f"pytest: `{result['summary']}` (exit {result['returncode']})")
        if result.get("detector"):
            lines.append(f"detector: {result['detector']}")
        figures = result.get("figures") or {}
        if figures:
            lines += ["", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {v:g} |" for k, v in figures.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md, cuda_tests.log")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no new part starts")
    parser.add_argument("--only", default="", help="comma-separated parts (cuda_tests, graphs, stage, sources8, stream1280)")
    args = parser.parse_args(argv)
    from edgepipe.yolo.backends import prepare_process

    prepare_process()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here (torch.cuda.is_available() is False); use --dry-run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    doc: Dict[str, Any] = {"dry_run": args.dry_run, "environment": _environment(), "parts": {}, "seconds": 0.0}
    wanted: List[str] = [p for p in args.only.split(",") if p] or list(PARTS)
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        print(f"gpu_check: error: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}", file=sys.stderr)
        return 2

    def save() -> None:
        doc["seconds"] = round(time.monotonic() - t0, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
        (args.out / "gpu_check.md").write_text(markdown(doc))

    from .common import tempdir

    parts: Dict[str, Callable[[Path], Dict[str, Any]]] = {
        "cuda_tests": lambda _: _cuda_tests(args.out, args.dry_run, max(60.0, args.budget - (time.monotonic() - t0))),
        **_parts(args.dry_run),
    }
    with tempdir("ep-gpucheck-") as tmp:
        for name in wanted:
            if time.monotonic() - t0 > args.budget:
                doc["parts"][name] = {"status": "skipped", "error": f"time budget of {args.budget:g} s spent"}
                save()
                continue
            started = time.monotonic()
            print(f"gpu_check: {name} ...", flush=True)
            try:
                result = parts[name](Path(tmp))
                status = "ok" if result.get("passed", True) else "failed"
                doc["parts"][name] = {"status": status, "result": result}
            except Exception as exc:  # one part's failure must not lose the others
                doc["parts"][name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                                      "traceback": traceback.format_exc()[-4000:]}
            doc["parts"][name]["seconds"] = round(time.monotonic() - started, 1)
            print(f"gpu_check: {name} {doc['parts'][name]['status']} in {doc['parts'][name]['seconds']:g} s", flush=True)
            save()
    save()
    print(markdown(doc))
    return 0 if all(p["status"] == "ok" for p in doc["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
