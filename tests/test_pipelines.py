"""Whole daemons built from the first-party stages: the shipped synthetic config published to
`edgepipe subscribe`, finite file/images sources delivering every frame exactly once, three
sources batched into one detector with a SIGHUP threshold change applied in place, and two
daemons chained over tcp. Small frames and yolov5n at 64-128 px keep them quick on a CPU."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import yaml
from helpers.daemon import Daemon, Subscriber, read_jsonl
from helpers.net import free_port

REPO = Path(__file__).resolve().parents[1]
DETECTOR = {"type": "yolov5", "weights": None, "cfg": "yolov5n", "device": "cpu", "threads": 1}


def by_source(records: List[Dict[str, Any]]) -> Dict[str, List[int]]:
    out: Dict[str, List[int]] = collections.defaultdict(list)
    for r in records:
        out[r["source"]].append(r["frame_id"])
    return dict(out)


def test_synthetic_config_publishes_to_edgepipe_subscribe(tmp_path: Path):
    """configs/synthetic.yaml as shipped (ports moved through its variables): messages with
    increasing frame ids reach `edgepipe subscribe`; SIGTERM exits 0 with nothing left behind."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = yaml.safe_load((REPO / "configs/synthetic.yaml").read_text())
    env = {"EDGEPIPE_PUB": endpoint, "EDGEPIPE_METRICS": "127.0.0.1:0", "EDGEPIPE_DEVICE": "cpu"}
    with Daemon(config, tmp_path, env=env) as daemon:
        # The shipped config runs yolov5s at 640: on two busy cores its export and warm-up take
        # minutes, so wait for READY first; the bounds below only catch a hang.
        daemon.wait_ready(600)
        sub = subprocess.Popen(
            [sys.executable, "-m", "edgepipe", "subscribe", endpoint, "--topic", "detections/", "--count", "5", "--timeout", "300"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            out, err = sub.communicate(timeout=330)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait()
        assert sub.returncode == 0, err
        messages = [json.loads(line) for line in out.splitlines()]
        assert len(messages) == 5
        ids = [m["frame_id"] for m in messages]
        assert ids == sorted(set(ids)), ids
        assert all(m["source"] == "scene" and (m["width"], m["height"]) == (640, 480) for m in messages)
        assert daemon.stop() == 0


def write_clip(path: Path, n: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (96, 64))
    for k in range(n):
        writer.write(np.full((64, 96, 3), 10 * k, np.uint8))
    writer.release()


def test_finite_file_and_images_deliver_every_frame_once_then_exit(tmp_path: Path):
    write_clip(tmp_path / "clip.avi", 12)
    shots = tmp_path / "shots"
    shots.mkdir()
    for name in ("c.png", "a.png", "b.jpg", "d.png", "e.png"):
        cv2.imwrite(str(shots / name), np.full((50, 70), 100, np.uint8))
    out = tmp_path / "detections.jsonl"
    config = {
        "name": "finite",
        "stages": {
            "clip": {"type": "file", "path": str(tmp_path / "clip.avi")},
            "shots": {"type": "images", "path": str(shots)},
            "prep": {"type": "letterbox", "inputs": ["clip", "shots"], "imgsz": 64},
            "detector": dict(DETECTOR, inputs=["prep"], imgsz=64, max_batch=4),
            "post": {"type": "nms", "inputs": ["detector"]},
            "log": {"type": "jsonl", "inputs": ["post"], "path": str(out)},
        },
    }
    with Daemon(config, tmp_path) as daemon:
        assert daemon.wait(timeout=180) == 0, daemon.log
        daemon.assert_no_leftovers()
    records = read_jsonl(out)
    assert by_source(records) == {"clip": list(range(12)), "shots": list(range(5))}
    files = [Path(r["file"]).name for r in records if r["source"] == "shots"]
    assert files == ["a.png", "b.jpg", "c.png", "d.png", "e.png"]
    assert all((r["width"], r["height"]) == (96, 64) for r in records if r["source"] == "clip")


def test_three_sources_batch_into_one_detector_and_sighup_applies_in_place(tmp_path: Path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    stages: Dict[str, Any] = {
        f"cam{i}": {"type": "synthetic", "width": 160, "height": 120, "fps": 15, "seed": i} for i in range(3)
    }
    stages.update(
        prep={"type": "letterbox", "inputs": ["cam0", "cam1", "cam2"], "imgsz": 64, "auto": False},
        detector=dict(DETECTOR, inputs=["prep"], imgsz=64, conf_thres=0.0, max_batch=3, max_wait_ms=30),
        post={"type": "nms", "inputs": ["detector"], "conf_thres": 0.0},
        publish={"type": "zmq_pub", "inputs": ["post"], "bind": endpoint},
    )
    config = {"name": "multi", "stages": stages}
    with Subscriber(endpoint) as sub, Daemon(config, tmp_path) as daemon:
        daemon.wait_ready()
        sub.wait_for(lambda ms: {m["source"] for _, m in ms} == {"cam0", "cam1", "cam2"} and len(ms) >= 30, timeout=90)

        def batched() -> bool:
            count = daemon.sample("edgepipe_detector_batch_size_count", stage="detector") or 0
            single = daemon.sample("edgepipe_detector_batch_size_bucket", stage="detector", le="1") or 0
            return count > single

        daemon.wait_until(batched, timeout=60, message="no batch of more than one frame")
        for _, m in sub.snapshot()[-10:]:
            assert m["detections"], "conf_thres 0 must let every image through NMS with boxes"
        before = daemon.worker_pids()

        config["stages"]["post"]["conf_thres"] = 1.0  # nothing can exceed it
        daemon.write_config(config)
        daemon.send(signal.SIGHUP)
        daemon.wait_for_line(r"Applied new settings: conf_thres=1\.0", timeout=30)
        time.sleep(0.5)  # frames already past NMS when the change landed may still arrive
        seen = len(sub.snapshot())
        later = sub.wait_for(lambda ms: len(ms) >= seen + 15, timeout=60)[seen:]
        assert all(m["detections"] == [] for _, m in later)
        assert daemon.worker_pids() == before, "an in-place change restarted a worker"
        ids = by_source([m for _, m in sub.snapshot()])
        assert all(v == sorted(set(v)) for v in ids.values()), "frame ids must increase per source"
        assert daemon.stop(group=True) == 0


def test_two_daemons_chained_over_tcp(tmp_path: Path):
    """The first letterboxes and pushes; the second's zmq source detects and writes; both end
    by themselves once the finite stream has passed, and every frame arrives once."""
    address = f"tcp://127.0.0.1:{free_port()}"
    out = tmp_path / "b" / "detections.jsonl"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    second = {
        "name": "infer",
        "stages": {
            "remote": {"type": "zmq", "bind": address, "carries": "letterboxed", "live": False, "stop_on_eos": True},
            "detector": dict(DETECTOR, inputs=["remote"], imgsz=96, conf_thres=0.0),
            "post": {"type": "nms", "inputs": ["detector"], "conf_thres": 0.0, "max_det": 5},
            "log": {"type": "jsonl", "inputs": ["post"], "path": str(out)},
        },
    }
    first = {
        "name": "capture",
        "stages": {
            "cam": {"type": "synthetic", "width": 160, "height": 120, "fps": None, "count": 8},
            "prep": {"type": "letterbox", "inputs": ["cam"], "imgsz": 96},
            "forward": {"type": "zmq_push", "inputs": ["prep"], "connect": address},
        },
    }
    with Daemon(second, tmp_path / "b") as b:
        b.wait_ready()
        with Daemon(first, tmp_path / "a") as a:
            assert a.wait(timeout=120) == 0, a.log
        assert b.wait(timeout=120) == 0, b.log
        b.assert_no_leftovers()
    records = read_jsonl(out)
    assert by_source(records) == {"remote": list(range(8))}
    for r in records:
        assert (r["width"], r["height"]) == (160, 120)  # original size survives the hop
        assert 0 < len(r["detections"]) <= 5
        for d in r["detections"]:
            x1, y1, x2, y2 = d["bbox"]
            assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120  # mapped back to original pixels
