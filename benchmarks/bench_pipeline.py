"""Throughput: a bare single-process loop against ``edgepipe run`` on the same video file.

The bare loop is what a user writes by hand, in one process: decode a frame (OpenCV), convert to
gray and letterbox it, run the detector, NMS, scale the boxes back. The pipeline is ``edgepipe
run`` on the same file with the first-party stages (``file`` -> ``letterbox`` -> ``yolov5`` ->
``nms`` -> ``jsonl``) in ``block`` mode, so it loses no frame. Both use the same weights (the
untrained model built from seed 0), the same image size and the same detector backend, built
and threaded the way the ``yolov5`` stage does it. Throughput is frames per second between the
first and the last result (start-up and pipeline fill excluded), median over repeats; bare and
pipeline alternate within each repeat, and the ratio pipeline / bare is the figure that counts
(goal >= 1.0 on 2 cores, higher where decode, letterbox and NMS overlap inference).

    python -m benchmarks.bench_pipeline [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .common import (
    DaemonRun,
    Section,
    free_local_port,
    load_average,
    median,
    mode_arguments,
    output,
    publish_times,
    read_jsonl,
    run_module,
    scrape,
    stage_rates,
    steady_rate,
    tempdir,
    write_video,
)

CONF, IOU = 0.25, 0.45
# (cfg, imgsz, backend, frames) per mode, on a video of VIDEO_SIZE[mode].
CASES: Dict[str, List[Tuple[str, int, str, int]]] = {
    "smoke": [("yolov5n", 64, "auto", 12)],
    "full": [
        ("yolov5n", 320, "auto", 300),
        ("yolov5n", 320, "torch", 150),
        ("yolov5s-r5.0", 640, "auto", 60),
    ],
}
VIDEO_SIZE = {"smoke": (160, 120), "full": (640, 480)}
# The reference comparison: (video w, h, frames, imgsz) per mode, the reference checkpoint.
REFERENCE_CASE = {"smoke": (160, 120, 12, 64), "full": (1280, 720, 60, 640)}
REF_MAX_DET = 1000  # the reference detect script's default


def bare_loop(video: str, cfg: str, imgsz: int, backend: str, frames: int) -> Dict[str, Any]:
    """The hand-written loop (run in a fresh interpreter); frames per second and the backend."""
    from edgepipe.yolo.backends import prepare_process

    prepare_process()  # as the yolov5 stage does, before torch loads
    import cv2

    from edgepipe.yolo.detector import Detector

    # The stage's weights: null, seed: 0, loaded and warmed up the way the stage does it.
    detector = Detector.load(cfg=cfg, seed=0, device="cpu", backend=backend, imgsz=imgsz,
                             conf_thres=CONF, iou_thres=IOU)
    cap = cv2.VideoCapture(video)
    done: List[float] = []
    boxes = 0
    while len(done) < frames:
        ok, image = cap.read()
        if not ok:
            break
        boxes += len(detector(image))  # gray, letterbox, forward, NMS, boxes in frame pixels
        done.append(time.time())
    cap.release()
    return {"fps": steady_rate(done), "frames": len(done), "boxes": boxes, "backend": detector.backend.name}


def reference_fixture() -> Optional[Path]:
    """The reference checkpoint (a yolov5s state dict, shared/fixtures/ beside the checkout, or
    $EDGEPIPE_REF_FIXTURE), or None where it is not on this machine."""
    import os

    env = os.environ.get("EDGEPIPE_REF_FIXTURE")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "yolov5s-v5.0-ch1-ref.pt"
    return path if path.is_file() else None


def reference_loop(video: str, weights: str, imgsz: int, frames: int) -> Dict[str, Any]:
    """The reference YOLOv5 v7.0 code's own single-process loop, written as a user of its
    detect script would (run in a fresh interpreter, with torch's default threading: no
    ``prepare_process``): OpenCV decode, gray, letterbox with minimal padding (``auto=True``,
    stride 32), fp32 torch forward of the fused model at batch 1, NMS (conf 0.25, IoU 0.45,
    max_det 1000), boxes scaled back. Nothing of the reference is imported: our letterbox, NMS
    and box scaling behave as its functions do, and the model is our build of the same
    architecture loaded from the reference state dict."""
    import cv2
    import torch

    from edgepipe.yolo import letterbox, load_model, non_max_suppression, scale_boxes

    model = load_model(weights, device="cpu", fuse=True, half=False)  # .fuse().eval(), fp32
    cap = cv2.VideoCapture(video)
    done: List[float] = []
    boxes = 0
    with torch.no_grad():
        while len(done) < frames:
            ok, im0 = cap.read()
            if not ok:
                break
            gray = cv2.cvtColor(im0, cv2.COLOR_BGR2GRAY)
            im = letterbox(gray, imgsz, stride=32, auto=True)[0]
            x = torch.from_numpy(im).float()[None, None] / 255  # (1, 1, H, W)
            det = non_max_suppression(model(x), 0.25, 0.45, None, False, max_det=REF_MAX_DET)[0]
            if len(det):
                det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], gray.shape).round()
            boxes += len(det)
            done.append(time.time())
    cap.release()
    return {"fps": steady_rate(done), "frames": len(done), "boxes": boxes, "threads": torch.get_num_threads()}


def reference_pipeline(video: str, weights: str, imgsz: int, frames: int, workdir: Path,
                       precision: Optional[str] = None) -> Dict[str, Any]:
    """``edgepipe run`` on the same file with the same checkpoint, default detector settings
    (``backend: auto``) or a pinned ``precision``; frames per second, each stage's own rate, the
    detector's choice."""
    out = workdir / "out.jsonl"
    port = free_local_port()
    config = pipeline_config(video, str(out), "yolov5s-r5.0", imgsz, "auto")
    config["name"] = "bench-reference"
    config["stages"]["detector"].update({"weights": weights, "precision": precision})
    config["stages"]["post"]["max_det"] = REF_MAX_DET
    config["metrics"] = {"listen": f"127.0.0.1:{port}"}
    started = time.monotonic()
    with DaemonRun(config, workdir) as daemon:
        daemon.wait_ready()
        ready = time.monotonic() - started
        last = ""
        assert daemon.proc is not None
        while daemon.proc.poll() is None:  # the file ends, the daemon drains and exits
            last = scrape(port) or last
            time.sleep(0.25)
        daemon.wait_exit(timeout=60)
        line = next((ln for ln in daemon.log.splitlines() if "ready on" in ln), "")
    messages = read_jsonl(out)
    if len(messages) != frames:
        raise RuntimeError(f"the pipeline published {len(messages)} of {frames} frames in block mode")
    return {"fps": steady_rate(sorted(publish_times(messages))), "ready_s": ready, "stages": stage_rates(last),
            "detector": line.split(": ", 1)[-1][:400], "boxes": sum(len(m["detections"]) for m in messages)}


