"""Live sources through a daemon: latency at a camera's pace, behaviour under overload, memory.

A ``synthetic`` source paced like a camera feeds ``letterbox`` -> ``yolov5`` -> ``nms`` ->
``jsonl`` in ``edgepipe run`` (links default to ``latest`` behind a live source). Every message
carries its capture time and its capture-to-publish latency, measured by the daemon itself.

- ``latency``: the source at 10 fps, slower than the model. p50 and p99 of capture-to-publish
  against the model's own forward time (the ``yolov5`` stage's backend at batch 1, measured in
  a separate process just before the daemon starts and just after it stops, so they do not
  compete; the lower of the two counts); goals p50 <=
  forward + 10 ms and p99 <= 2 x p50; the drift is the least-squares slope of latency over the
  run, in ms per minute (goal: none upward over 5 minutes, ``--long``). Where the time goes:
  inside the processors' ``process()`` calls (the detector's alone, and all of them, from the
  messages' per-stage timing) and between them (links, queues, waiting for a core).
- ``overload``: a source faster than the model. The frame age at publish stays bounded (p99)
  because stale frames are skipped; the drop fraction says how many; memory stays flat.
- ``memory``: resident memory (RSS) and proportional share (PSS: shared libraries split between
  the processes that map them) of every process of the daemon when the first frame is published
  and at the end of the latency run (10 minutes with ``--long``), per worker; the detector's
  share of the total.

    python -m benchmarks.bench_latency [--smoke | --long] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .bench_backends import letterboxed_shape
from .common import (
    DaemonRun,
    Section,
    load_average,
    mode_arguments,
    output,
    percentile,
    read_jsonl,
    run_module,
    slope_per_minute,
    tempdir,
)

CONF = 0.25

# Per mode: (cfg, imgsz, frame width, height, source fps, seconds) for the latency run and the
# overload run.
PLANS: Dict[str, Dict[str, Tuple[str, int, int, int, float, float]]] = {
    "smoke": {"latency": ("yolov5n", 64, 160, 120, 10.0, 4.0), "overload": ("yolov5n", 64, 160, 120, 200.0, 3.0)},
    "full": {"latency": ("yolov5n", 320, 640, 480, 10.0, 60.0), "overload": ("yolov5s-r5.0", 640, 640, 480, 60.0, 30.0)},
    "long": {"latency": ("yolov5n", 320, 640, 480, 10.0, 600.0), "overload": ("yolov5s-r5.0", 640, 640, 480, 60.0, 120.0)},
}
MEMORY_SAMPLE_S = 5.0


def live_config(out: str, cfg: str, imgsz: int, width: int, height: int, fps: float) -> Dict[str, Any]:
    return {
        "name": "bench-live",
        "stages": {
            "camera": {"type": "synthetic", "width": width, "height": height, "fps": fps},
            "prep": {"type": "letterbox", "inputs": ["camera"], "imgsz": imgsz},
            "detector": {"type": "yolov5", "inputs": ["prep"], "weights": None, "cfg": cfg, "seed": 0,
                         "device": "cpu", "imgsz": imgsz, "conf_thres": CONF},
            "post": {"type": "nms", "inputs": ["detector"], "conf_thres": CONF},
            "out": {"type": "jsonl", "inputs": ["post"], "path": out},
        },
        "metrics": {"listen": "127.0.0.1:0"},
        "runtime": {"status_interval": 3600},
    }


def _totals(memory: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    return {k: round(sum(p[k] for p in memory.values()), 1) for k in ("rss_mib", "pss_mib")}


def live_run(workdir: Path, cfg: str, imgsz: int, width: int, height: int, fps: float,
             seconds: float) -> Dict[str, Any]:
    """Run the live pipeline for ``seconds`` after its first published frame; what it published
    in that window, and memory at its start and end (sampled every few seconds between)."""
    out = workdir / "out.jsonl"
    with DaemonRun(live_config(str(out), cfg, imgsz, width, height, fps), workdir) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: read_jsonl(out), 120, "first published frame")
        time.sleep(min(2.0, seconds / 4))  # settle: the first frames wait on the warm-up
        t0 = time.time()
        start = daemon.memory()
        samples = [(0.0, _totals(start)["rss_mib"])]
        while time.time() - t0 < seconds:
            time.sleep(min(MEMORY_SAMPLE_S, max(0.0, seconds - (time.time() - t0))))
            daemon.check_running()
            samples.append((time.time() - t0, _totals(daemon.memory())["rss_mib"]))
        end = daemon.memory()
        t1 = time.time()
        messages = [m for m in read_jsonl(out) if t0 <= m["timestamp"] <= t1 - 1.0]
    if len(messages) < 3:
        raise RuntimeError(f"only {len(messages)} frames published in {seconds:g} s")
    ids = [m["frame_id"] for m in messages]
    captured = max(ids) - min(ids) + 1
    return {
        "latency_ms": [1000 * m["timing"]["latency"] for m in messages],
        # Time inside the processors' process() calls, per frame; the rest is links and queues.
        "in_stages_ms": [1000 * sum(m["timing"]["stages"].values()) for m in messages],
        "detector_ms": [1000 * m["timing"]["stages"].get("detector", 0.0) for m in messages],
        "capture_times": [m["timestamp"] for m in messages],
        "published": len(messages),
        "captured": captured,
        "span_s": messages[-1]["timestamp"] - messages[0]["timestamp"],
        "memory_start": start,
        "memory_end": end,
        "memory_samples": samples,
    }


def _forward_ms(cfg: str, imgsz: int, width: int, height: int, repeats: int) -> float:
    h, w = letterboxed_shape(width, height, imgsz)
    return float(run_module("bench_backends", ["--forward", cfg, str(h), str(w), "auto", str(repeats)])["ms"])


def run(mode: str = "full") -> Dict[str, Section]:
    """The three sections (latency, overload, memory) from two daemon runs."""
    plan = PLANS[mode]
    repeats = 5 if mode == "smoke" else 30
    sections: Dict[str, Section] = {}
    with tempdir("ep-live-") as tmp:
        cfg, imgsz, width, height, fps, seconds = plan["latency"]
        forwards = [_forward_ms(cfg, imgsz, width, height, repeats)]
        load = [load_average()]
        live = live_run(Path(tmp) / "latency", cfg, imgsz, width, height, fps, seconds)
        load.append(load_average())
        forwards.append(_forward_ms(cfg, imgsz, width, height, repeats))
        forward = min(forwards)  # the model's own time where the shared machine let it run best
        lat = live["latency_ms"]
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        between = [a - b for a, b in zip(lat, live["in_stages_ms"])]
        sections["latency"] = {
            "setup": {
                "what": "capture-to-publish of a live source slower than the model, vs the model's forward",
                "model": cfg, "imgsz": imgsz, "frame": f"{width}x{height}", "source_fps": fps,
                "seconds": seconds, "frames": live["published"], "load_average_1min": load,
                "forward_ms_before_after": [round(f, 3) for f in forwards],
                "goals": "p50 <= forward + 10 ms; p99 <= 2 x p50; no upward drift",
            },
            "figures": {
                "forward_ms": round(forward, 3),
                "p50_ms": round(p50, 3),
                "p99_ms": round(p99, 3),
                "p50_minus_forward_ms": round(max(p50 - forward, 1e-3), 3),
                "p99_per_p50": round(p99 / p50, 3),
                "published_fps": round((live["published"] - 1) / live["span_s"], 3),
                "detector_p50_ms": round(percentile(live["detector_ms"], 50), 3),
                "detector_p99_ms": round(percentile(live["detector_ms"], 99), 3),
                "in_stages_p50_ms": round(percentile(live["in_stages_ms"], 50), 3),
                "in_stages_p99_ms": round(percentile(live["in_stages_ms"], 99), 3),
                "between_stages_p50_ms": round(max(percentile(between, 50), 1e-3), 3),
                "between_stages_p99_ms": round(max(percentile(between, 99), 1e-3), 3),
            },
            "fractions": {"dropped": round(1 - live["published"] / live["captured"], 4)},
            "trends": {"drift_ms_per_min": round(slope_per_minute(live["capture_times"], lat), 4)},
        }
        start, end = _totals(live["memory_start"]), _totals(live["memory_end"])
        detector = live["memory_end"].get("detector", {"pss_mib": 0.0})["pss_mib"]
        samples = live["memory_samples"]
        sections["memory"] = {
            "setup": {
                "what": "RSS and PSS of every daemon process at the first published frame and after the run",
                "seconds": seconds, "per_process_start": live["memory_start"],
                "per_process_end": live["memory_end"], "rss_samples_mib": samples,
            },
            "figures": {
                "rss_start_mib": start["rss_mib"], "rss_end_mib": end["rss_mib"],
                "pss_start_mib": start["pss_mib"], "pss_end_mib": end["pss_mib"],
                "processes": len(live["memory_end"]),
            },
            "fractions": {"detector_share_of_pss": round(detector / end["pss_mib"], 4)},
            "trends": {
                "rss_growth_percent": round(100 * (end["rss_mib"] - start["rss_mib"]) / start["rss_mib"], 3),
                "rss_slope_mib_per_min": round(slope_per_minute([s[0] for s in samples], [s[1] for s in samples]), 4),
            },
        }

        cfg, imgsz, width, height, fps, seconds = plan["overload"]
        forward = _forward_ms(cfg, imgsz, width, height, max(3, repeats // 3))
        over = live_run(Path(tmp) / "overload", cfg, imgsz, width, height, fps, seconds)
        age = over["latency_ms"]
        o_start, o_end = _totals(over["memory_start"]), _totals(over["memory_end"])
        sections["overload"] = {
            "setup": {
                "what": "a live source faster than the model: frame age at publish and drops",
                "model": cfg, "imgsz": imgsz, "frame": f"{width}x{height}", "source_fps": fps,
                "seconds": seconds, "frames": over["published"], "load_average_1min": load_average(),
            },
            "figures": {
                "forward_ms": round(forward, 3),
                "age_p50_ms": round(percentile(age, 50), 3),
                "age_p99_ms": round(percentile(age, 99), 3),
                "age_p99_per_forward": round(percentile(age, 99) / forward, 3),
                "published_fps": round((over["published"] - 1) / over["span_s"], 3),
                "captured_fps": round((over["captured"] - 1) / over["span_s"], 3),
                "rss_start_mib": o_start["rss_mib"], "rss_end_mib": o_end["rss_mib"],
            },
            "fractions": {"dropped": round(1 - over["published"] / over["captured"], 4)},
            "trends": {
                "age_drift_ms_per_min": round(slope_per_minute(over["capture_times"], age), 4),
                "rss_growth_percent": round(100 * (o_end["rss_mib"] - o_start["rss_mib"]) / o_start["rss_mib"], 3),
            },
        }
    return sections


def table(sections: Dict[str, Section]) -> List[str]:
    """Lines for whichever of latency, overload and memory ``sections`` holds."""
    lines = []
    for name in ("latency", "overload", "memory"):
        if name not in sections:
            continue
        s = sections[name]
        values = {**s["figures"], **s.get("fractions", {}), **s.get("trends", {})}
        lines.append(f"{name}: " + ", ".join(f"{k} {v:g}" for k, v in values.items()))
        if name == "memory":
            per = s["setup"]["per_process_end"]
            lines.append("  per process at the end (RSS/PSS MiB): " + ", ".join(
                f"{k} {v['rss_mib']:g}/{v['pss_mib']:g}" for k, v in sorted(per.items())))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode_arguments(parser)
    args = parser.parse_args(argv)
    return output(run("smoke" if args.smoke else "long" if args.long else "full"), table, args.json)


if __name__ == "__main__":
    sys.exit(main())
