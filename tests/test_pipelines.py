"""Whole daemons built from the first-party stages: the shipped synthetic config published to
`edgepipe subscribe`, finite file/images sources delivering every frame exactly once, three
sources batched into one detector with a SIGHUP threshold change applied in place, two daemons
chained over tcp, and the preview page in a real headless Chromium showing what a daemon runs
(known detections fed over the frame wire format, recorded by the video sink too, and the
detector chain with every stage's stats). Small frames and yolov5n at 64-128 px keep them quick
on a CPU."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import yaml
from helpers.browser import Browser
from helpers.daemon import Daemon, Subscriber, read_jsonl
from helpers.net import free_port
from helpers.pixels import edge_colour_ratio, read_video
from helpers.preview import (
    CAM_TRIANGLE,
    cam_frame,
    crop,
    get_json,
    moving_x,
    stream_rects,
    to_screen,
)

from edgepipe.draw import color

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


# --- the preview page (and a recording) in a running daemon -------------------------------------


def test_preview_known_detections_through_a_daemon(tmp_path: Path) -> None:
    """Frames with known detections pushed into `edgepipe run` over the frame wire format
    (zmq source -> preview + video): the page in Chromium and the recorded file both show the
    boxes where they are, and the file holds every frame once the daemon ends at end of stream."""
    import zmq

    from edgepipe.messages import encode, encode_eos

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = {
        "name": "preview-wire",
        "stages": {
            "cam": {"type": "zmq", "bind": endpoint, "carries": "detections", "live": False,
                    "stop_on_eos": True, "keep_source": True},
            "view": {"type": "preview", "inputs": ["cam"], "port": 0, "max_fps": 5},
            "rec": {"type": "video", "inputs": ["cam"], "path": str(tmp_path / "rec.avi"),
                    "codec": "MJPG", "fps": 10},
        },
    }
    n = 80
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    stop = threading.Event()
    try:
        with Daemon(config, tmp_path) as daemon:
            daemon.wait_ready()
            url = daemon.wait_for_line(r"Preview page at (http://\S+)").group(1)
            push.connect(endpoint)

            def produce() -> None:
                for i in range(n):
                    if stop.is_set():
                        return
                    push.send_multipart(encode(cam_frame(i)), copy=False)
                    time.sleep(0.1)
                push.send_multipart(encode_eos("cam"))

            producer = threading.Thread(target=produce)
            producer.start()
            try:
                with Browser() as b:
                    b.open(url)
                    b.wait_for("const i = document.querySelector('.stream img');"
                               "return i && i.complete && i.naturalWidth > 0", what="the stream")
                    rect = stream_rects(b)["cam"]
                    first = b.screenshot()
                    time.sleep(1.0)
                    second = b.screenshot()
                    cv2.imwrite(str(tmp_path / "wire.png"), second)
                    diff = np.abs(crop(first, rect).astype(int) - crop(second, rect).astype(int))
                    assert diff.max(axis=2).astype(bool).mean() > 0.005, "the stream did not change"
                    tri = to_screen(CAM_TRIANGLE, rect)
                    assert edge_colour_ratio(second, tri, color(2)) > 0.9, "triangle box missing"
                    text = b.wait_for(
                        "const t = document.getElementById('detections').innerText;"
                        "return /circle/.test(t) && /triangle/.test(t) ? t : ''", what="labels")
                    assert "0.91" in text and "0.77" in text
            finally:
                producer.join()
            # End of stream: the daemon drains, finalizes the file and exits by itself.
            assert daemon.wait(60) == 0, daemon.log
            daemon.assert_no_leftovers()
    finally:
        stop.set()
        push.close()
        ctx.term()
    images, _ = read_video(tmp_path / "rec.avi")
    assert len(images) == n and images[0].shape == (240, 320, 3)
    for i in (0, n // 2, n - 1):
        x = moving_x(i)
        assert edge_colour_ratio(images[i], [x, 30, x + 50, 80], color(0)) > 0.9, f"frame {i}"
        assert edge_colour_ratio(images[i], CAM_TRIANGLE, color(2)) > 0.9, f"frame {i}"


def test_preview_detector_chain_through_a_daemon(tmp_path: Path) -> None:
    """synthetic -> letterbox -> yolov5n -> nms -> preview in `edgepipe run`: the page shows the
    moving scene, every stage's stats and the detection messages of the running pipeline."""
    config = {
        "name": "preview-chain",
        "stages": {
            "scene": {"type": "synthetic", "width": 320, "height": 240, "fps": 8, "seed": 3},
            "prep": {"type": "letterbox", "inputs": ["scene"], "imgsz": 128, "keep_original": True},
            "detector": {"type": "yolov5", "inputs": ["prep"], "weights": None, "cfg": "yolov5n",
                         "device": "cpu", "threads": 1, "imgsz": 128},
            "post": {"type": "nms", "inputs": ["detector"]},
            "view": {"type": "preview", "inputs": ["post"], "port": 0, "max_fps": 5},
        },
    }
    with Daemon(config, tmp_path) as daemon:
        daemon.wait_ready()
        url = daemon.wait_for_line(r"Preview page at (http://\S+)").group(1)
        assert url.startswith("http://127.0.0.1:")
        with Browser() as b:
            b.open(url)
            b.wait_for("const i = document.querySelector('.stream img');"
                       "return i && i.complete && i.naturalWidth > 0", what="the scene stream")
            rect = stream_rects(b)["scene"]
            assert (rect["nw"], rect["nh"]) == (320, 240)  # the original, not the 128 px input
            first = b.screenshot()
            time.sleep(1.5)
            second = b.screenshot()
            diff = np.abs(crop(first, rect).astype(int) - crop(second, rect).astype(int))
            assert diff.max(axis=2).astype(bool).mean() > 0.005, "the scene stream did not change"
            stages = b.wait_for(
                "const t = document.getElementById('stages').innerText;"
                "return /prep/.test(t) && /detector/.test(t) && /post/.test(t) ? t : ''",
                what="every stage in the stats table")
            assert "scene" in b.run("return document.getElementById('detections').innerText")
        doc = get_json(url + "api/latest")
        (src,) = doc["sources"]
        assert src["source"] == "scene" and 4 < src["fps"] < 10
        assert src["message"]["width"] == 320 and src["message"]["frame_id"] > 10
        detector = next(s for s in doc["stages"] if s["stage"] == "detector")
        assert detector["mean_ms"] > 0 and "detector" in stages
        assert daemon.stop() == 0