def reference_comparison(smoke: bool, repeats: int) -> Dict[str, Any]:
    """The reference loop against ``edgepipe run``, alternating; figures and setup for the
    throughput section (goal on a 2-core x86 CPU: pipeline / reference >= 2.0)."""
    fixture = reference_fixture()
    if fixture is None:
        return {"figures": {}, "setup": {"available": False, "reason": "reference checkpoint not found "
                                         "(shared/fixtures/yolov5s-v5.0-ch1-ref.pt or $EDGEPIPE_REF_FIXTURE)"}}
    width, height, frames, imgsz = REFERENCE_CASE["smoke" if smoke else "full"]
    # auto: what a user gets; bf16: pinned, because this checkpoint's random weights find no box
    # on the gate's scenes, so the gate cannot check bf16 and auto keeps fp32 (the log says so).
    variants = {"pipeline": None} if smoke else {"pipeline": None, "pipeline_bf16": "bf16"}
    if "bf16" in variants.values() and not _bf16_here():
        variants.pop("pipeline_bf16")
    ref: List[float] = []
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in variants}
    with tempdir("ep-ref-") as tmp:
        video = str(write_video(Path(tmp) / "ref.mp4", width, height, frames))
        for r in range(repeats):
            ref.append(run_module("bench_pipeline", ["--reference", video, str(fixture), str(imgsz), str(frames)],
                                  unset=["OMP_WAIT_POLICY"])["fps"])
            for name, precision in variants.items():
                runs[name].append(reference_pipeline(video, str(fixture), imgsz, frames, Path(tmp) / f"{name}{r}", precision))
    figures = {"reference_loop_fps": round(median(ref), 3)}
    detectors = {}
    for name, pipe in runs.items():
        fps = median(p["fps"] for p in pipe)
        figures[f"reference_{name}_fps"] = round(fps, 3)
        figures[f"reference_{name}_per_reference"] = round(fps / median(ref), 3)
        figures[f"reference_{name}_ready_s"] = round(median(p["ready_s"] for p in pipe), 2)
        for stage in pipe[-1]["stages"]:
            values = [p["stages"][stage] for p in pipe if stage in p["stages"]]
            figures[f"reference_{name}_stage_{stage}_own_per_s"] = round(median(values), 2)
        detectors[name] = pipe[-1]["detector"]
    return {"figures": figures, "setup": {
        "available": True, "video": f"{width}x{height} mp4v, {frames} frames", "imgsz": imgsz,
        "checkpoint": fixture.name, "repeats": repeats, "variants": {k: v or "auto" for k, v in variants.items()},
        "detector": detectors,
        "what": "the reference YOLOv5 v7.0 loop as its users write it (OpenCV decode, gray, letterbox "
                "auto=True, fused fp32 torch, batch 1, NMS, scale) vs edgepipe run (backend auto; and "
                "precision bf16 pinned); stage own rates are calls per second of each stage's own "
                "processing time",
        "goal": "reference_pipeline_per_reference >= 2.0"}}


