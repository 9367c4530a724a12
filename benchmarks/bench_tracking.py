"""Tracking, measured: the ``tracker`` stage on the demo model's detections of generated scenes
whose objects have a known identity, scored with py-motmetrics; and what tracker + zones cost
per frame.

Accuracy. Each scene is a :class:`edgepipe.scenes.SceneStream` (objects moving, crossing and
hiding each other, leaving the frame and new ones coming in: ``exits``), run through the real
stages in this process: ``letterbox`` -> ``yolov5`` (``builtin:demo``, onnxruntime on the CPU) ->
``nms``, once, then the ``tracker`` (with the thresholds and options of configs/demo.yaml, read
from that file, and again with the stage's own defaults beside them) on every frame ("10 fps": frame ids 0, 1, 2, ...) and again on
every other frame ("5 fps", ids 0, 2, 4, ...: what a ``latest`` link does behind a slow stage;
the motion model must step two periods at a time). Ground truth and tracker output are matched
per frame at IoU >= 0.5 (motmetrics' accumulator; the IoU is computed here, because motmetrics
1.4's own ``iou_matrix`` calls ``np.asfarray``, gone from numpy 2). Reported: MOTA, IDF1, ID
switches, switches per 100 ground-truth tracks, and the counts behind them.

Cost. 50 objects moving on straight lines with jitter (as detections, no picture), through the
``tracker`` and a ``zones`` stage with two zones and two lines, timed per frame after a warm-up.

    python -m benchmarks.bench_tracking                    # the numbers of benchmarks/README.md
    python -m benchmarks.bench_tracking --smoke            # a few seconds
    python -m benchmarks.bench_tracking --seeds 201-206    # accuracy on other scenes
    python -m benchmarks.bench_tracking --weights runs/x/x.safetensors   # another model of the demo classes
    python -m benchmarks.bench_tracking --compare main     # cost of main's stages beside this checkout's
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgepipe.messages import Frame
from edgepipe.scenes import CLASSES, SceneStream
from edgepipe.stage import StageContext
from edgepipe.yamlfile import read_yaml

__all__ = ["CostCase", "Scene", "accuracy", "compare", "cost", "demo_settings", "detect_scene", "evaluate", "run",
           "track_scene"]

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")

Scene = Tuple[int, int, int, int, int]  # width, height, seed, objects, frames
# The demo's scene at half its size: configs/demo.yaml shows 6 objects of 28 to 300 px in
# 1280x720 frames letterboxed to 640x384; these are 6 objects of 14 to 150 px (SceneStream's
# default sizes for 640x360) in 640x360 frames, which reach the model as the same 640x384 input
# with objects of the same size in it. The objects leave the frame and new ones come in.
WIDTH, HEIGHT, IMGSZ, OBJECTS = 640, 360, 640, 6
FPS = 10.0
FULL_SCENES: List[Scene] = [(WIDTH, HEIGHT, seed, OBJECTS, 300) for seed in (101, 102, 103, 104, 105, 106)]
SMOKE_SCENES: List[Scene] = [(WIDTH, HEIGHT, 101, OBJECTS, 60)]

FrameData = Tuple[np.ndarray, np.ndarray, List[int]]  # detections (n, 6), truth (m, 5), truth ids


def demo_settings() -> Dict[str, Dict[str, Any]]:
    """What this benchmark takes from configs/demo.yaml, as written there: the ``yolov5`` and
    ``nms`` stages' thresholds and the ``tracker`` stage's options (``detector``, ``nms``,
    ``tracker``); what the file leaves out is the stage's default."""
    stages = read_yaml(DEMO_CONFIG)["stages"]
    by_type = {raw["type"]: raw for raw in stages.values()}
    tracker = {k: v for k, v in by_type["tracker"].items() if k not in ("type", "inputs")}
    return {
        "detector": {k: by_type["yolov5"][k] for k in ("conf_thres",) if k in by_type["yolov5"]},
        "nms": {k: by_type["nms"][k] for k in ("conf_thres", "iou_thres") if k in by_type["nms"]},
        "tracker": tracker,
    }


