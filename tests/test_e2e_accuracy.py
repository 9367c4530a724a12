"""End to end, measured: the demo model in a real daemon finds the shapes where they are.

One daemon runs two finite ``synthetic`` sources with held-out seeds (the scene video is never
used for training, whose batches come from ``render_scene`` with seed 0), a landscape 1280x720
and a portrait 720x1280 one with objects of 28 to 300 frame pixels, through one letterbox
(padded to exactly 640x640, so frames of both sources share detector batches), the packaged
demo model (``builtin:demo``), NMS and ``zmq_pub``. The detections are read from the ZeroMQ
topic like any subscriber would, the ground truth is regenerated from the same seeds
(:class:`edgepipe.scenes.SceneStream` is deterministic), and mAP@0.5 (tools/metrics.py, COCO's
101-point interpolation) must reach 0.85 per source. Links block on a finite source, so every
frame must arrive, once, in order. This checks letterbox, batching across sources, coordinate
mapping back to each frame and NMS together; when the mAP is too low, the failure message also
gives the mAP of the same model run directly on the same frames (edgepipe.yolo, no daemon), which
says whether the pipeline or the model is at fault.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from helpers.daemon import Daemon, Subscriber
from helpers.net import free_port

from edgepipe.scenes import CLASSES, SceneStream
from tools.metrics import DetectionStats

FRAMES = 80  # per source
OBJECTS = 10  # per source: over 80 frames they move, turn and occlude each other
IMGSZ = 640
MIN_MAP50 = 0.85
# Held-out scene seeds (chosen before measuring; the model never saw these videos).
SOURCES: Dict[str, Tuple[int, int, int]] = {  # name: (width, height, seed)
    "landscape": (1280, 720, 4242),
    "portrait": (720, 1280, 4343),
}
CONF_THRES, IOU_THRES, MAX_DET = 0.001, 0.6, 300  # the usual settings for measuring mAP


def truth_frames(name: str) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(image, truth) of every frame the source ``name`` produces, regenerated from its seed."""
    width, height, seed = SOURCES[name]
    stream = SceneStream(width, height, seed=seed, objects=OBJECTS)
    return [stream.next() for _ in range(FRAMES)]


def detections_array(message: Dict[str, Any]) -> np.ndarray:
    """A detection message's boxes as (n, 6) x1, y1, x2, y2, conf, class."""
    rows = [d["bbox"] + [d["confidence"], d["class_id"]] for d in message["detections"]]
    return np.array(rows, np.float64).reshape(-1, 6)


def map50(pairs: List[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Any]:
    stats = DetectionStats(len(CLASSES))
    for det, truth in pairs:
        stats.add(det, truth)
    return stats.summary(CLASSES)


def direct_map50(frames: List[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Any]:
    """The same model on the same frames without the daemon (diagnosis for a failure)."""
    import torch

    from edgepipe.yolo import letterbox, load_model, non_max_suppression, scale_boxes

    model = load_model("builtin:demo", device="cpu", half=False)
    pairs = []
    with torch.no_grad():
        for image, truth in frames:
            lb, ratio, pad = letterbox(image, IMGSZ, auto=False)
            pred = model(torch.from_numpy(lb)[None, None].float() / 255.0)
            det = non_max_suppression(pred, CONF_THRES, IOU_THRES, max_det=MAX_DET)[0].numpy()
            det[:, :4] = scale_boxes(lb.shape[:2], det[:, :4], image.shape[:2], (ratio, pad))
            pairs.append((det, truth))
    return map50(pairs)


@pytest.mark.slow
def test_demo_model_through_the_daemon_reaches_map50_085_landscape_and_portrait(tmp_path: Path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    stages: Dict[str, Any] = {
        name: {"type": "synthetic", "width": w, "height": h, "fps": None, "count": FRAMES,
               "seed": seed, "objects": OBJECTS}
        for name, (w, h, seed) in SOURCES.items()
    }
    stages.update(
        prep={"type": "letterbox", "inputs": list(SOURCES), "imgsz": IMGSZ, "auto": False},
        detector={"type": "yolov5", "inputs": ["prep"], "weights": "builtin:demo", "device": "cpu",
                  "imgsz": IMGSZ, "conf_thres": CONF_THRES, "max_batch": 4, "max_wait_ms": 50},
        post={"type": "nms", "inputs": ["detector"], "conf_thres": CONF_THRES,
              "iou_thres": IOU_THRES, "max_det": MAX_DET},
        publish={"type": "zmq_pub", "inputs": ["post"], "bind": endpoint},
    )
    config = {"name": "e2e-accuracy", "stages": stages}

    batched = False
    with Subscriber(endpoint) as sub, Daemon(config, tmp_path) as daemon:
        daemon.wait_ready(timeout=180)
        deadline = time.monotonic() + 600
        while daemon.proc is not None and daemon.proc.poll() is None and time.monotonic() < deadline:
            if not batched:
                try:
                    count = daemon.sample("edgepipe_detector_batch_size_count", stage="detector") or 0
                    single = daemon.sample("edgepipe_detector_batch_size_bucket", stage="detector", le="1") or 0
                except OSError:  # the endpoint closes as the finished daemon exits
                    count = single = 0
                batched = count > single
            time.sleep(0.2)
        assert daemon.wait(timeout=60) == 0, daemon.log
        daemon.assert_no_leftovers()
        daemon.wait_for_line(rf"Finished in .*publish {FRAMES * len(SOURCES)} frames", timeout=5)
        # The last messages were sent before the publisher exited; give the SUB thread a moment.
        sub.wait_for(lambda ms: len(ms) >= FRAMES * len(SOURCES), timeout=10)
        messages = [m for _, m in sub.snapshot()]
    assert batched, "the detector never ran a batch of more than one frame"

    failures = []
    for name, (width, height, _seed) in SOURCES.items():
        got = [m for m in messages if m["source"] == name]
        assert [m["frame_id"] for m in got] == list(range(FRAMES)), f"{name}: frames lost or reordered"
        assert all((m["width"], m["height"]) == (width, height) for m in got)
        frames = truth_frames(name)
        result = map50([(detections_array(m), truth) for m, (_img, truth) in zip(got, frames)])
        print(f"{name} {width}x{height}: daemon mAP@0.5 {result['mAP50']:.4f}, "
              f"mAP@0.5:0.95 {result['mAP50_95']:.4f}, per class {result['per_class_AP50']}, "
              f"truth {result['ground_truth']}")
        if result["mAP50"] < MIN_MAP50:
            direct = direct_map50(frames)
            failures.append(
                f"{name} {width}x{height}: mAP@0.5 {result['mAP50']:.4f} < {MIN_MAP50} through the "
                f"daemon (per class {result['per_class_AP50']}); the model run directly on the same "
                f"frames: {direct['mAP50']:.4f} (per class {direct['per_class_AP50']})"
            )
    assert not failures, "\n".join(failures)