def _bf16_here() -> bool:
    from edgepipe.yolo.backends import cpu_has_bf16, openvino_available

    return openvino_available() and cpu_has_bf16()


def pipeline_config(video: str, out: str, cfg: str, imgsz: int, backend: str) -> Dict[str, Any]:
    return {
        "name": "bench-throughput",
        "stages": {
            "video": {"type": "file", "path": video},
            "prep": {"type": "letterbox", "inputs": ["video"], "imgsz": imgsz},
            "detector": {
                "type": "yolov5", "inputs": ["prep"], "weights": None, "cfg": cfg, "seed": 0,
                "device": "cpu", "imgsz": imgsz, "conf_thres": CONF, "backend": backend,
            },
            "post": {"type": "nms", "inputs": ["detector"], "conf_thres": CONF, "iou_thres": IOU},
            "out": {"type": "jsonl", "inputs": ["post"], "path": out},
        },
        "metrics": {"listen": "127.0.0.1:0"},
        "runtime": {"status_interval": 3600},
    }


def pipeline_run(video: str, workdir: Path, cfg: str, imgsz: int, backend: str, frames: int) -> Dict[str, Any]:
    """``edgepipe run`` over the whole file; frames per second from the publish times."""
    out = workdir / "out.jsonl"
    with DaemonRun(pipeline_config(video, str(out), cfg, imgsz, backend), workdir) as daemon:
        daemon.wait_ready()
        daemon.wait_exit(timeout=60 + frames * 5.0)
        used = "torch" if "backend torch" in daemon.log else "onnxruntime" if "backend onnxruntime" in daemon.log else "?"
    messages = read_jsonl(out)
    if len(messages) != frames:
        raise RuntimeError(f"the pipeline published {len(messages)} of {frames} frames in block mode")
    boxes = sum(len(m["detections"]) for m in messages)
    return {"fps": steady_rate(sorted(publish_times(messages))), "frames": len(messages), "boxes": boxes, "backend": used}


def run(smoke: bool = False, repeats: Optional[int] = None) -> Section:
    mode = "smoke" if smoke else "full"
    repeats = repeats or (1 if smoke else 3)
    width, height = VIDEO_SIZE[mode]
    figures: Dict[str, float] = {}
    cases = []
    loads = [load_average()]
    with tempdir("ep-tp-") as tmp:
        videos: Dict[int, str] = {}  # frames -> file: the pipeline plays a file to its end
        for cfg, imgsz, backend, frames in CASES[mode]:
            if frames not in videos:
                videos[frames] = str(write_video(Path(tmp) / f"scenes{frames}.mp4", width, height, frames))
            video = videos[frames]
            bare: List[float] = []
            pipe: List[float] = []
            for r in range(repeats):
                b = run_module("bench_pipeline", ["--bare", video, cfg, str(imgsz), backend, str(frames)])
                p = pipeline_run(video, Path(tmp) / f"run{r}-{cfg}-{imgsz}-{backend}", cfg, imgsz, backend, frames)
                if b["backend"] != p["backend"]:
                    raise RuntimeError(f"bare loop ran {b['backend']} but the pipeline {p['backend']}")
                boxes = (b["boxes"], p["boxes"])  # equal up to batching's rounding at thresholds
                bare.append(b["fps"])
                pipe.append(p["fps"])
                loads.append(load_average())
            key = f"{cfg}_{imgsz}_{backend}"
            figures[f"{key}_bare_fps"] = round(median(bare), 3)
            figures[f"{key}_pipeline_fps"] = round(median(pipe), 3)
            figures[f"{key}_pipeline_per_bare"] = round(median(pipe) / median(bare), 3)
            cases.append({"key": key, "cfg": cfg, "imgsz": imgsz, "backend": backend,
                          "resolved_backend": b["backend"], "frames": frames,
                          "boxes_bare_pipeline": list(boxes)})
    reference = reference_comparison(smoke, repeats)
    figures.update(reference["figures"])
    loads.append(load_average())
    return {
        "setup": {
            "what": "frames/s over one video file: bare single-process loop vs edgepipe run (block mode)",
            "video": f"{width}x{height} mp4v",
            "cases": cases,
            "repeats": repeats,
            "load_average_1min": loads,
            "goal": "pipeline_per_bare >= 1.0",
            "reference": reference["setup"],
        },
        "figures": figures,
    }