def _stages(weights: str = "builtin:demo") -> Tuple[Any, Any, Any]:
    from edgepipe_plugins.processors.letterbox import LetterboxConfig, LetterboxStage
    from edgepipe_plugins.processors.nms import NmsConfig, NmsStage
    from edgepipe_plugins.processors.yolov5 import YoloV5Config, YoloV5Stage

    demo = demo_settings()
    prep = LetterboxStage(LetterboxConfig(imgsz=IMGSZ), StageContext("prep"))
    det = YoloV5Stage(YoloV5Config(weights=weights, device="cpu", imgsz=IMGSZ, threads=1, **demo["detector"]),
                      StageContext("detector"))
    post = NmsStage(NmsConfig(**demo["nms"]), StageContext("post"))
    for s in (prep, det, post):
        s.start()
    return prep, det, post


def detect_scene(scene: Scene, stages: Optional[Tuple[Any, Any, Any]] = None) -> List[FrameData]:
    """The demo model's detections (at the demo's thresholds: conf >= 0.1, what the tracker's
    low threshold can use) and the truth of every frame of ``scene``."""
    width, height, seed, objects, frames = scene
    prep, det, post = stages or _stages()
    stream = SceneStream(width, height, seed=seed, objects=objects, exits=True)
    out: List[FrameData] = []
    for i in range(frames):
        image, truth = stream.next()
        ids = list(stream.last_ids)
        f = Frame("scene", i, i / FPS, image=image)
        for stage in (prep, det, post):
            (f,) = stage.process([f])
        out.append((np.array(f.detections, np.float32), truth, ids))
    return out


def track_scene(data: Sequence[FrameData], step: int = 1, **options: Any) -> List[Tuple[List[int], np.ndarray, List[Optional[int]], np.ndarray]]:
    """The tracker (the stage's defaults, or ``options``) on every ``step``-th frame: per frame
    (truth ids, truth boxes, track ids, detection boxes)."""
    from edgepipe_plugins.processors.tracker import TrackerConfig, TrackerStage

    tracker = TrackerStage(TrackerConfig(**options), StageContext("track"))
    tracker.start()
    out = []
    for i in range(0, len(data), step):
        dets, truth, ids = data[i]
        f = Frame("scene", i, i / FPS, width=WIDTH, height=HEIGHT, detections=dets.copy(), names=list(CLASSES))
        tracker.process([f])
        out.append((ids, truth[:, 1:5], list(f.track_ids or []), dets[:, :4]))
    return out


def _accumulate(tracked: Sequence[Tuple[List[int], np.ndarray, List[Optional[int]], np.ndarray]]) -> Any:
    """A motmetrics accumulator of one tracked scene: truth and tracks matched at IoU >= 0.5."""
    import motmetrics as mm
    from edgepipe_plugins.processors.tracker.bytetrack import iou_matrix

    acc = mm.MOTAccumulator(auto_id=True)
    for truth_ids, truth_boxes, track_ids, boxes in tracked:
        keep = [k for k, t in enumerate(track_ids) if t is not None]
        iou = iou_matrix(truth_boxes, boxes[keep])
        acc.update(truth_ids, [track_ids[k] for k in keep], np.where(iou >= 0.5, 1.0 - iou, np.nan))
    return acc


def evaluate(tracked: Sequence[Tuple[List[int], np.ndarray, List[Optional[int]], np.ndarray]]) -> Dict[str, float]:
    """MOTA, IDF1, ID switches (py-motmetrics) of one tracked scene."""
    return _summary([_accumulate(tracked)])


def _summary(accs: List[Any]) -> Dict[str, float]:
    import motmetrics as mm

    mh = mm.metrics.create()
    names = ["mota", "idf1", "num_switches", "num_unique_objects", "num_misses", "num_false_positives",
             "num_frames", "mostly_tracked"]
    df = mh.compute_many(accs, metrics=names, generate_overall=True)
    row = df.loc["OVERALL"]
    gt = float(row["num_unique_objects"])
    return {
        "mota": round(float(row["mota"]), 4),
        "idf1": round(float(row["idf1"]), 4),
        "id_switches": int(row["num_switches"]),
        "switches_per_100_tracks": round(100.0 * float(row["num_switches"]) / max(gt, 1.0), 3),
        "ground_truth_tracks": int(gt),
        "misses": int(row["num_misses"]),
        "false_positives": int(row["num_false_positives"]),
        "frames": int(row["num_frames"]),
        "mostly_tracked": int(row["mostly_tracked"]),
    }


