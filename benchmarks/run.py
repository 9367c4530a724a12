"""Every benchmark in one run: a table, or one JSON document with ``--json``.

    python -m benchmarks.run              # make bench: the numbers of benchmarks/README.md (minutes)
    python -m benchmarks.run --smoke      # make bench-smoke, CI: tiny sizes, short runs (seconds)
    python -m benchmarks.run --long       # the 10-minute latency drift and memory run
    python -m benchmarks.run --only transport,backends

``edgepipe bench`` is the same command. The document: ``mode``, ``machine`` (CPU, cores, versions,
load average), ``seconds`` and ``sections``, each with ``setup`` (what was measured), ``figures``
(positive numbers: medians, ratios, rates), and where they apply ``fractions`` (in [0, 1]) and
``trends`` (signed slopes). Timings on a shared machine are noisy: every comparison is a ratio of
variants measured alternately in the same run, and the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from edgepipe.yolo.backends import prepare_process

from .common import Section, load_average, machine, mode_arguments, output

SECTIONS = ("transport", "backends", "throughput", "batching", "latency", "overload", "memory",
            "model", "ops", "gpu", "tracking")
OPTIONAL = ("brokers",)  # only with --only: they need Debian's mosquitto and nats-server


def _key(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def model_section(smoke: bool) -> Section:
    """bench_model's fused vs unfused images/s (default YOLOv5s, CPU), batch 1 and 4."""
    import copy

    import torch

    from . import bench_model

    imgsz, repeats = (128, 2) if smoke else (640, 10)
    torch.manual_seed(0)
    unfused = bench_model.build_model(bench_model.DEFAULT_CFG).eval()
    fused = copy.deepcopy(unfused).fuse()
    figures: Dict[str, float] = {}
    for batch in (1, 4):
        r = bench_model.compare({"unfused": unfused, "fused": fused}, batch, imgsz, repeats,
                                torch.device("cpu"), {"unfused": torch.float32, "fused": torch.float32})
        figures[f"unfused_b{batch}_img_per_s"] = round(r["unfused"], 3)
        figures[f"fused_b{batch}_img_per_s"] = round(r["fused"], 3)
        figures[f"fused_per_unfused_b{batch}"] = round(r["fused"] / r["unfused"], 3)
    return {
        "setup": {"what": "torch eager images/s, fused vs unfused (benchmarks/bench_model.py)",
                  "model": bench_model.DEFAULT_CFG, "imgsz": imgsz, "repeats": repeats,
                  "threads": torch.get_num_threads()},
        "figures": figures,
    }


def ops_section(smoke: bool) -> Section:
    """bench_ops: NMS over 1k/10k candidates (ours vs OpenCV), letterbox of a 1080p frame."""
    from . import bench_ops

    figures: Dict[str, float] = {}
    kept: Dict[str, Any] = {}
    for row in bench_ops.run(smoke):
        if row["bench"] == "nms":
            key = _key(f"nms {row['candidates']} {row['classes']}cls {row['layout']}")
            for impl in ("edgepipe", "opencv", "torchvision"):
                if f"{impl}_ms" in row:
                    figures[f"{key}_{impl}_ms"] = row[f"{impl}_ms"]
            kept[key] = {k: v for k, v in row.items() if k.endswith("kept")}
        else:
            figures[_key(f"letterbox {row['case']}") + "_ms"] = row["ms"]
    return {"setup": {"what": "pre/post-processing (benchmarks/bench_ops.py), median ms", "kept": kept},
            "figures": figures}


def _sections(mode: str) -> Dict[str, Callable[[], Any]]:
    from . import bench_backends, bench_gpu, bench_latency, bench_pipeline, bench_transport

    smoke = mode == "smoke"
    return {
        "brokers": lambda: importlib.import_module(".bench_brokers", __package__).run(smoke),
        "transport": lambda: bench_transport.run(smoke),
        "backends": lambda: bench_backends.run(smoke),
        "throughput": lambda: bench_pipeline.run(smoke),
        "batching": lambda: bench_pipeline.batching(smoke),
        "live": lambda: bench_latency.run(mode),  # latency, overload, memory
        "model": lambda: model_section(smoke),
        "ops": lambda: ops_section(smoke),
        "gpu": lambda: bench_gpu.run(smoke),
        "tracking": lambda: _tracking(smoke),
    }


def _tracking(smoke: bool) -> Section:
    from . import bench_tracking

    return bench_tracking.run(smoke)


def parse_only(text: str) -> List[str]:
    """The sections named in a comma-separated list (empty: all); ValueError naming unknown ones."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS + OPTIONAL))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return names or list(SECTIONS)


def run_all(mode: str = "full", only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the chosen sections (all by default); the JSON document described above."""
    wanted = set(only or SECTIONS)
    t0 = time.time()
    doc: Dict[str, Any] = {"mode": mode, "machine": machine(), "sections": {}}
    for name, fn in _sections(mode).items():
        if name == "live":
            if wanted & {"latency", "overload", "memory"}:
                doc["sections"].update({k: v for k, v in fn().items() if k in wanted})
        elif name in wanted:
            doc["sections"][name] = fn()
    doc["seconds"] = round(time.time() - t0, 1)
    doc["machine"]["load_average_1min_end"] = load_average()
    return doc


def table(doc: Dict[str, Any]) -> List[str]:
    from . import bench_backends, bench_gpu, bench_latency, bench_pipeline, bench_transport

    m = doc["machine"]
    lines = [
        f"edgepipe bench ({doc['mode']}), {doc['seconds']:g} s: {m['cpu']}, {m['cpus_usable']} cores, "
        f"Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"load average {m['load_average_1min']} -> {m['load_average_1min_end']}",
    ]
    s = doc["sections"]
    tables: Dict[str, Callable[[Section], List[str]]] = {
        "transport": bench_transport.table,
        "backends": bench_backends.table,
        "throughput": bench_pipeline.table,
        "batching": bench_pipeline.table_batching,
        "gpu": bench_gpu.table,
    }
    for name in SECTIONS + OPTIONAL:
        if name not in s:
            continue
        lines.append("")
        lines.append(f"[{name}]")
        if name in tables:
            lines.extend(tables[name](s[name]))
        elif name in ("latency", "overload", "memory"):
            lines.extend(bench_latency.table({name: s[name]}))
        else:
            lines.extend(f"  {k}: {v:g}" for k, v in s[name]["figures"].items())
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode_arguments(parser)
    parser.add_argument("--only", default="", help=f"comma-separated sections ({', '.join(SECTIONS)})")
    args = parser.parse_args(argv)
    try:
        only = parse_only(args.only)
    except ValueError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    prepare_process()  # before torch loads here: the in-process model timings run tuned
    doc = run_all("smoke" if args.smoke else "long" if args.long else "full", only)
    return output(doc, table, args.json)


if __name__ == "__main__":
    sys.exit(main())