# ----------------------------------------------------------------------- several sources, batched


def bare_batched(sources: int, per_source: int, width: int, height: int, cfg: str, imgsz: int,
                 batch: int, device: str, backend: str) -> Dict[str, Any]:
    """The hand-written loop over ``sources`` synthetic scenes in turn, ``batch`` frames per
    forward pass (run in a fresh interpreter); frames per second after the first batch."""
    from edgepipe.yolo.backends import prepare_process

    prepare_process()
    from edgepipe.scenes import SceneStream
    from edgepipe.yolo.detector import Detector

    detector = Detector.load(cfg=cfg, seed=0, device=device, backend=backend, imgsz=imgsz,
                             conf_thres=CONF, iou_thres=IOU, max_batch=batch, auto=False)
    scenes = [SceneStream(width, height, seed=i) for i in range(sources)]
    order = [scenes[i % sources] for i in range(sources * per_source)]
    done, t_first = 0, 0.0
    for start in range(0, len(order), batch):
        detector([s.next()[0] for s in order[start : start + batch]])  # one batch of one shape
        if start == 0:
            t_first = time.time()
        else:
            done += min(batch, len(order) - start)
    return {"fps": done / (time.time() - t_first), "frames": len(order), "backend": detector.backend.name}


def multi_source_config(out: str, sources: int, per_source: int, width: int, height: int, cfg: str,
                        imgsz: int, batch: int, device: str, backend: str) -> Dict[str, Any]:
    stages: Dict[str, Any] = {
        f"cam{i}": {"type": "synthetic", "width": width, "height": height, "fps": None,
                    "count": per_source, "seed": i}
        for i in range(sources)
    }
    stages.update({
        # auto: false pads every frame to imgsz: one shape, so frames of all sources batch together
        "prep": {"type": "letterbox", "inputs": sorted(stages), "imgsz": imgsz, "auto": False},
        "detector": {"type": "yolov5", "inputs": ["prep"], "weights": None, "cfg": cfg, "seed": 0,
                     "device": device, "imgsz": imgsz, "conf_thres": CONF, "backend": backend,
                     "max_batch": batch, "max_wait_ms": 5.0},
        "post": {"type": "nms", "inputs": ["detector"], "conf_thres": CONF, "iou_thres": IOU},
        "out": {"type": "jsonl", "inputs": ["post"], "path": out},
    })
    return {"name": "bench-batching", "stages": stages, "metrics": {"listen": "127.0.0.1:0"},
            "runtime": {"status_interval": 3600}}


def multi_source_run(workdir: Path, sources: int, per_source: int, width: int, height: int, cfg: str,
                     imgsz: int, batch: int, device: str, backend: str) -> Dict[str, Any]:
    """``sources`` finite synthetic sources into one batching detector; frames per second."""
    out = workdir / "out.jsonl"
    config = multi_source_config(str(out), sources, per_source, width, height, cfg, imgsz, batch, device, backend)
    with DaemonRun(config, workdir) as daemon:
        daemon.wait_ready()
        daemon.wait_exit(timeout=60 + sources * per_source * 5.0)
    messages = read_jsonl(out)
    if len(messages) != sources * per_source:
        raise RuntimeError(f"the pipeline published {len(messages)} of {sources * per_source} frames")
    return {"fps": steady_rate(sorted(publish_times(messages))), "frames": len(messages)}


# (sources, frames per source, frame w, h, cfg, imgsz, batch) per mode, on the CPU.
BATCH_CASES = {
    "smoke": [(3, 8, 160, 120, "yolov5n", 64, 4)],
    "full": [(3, 60, 640, 480, "yolov5n", 320, 4)],
}