RATES = (("10fps", 1), ("5fps_every_other_frame_dropped", 2))


def accuracy(scenes: Sequence[Scene], weights: str = "builtin:demo",
             trackers: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Both frame rates over all ``scenes`` (one detector pass each), per tracker option set
    of ``trackers`` (name -> options; default ``{"demo": <configs/demo.yaml's>}``)."""
    trackers = trackers if trackers is not None else {"demo": demo_settings()["tracker"]}
    stages = _stages(weights)
    accs: Dict[str, Dict[str, List[Any]]] = {name: {key: [] for key, _ in RATES} for name in trackers}
    for scene in scenes:
        data = detect_scene(scene, stages)
        for name, options in trackers.items():
            for key, step in RATES:
                accs[name][key].append(_accumulate(track_scene(data, step, **options)))
    return {name: {key: _summary(a) for key, a in by_rate.items()} for name, by_rate in accs.items()}


class CostCase:
    """``objects`` boxes on straight paths with a pixel of jitter, as detection arrays."""

    def __init__(self, objects: int = 50, width: int = 1280, height: int = 720, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.size = rng.uniform(30, 90, objects)
        self.start = rng.uniform([0, 0], [width, height], (objects, 2))
        self.velocity = rng.uniform(-4, 4, (objects, 2))
        self.classes = rng.integers(0, len(CLASSES), objects)
        self.width, self.height = width, height
        self.rng = rng

    def detections(self, i: int) -> np.ndarray:
        centre = (self.start + i * self.velocity) % [self.width, self.height]
        centre += self.rng.normal(0, 1.0, centre.shape)
        half = self.size[:, None] / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        conf = self.rng.uniform(0.3, 0.95, len(boxes))
        return np.concatenate([boxes, conf[:, None], self.classes[:, None]], axis=1).astype(np.float32)


def _cost_stages(tracker_module: Any = None, zones_module: Any = None,
                 runtime_dir: Optional[str] = None) -> Tuple[Any, Any]:
    """A started ``tracker`` and ``zones`` stage (two zones, two lines) from the given modules
    (default: this checkout's); with ``runtime_dir`` the tracker keeps its state there, as in
    the daemon."""
    from edgepipe_plugins.processors import tracker as own_tracker
    from edgepipe_plugins.processors import zones as own_zones

    tm, zm = tracker_module or own_tracker, zones_module or own_zones
    # The stage's defaults, not the demo's new_track_thresh of 0.88: these detections' confidences
    # are drawn from 0.3 to 0.95, and the cost is that of tracking all 50.
    tracker = tm.TrackerStage(tm.TrackerConfig(), StageContext("track", runtime_dir=runtime_dir))
    zones = zm.ZonesStage(zm.ZonesConfig.model_validate({
        "zones": {"left": {"polygon": [[0.05, 0.1], [0.45, 0.1], [0.45, 0.9], [0.05, 0.9]], "loiter": 5},
                  "right": {"polygon": [[0.55, 0.1], [0.95, 0.2], [0.9, 0.9], [0.6, 0.8]]}},
        "lines": {"middle": {"points": [[0.5, 0.0], [0.5, 1.0]]}, "across": {"points": [[0.0, 0.5], [1.0, 0.5]]}},
    }), StageContext("zones"))
    tracker.start()
    zones.start()
    return tracker, zones


def _time_frames(objects: int, frames: int, warmup: int, modules: Tuple[Any, Any] = (None, None)) -> Dict[str, Any]:
    """Per-frame CPU seconds of tracker and zones, wall seconds of both, and tracks per frame.
    The tracker keeps its state in a temporary directory, as it does in the daemon's runtime
    directory (what it writes there before a frame leaves is part of its cost)."""
    import shutil
    import tempfile

    case = CostCase(objects)
    runtime_dir = tempfile.mkdtemp(prefix="edgepipe-bench-run-")
    try:
        return _timed(case, frames, warmup, _cost_stages(*modules, runtime_dir=runtime_dir))
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def _timed(case: CostCase, frames: int, warmup: int, stages: Tuple[Any, Any]) -> Dict[str, Any]:
    tracker, zones = stages
    # Capture times from now on, as a camera's: zones takes a track first seen before it started
    # for one it inherited from a restart (no events), which times from 0 would all look like.
    start = time.time()
    t_track: List[float] = []
    t_zones: List[float] = []
    wall: List[float] = []
    tracks = 0
    for i in range(frames + warmup):
        f = Frame("scene", i, start + i / FPS, width=case.width, height=case.height, detections=case.detections(i),
                  names=list(CLASSES))
        w0, t0 = time.perf_counter(), time.process_time()
        tracker.process([f])
        t1 = time.process_time()
        zones.process([f])
        t2, w2 = time.process_time(), time.perf_counter()
        if i >= warmup:
            t_track.append(t1 - t0)
            t_zones.append(t2 - t1)
            wall.append(w2 - w0)
            tracks += sum(t is not None for t in f.track_ids or [])
    return {"tracker": t_track, "zones": t_zones, "wall": wall, "tracked": tracks}


def _cost_figures(objects: int, frames: int, t: Dict[str, Any]) -> Dict[str, float]:
    both = np.array(t["tracker"]) + np.array(t["zones"])
    return {
        "objects": objects,
        "tracked_per_frame": round(t["tracked"] / frames, 1),
        "tracker_us_median": round(1e6 * float(np.median(t["tracker"])), 1),
        "zones_us_median": round(1e6 * float(np.median(t["zones"])), 1),
        "both_us_median": round(1e6 * float(np.median(both)), 1),
        "both_us_mean": round(1e6 * float(np.mean(both)), 1),
        "both_us_p95": round(1e6 * float(np.percentile(both, 95)), 1),
        "both_wall_us_median": round(1e6 * float(np.median(t["wall"])), 1),
    }


def cost(objects: int = 50, frames: int = 600, warmup: int = 50) -> Dict[str, float]:
    """Median and p95 microseconds per frame of tracker, zones, and both, for ``objects``: CPU
    time of this process (``time.process_time``), which other work on a shared machine does
    not inflate the way it does wall time; the wall-clock median is given beside it."""
    return _cost_figures(objects, frames, _time_frames(objects, frames, warmup))


def _modules_at(rev: str) -> Tuple[Any, Any]:
    """The ``tracker`` and ``zones`` modules as they are at git revision ``rev``: its
    plugins/processors files (the two stages and what they import from the folder) extracted to
    a temporary directory and imported under another package name, beside this checkout's."""
    import atexit
    import importlib
    import shutil
    import subprocess
    import tarfile
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    paths = ["plugins/processors/__init__.py", "plugins/processors/_common.py",
             "plugins/processors/tracker", "plugins/processors/zones"]
    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # the stages import from it until the end
    archive = tmp / "ref.tar"
    subprocess.run(["git", "-C", str(root), "archive", "-o", str(archive), rev, *paths], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp)
    package = "edgepipe_bench_" + "".join(c if c.isalnum() else "_" for c in rev)
    (tmp / "plugins").rename(tmp / package)
    (tmp / package / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp))
    return (importlib.import_module(f"{package}.processors.tracker"),
            importlib.import_module(f"{package}.processors.zones"))


def compare(rev: str, objects: int = 50, frames: int = 600, warmup: int = 50, rounds: int = 3) -> Dict[str, Any]:
    """The cost of the stages at git revision ``rev`` and of this checkout's, measured side by
    side in this process: ``rounds`` runs of each, alternating which goes first, so that the load
    of a shared machine falls on both alike; medians over all their frames."""
    ref = _modules_at(rev)
    times: Dict[str, Dict[str, Any]] = {}
    load = [round(os.getloadavg()[0], 2)]
    for r in range(rounds):
        order = [(rev, ref), ("this checkout", (None, None))]
        for name, modules in order if r % 2 == 0 else order[::-1]:
            t = _time_frames(objects, frames, warmup, modules)
            acc = times.setdefault(name, {"tracker": [], "zones": [], "wall": [], "tracked": 0})
            for key in ("tracker", "zones", "wall"):
                acc[key] += t[key]
            acc["tracked"] += t["tracked"]
    load.append(round(os.getloadavg()[0], 2))
    out: Dict[str, Any] = {name: _cost_figures(objects, frames * rounds, t) for name, t in times.items()}
    out["load_average_1min_start_end"] = load
    out["rounds"] = rounds
    return out


def run(smoke: bool = False, scenes: Optional[Sequence[Scene]] = None,
        weights: str = "builtin:demo") -> Dict[str, Any]:
    """The ``tracking`` section of ``benchmarks.run``: accuracy at both frame rates and the cost."""
    scenes = scenes or (SMOKE_SCENES if smoke else FULL_SCENES)
    t0 = time.time()
    found = accuracy(scenes, weights, {"demo": demo_settings()["tracker"], "stage_defaults": {}})
    acc = found["demo"]
    c = cost(frames=100 if smoke else 600)
    # Figures are positive by the document's rules, so the switch counts (often 0) stay in
    # setup.accuracy beside MOTA and IDF1, which go to fractions.
    figures: Dict[str, float] = {k: v for k, v in c.items() if k != "objects"}
    fractions: Dict[str, float] = {}
    for key, r in acc.items():
        fractions[f"idf1_{key}"] = max(0.0, r["idf1"])
        fractions[f"mota_{key}"] = max(0.0, r["mota"])
    return {
        "setup": {
            "what": "tracker accuracy on the demo model's detections (py-motmetrics, IoU >= 0.5) and "
                    "tracker + zones cost per frame (benchmarks/bench_tracking.py)",
            "scenes": [dict(zip(("width", "height", "seed", "objects", "frames"), s)) for s in scenes],
            "imgsz": IMGSZ, "weights": weights, "demo_settings": demo_settings(), "accuracy": acc,
            "accuracy_with_the_tracker_defaults": found["stage_defaults"],
            "cost_objects": c["objects"], "seconds": round(time.time() - t0, 1),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "figures": figures,
        "fractions": fractions,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one short scene, a short cost run")
    parser.add_argument("--seeds", help="scene seeds for the accuracy part, e.g. 201-206 or 101,104 "
                        "(default: 101-106, 300 frames each)")
    parser.add_argument("--weights", default="builtin:demo",
                        help="the detector for the accuracy part: a 1-channel model of the demo's four classes "
                             "(default builtin:demo)")
    parser.add_argument("--cost-only", action="store_true", help="only the cost part")
    parser.add_argument("--compare", metavar="REV", help="only the cost part: the stages at git revision "
                        "REV (e.g. main) and this checkout's, side by side in one run")
    parser.add_argument("--frames", type=int, default=600, help="timed frames per cost run (default 600)")
    parser.add_argument("--rounds", type=int, default=3, help="cost runs of each side with --compare (default 3)")
    args = parser.parse_args(argv)
    if args.compare:
        print(json.dumps(compare(args.compare, frames=args.frames, rounds=args.rounds), indent=2))
    elif args.cost_only:
        print(json.dumps(dict(cost(frames=args.frames), load_average_1min=round(os.getloadavg()[0], 2)), indent=2))
    else:
        scenes = None
        if args.seeds:
            seeds: List[int] = []
            for part in args.seeds.split(","):
                lo, _, hi = part.partition("-")
                seeds += list(range(int(lo), int(hi or lo) + 1))
            scenes = [(WIDTH, HEIGHT, seed, OBJECTS, 300) for seed in seeds]
        print(json.dumps(run(args.smoke, scenes, args.weights), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
