"""Benchmark of the detector itself: images/s of the default YOLOv5s (release 5.0, 1 channel).

On the CPU: unfused vs fused (BatchNorm folded into the convolutions) at batch 1 and 4, 640x640.
The two models run alternately within each repeat, so a neighbour's load on a shared machine
hits both columns alike; medians are reported. On a CUDA GPU, when there is one: fp32 vs fp16
(fused) at batch 1 and 8. Weights are random (speed does not depend on them).

    python -m benchmarks.bench_model            # full run
    python -m benchmarks.bench_model --smoke    # small images, two repeats: checks that it runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from edgepipe.yolo.model import DEFAULT_CFG, Model, build_model


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def compare(models: Dict[str, Model], batch: int, imgsz: int, repeats: int, device: torch.device,
            dtypes: Dict[str, torch.dtype]) -> Dict[str, float]:
    """Median images/s per model, the models run alternately within each repeat."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inputs = {k: torch.rand(batch, 1, imgsz, imgsz, device=device).to(dtypes[k]) for k in models}
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for k, m in models.items():  # warm-up: allocator, kernels, grids
            m(inputs[k])
        for _ in range(repeats):
            for k, m in models.items():
                times[k].append(_timed(lambda m=m, k=k: m(inputs[k]), sync))
    return {k: batch / statistics.median(v) for k, v in times.items()}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run to check that it works")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.imgsz, args.repeats = 128, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cpu = torch.device("cpu")
    unfused = build_model(DEFAULT_CFG).eval()
    fused = copy.deepcopy(unfused).fuse()
    results: Dict[str, Dict[str, float]] = {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{DEFAULT_CFG}, 1 channel, {args.imgsz}x{args.imgsz}, CPU, {torch.get_num_threads()} threads "
          f"of {os.cpu_count()} cores (load average {load:.1f} before the run), torch {torch.__version__}, "
          f"median of {args.repeats}")
    print(f"{'batch':>5}  {'unfused img/s':>14}  {'fused img/s':>12}  {'unfused ms/img':>15}  {'fused ms/img':>13}")
    for batch in (1, 4):
        r = compare({"unfused": unfused, "fused": fused}, batch, args.imgsz, args.repeats, cpu,
                    {"unfused": torch.float32, "fused": torch.float32})
        results[f"cpu_b{batch}"] = r
        print(f"{batch:>5}  {r['unfused']:>14.2f}  {r['fused']:>12.2f}  {1000 / r['unfused']:>15.1f}  "
              f"{1000 / r['fused']:>13.1f}")

    if torch.cuda.is_available():
        gpu = torch.device("cuda:0")
        fp32 = copy.deepcopy(fused).to(gpu)
        fp16 = copy.deepcopy(fused).to(gpu).half()
        print(f"\nCUDA {torch.cuda.get_device_name(0)}, fused, {args.imgsz}x{args.imgsz}, "
              f"median of {args.repeats * 5}")
        print(f"{'batch':>5}  {'fp32 img/s':>11}  {'fp16 img/s':>11}")
        for batch in (1, 8):
            r = compare({"fp32": fp32, "fp16": fp16}, batch, args.imgsz, args.repeats * 5, gpu,
                        {"fp32": torch.float32, "fp16": torch.float16})
            results[f"cuda_b{batch}"] = r
            print(f"{batch:>5}  {r['fp32']:>11.1f}  {r['fp16']:>11.1f}")
    else:
        print("\nCUDA: not available, GPU rows skipped")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