def batching(smoke: bool = False, device: str = "cpu", backend: str = "auto",
             cases: Optional[Sequence[Tuple[int, int, int, int, str, int, int]]] = None,
             repeats: Optional[int] = None) -> Section:
    """Several sources into one detector vs the bare loop at the same batch size."""
    cases = cases or BATCH_CASES["smoke" if smoke else "full"]
    repeats = repeats or (1 if smoke else 3)
    figures: Dict[str, float] = {}
    keys = []
    with tempdir("ep-batch-") as tmp:
        for n, per, w, h, cfg, imgsz, batch in cases:
            bare: List[float] = []
            pipe: List[float] = []
            for r in range(repeats):
                args = [str(v) for v in (n, per, w, h, cfg, imgsz, batch, device, backend)]
                bare.append(run_module("bench_pipeline", ["--bare-batched", *args])["fps"])
                workdir = Path(tmp) / f"run{r}-{n}-{cfg}-{imgsz}-{batch}"
                pipe.append(multi_source_run(workdir, n, per, w, h, cfg, imgsz, batch, device, backend)["fps"])
            key = f"{n}src_{cfg}_{imgsz}_b{batch}"
            figures[f"{key}_bare_fps"] = round(median(bare), 3)
            figures[f"{key}_pipeline_fps"] = round(median(pipe), 3)
            figures[f"{key}_pipeline_per_bare"] = round(median(pipe) / median(bare), 3)
            keys.append(key)
    return {
        "setup": {
            "what": "N finite synthetic sources into one batching detector vs a bare loop batching the same frames",
            "device": device, "backend": backend, "cases": keys, "repeats": repeats,
        },
        "figures": figures,
    }


def table(section: Section) -> List[str]:
    f = section["figures"]
    lines = [f"{'case':>28}  {'backend':>11}  {'bare fps':>9}  {'pipeline fps':>12}  {'pipeline/bare':>13}"]
    for case in section["setup"]["cases"]:
        k = case["key"]
        lines.append(
            f"{k:>28}  {case['resolved_backend']:>11}  {f[k + '_bare_fps']:>9.2f}  {f[k + '_pipeline_fps']:>12.2f}  "
            f"{f[k + '_pipeline_per_bare']:>13.3f}"
        )
    ref = section["setup"].get("reference", {})
    if ref.get("available"):
        lines.append(f"reference loop ({ref['video']}, imgsz {ref['imgsz']}, {ref['checkpoint']}): "
                     f"{f['reference_loop_fps']:.2f} fps")
        for name, how in ref["variants"].items():
            prefix = f"reference_{name}_stage_"
            own = ", ".join(f"{k[len(prefix):-len('_own_per_s')]} {v:g}/s" for k, v in f.items() if k.startswith(prefix))
            lines.append(f"  edgepipe run ({how}): {f[f'reference_{name}_fps']:.2f} fps = "
                         f"{f[f'reference_{name}_per_reference']:.2f}x, ready in {f[f'reference_{name}_ready_s']:g} s; "
                         f"stage own rates: {own}")
            lines.append(f"    detector: {ref['detector'][name]}")
    elif ref:
        lines.append(f"reference comparison: not measured: {ref['reason']}")
    return lines


def table_batching(section: Section) -> List[str]:
    f = section["figures"]
    lines = [f"{'case':>28}  {'bare fps':>9}  {'pipeline fps':>12}  {'pipeline/bare':>13}"]
    for k in section["setup"]["cases"]:
        lines.append(f"{k:>28}  {f[k + '_bare_fps']:>9.2f}  {f[k + '_pipeline_fps']:>12.2f}  {f[k + '_pipeline_per_bare']:>13.3f}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode_arguments(parser, long=False)
    parser.add_argument("--repeats", type=int, default=None, help="repeats per case (default 3, smoke 1)")
    parser.add_argument("--bare", nargs=5, metavar=("VIDEO", "CFG", "IMGSZ", "BACKEND", "FRAMES"),
                        help=argparse.SUPPRESS)  # the bare loop's own interpreter
    parser.add_argument("--bare-batched", nargs=9, help=argparse.SUPPRESS)
    parser.add_argument("--reference", nargs=4, metavar=("VIDEO", "WEIGHTS", "IMGSZ", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:
        video, weights, imgsz, frames = args.reference
        print(json.dumps(reference_loop(video, weights, int(imgsz), int(frames))))
        return 0
    if args.bare_batched:
        n, per, w, h, cfg, imgsz, batch, device, backend = args.bare_batched
        print(json.dumps(bare_batched(int(n), int(per), int(w), int(h), cfg, int(imgsz), int(batch), device, backend)))
        return 0
    if args.bare:
        video, cfg, imgsz, backend, frames = args.bare
        print(json.dumps(bare_loop(video, cfg, int(imgsz), backend, int(frames))))
        return 0
    return output(run(args.smoke, args.repeats), table, args.json)


if __name__ == "__main__":
    sys.exit(main())
