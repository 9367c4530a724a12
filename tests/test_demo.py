"""The demo as shipped: configs/demo.yaml validates with nothing set, names the packaged model by
``builtin:demo`` (no install path in the config), and a short run of the very same file (its
length and ports moved through the variables it documents) publishes the four shape classes on
ZeroMQ, writes them to the JSON-lines file and the video (which a browser plays), serves the preview page at the URL it
logs, shows detection counts in its live status and ends by itself with the summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import cv2
import yaml
from helpers.browser import Browser, serve_directory
from helpers.daemon import Daemon, Subscriber, read_jsonl
from helpers.net import free_port

from edgepipe.scenes import CLASSES

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
FRAMES = 50  # 5 s at the demo's 10 fps


def clean_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")}


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepipe", "validate", str(path)],
                          capture_output=True, text=True, env=clean_env(), timeout=120)


def test_demo_config_validates_and_runs_the_whole_chain_on_the_builtin_model():
    done = validate(DEMO)
    assert done.returncode == 0, done.stderr
    assert "OK: 10 stages" in done.stdout, done.stdout
    stages = yaml.safe_load(DEMO.read_text())["stages"]
    types = {name: s["type"] for name, s in stages.items()}
    assert sorted(types.values()) == sorted(
        ["synthetic", "letterbox", "yolov5", "nms", "tracker", "zones", "zmq_pub", "jsonl", "preview", "video"])
    assert stages["zones"]["zones"] and stages["zones"]["lines"], "the demo shows a zone and a line"
    detector = stages["detector"]
    assert detector["weights"] == "builtin:demo"
    # docs/training.md: 1280x720 frames letterboxed to 640 keep the objects in the trained range.
    assert detector["imgsz"] == 640 and stages["prep"]["imgsz"] == 640
    assert (stages["scene"]["width"], stages["scene"]["height"]) == (1280, 720)


def test_builtin_demo_model_is_packaged_with_the_four_shape_classes():
    from edgepipe.yolo.builtin import builtin_path, resolve_weights
    from edgepipe.yolo.weights import read_weights

    path = Path(resolve_weights("builtin:demo"))
    assert path == builtin_path("demo")
    assert path.parent == REPO / "edgepipe" / "data", "the builtin model must come from the package"
    weights = read_weights("builtin:demo")
    assert weights.names == list(CLASSES)
    assert (weights.ch, weights.nc) == (1, 4)
    assert path.stat().st_size < 16 * 2**20, "the packaged model should be a few MB"


def test_unknown_builtin_model_is_refused_in_one_line(tmp_path: Path):
    config = yaml.safe_load(DEMO.read_text())
    config["stages"]["detector"]["weights"] = "builtin:nope"
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    done = validate(path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "stages.detector.weights" in lines[0] and "unknown built-in model 'nope'" in lines[0]
    assert "builtin:demo" in lines[0], "the error names what is built in"


def label_set(messages: List[Dict[str, Any]]) -> set:
    return {d["label"] for m in messages for d in m["detections"]}


def test_short_demo_run_publishes_shapes_serves_the_preview_and_ends_with_a_summary(tmp_path: Path):
    out = tmp_path / "demo-output"
    out.mkdir()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    preview_port = free_port()
    env = {
        "EDGEPIPE_DEMO_FRAMES": str(FRAMES),
        "EDGEPIPE_DEMO_DIR": str(out),
        "EDGEPIPE_PREVIEW_PORT": str(preview_port),
        "EDGEPIPE_PUB": endpoint,
        "EDGEPIPE_METRICS": "127.0.0.1:0",
        "EDGEPIPE_DEVICE": "cpu",
    }
    config = yaml.safe_load(DEMO.read_text())  # the shipped file; its ${...} resolve in the daemon
    with Subscriber(endpoint) as sub, Daemon(config, tmp_path, env=env) as daemon:
        daemon.wait_ready(timeout=180)
        url = daemon.wait_for_line(r"Preview page at (http://\S+)", timeout=5).group(1)
        assert url == f"http://127.0.0.1:{preview_port}/"
        # Once ready (not before), the daemon says where to look.
        ready = next(i for i, line in enumerate(daemon.lines) if "Ready: " in line)
        daemon.wait_for_line(rf"Live preview: http://127\.0\.0\.1:{preview_port}/ \(stage 'preview'\)", 10, ready)
        daemon.wait_for_line(rf"Detections: {endpoint} \(edgepipe subscribe {endpoint} --topic detections/\)", 10, ready)
        daemon.wait_for_line(r"Video: .*demo\.webm", 10, ready)
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
            assert b"<html" in resp.read().lower()

        def latest_with_detections() -> bool:
            with urllib.request.urlopen(url + "api/latest", timeout=10) as resp:
                sources = json.loads(resp.read())["sources"]
            return any(s["message"]["source"] == "scene" and s["message"]["detections"] for s in sources)

        daemon.wait_until(latest_with_detections, timeout=30, message="the preview page shows no detections")
        # The zone and the line count live, as the zones stage's own series.
        # (a heartbeat after the frames the preview shows: wait for it, do not race it)
        daemon.wait_until(lambda: daemon.sample("edgepipe_zone_objects", stage="zones", source="scene", zone="dock")
                          is not None, 30, "the zone's live count")
        for direction in ("westward", "eastward"):
            assert daemon.sample("edgepipe_zone_crossings_total", stage="zones", source="scene",
                                 line="middle", direction=direction) is not None
        status = daemon.wait_for_line(r"Status: .*publish [\d.]+ fps.*? (\d+) detections", timeout=30)
        assert int(status.group(1)) > 0, status.group(0)
        assert daemon.wait(timeout=120) == 0, daemon.log  # ends by itself after FRAMES frames
        daemon.assert_no_leftovers()
        summary = daemon.wait_for_line(
            rf"Finished in .*publish {FRAMES} frames \([\d.]+ fps\), (\d+) detections", timeout=5)
        assert int(summary.group(1)) > 0
        messages = [m for _, m in sub.wait_for(lambda ms: len(ms) >= FRAMES, timeout=10)]

    assert [m["frame_id"] for m in messages] == list(range(FRAMES))
    assert label_set(messages) == set(CLASSES), "every shape class should be found in the demo scene"
    lines = read_jsonl(out / "detections.jsonl")
    records = [r for r in lines if r["schema"] == "edgepipe.detections/v2"]
    events = [r for r in lines if r["schema"] == "edgepipe.events/v1"]
    assert len(records) + len(events) == len(lines)
    assert {e["type"] for e in events} >= {"new"}, "the demo's tracks are announced"
    assert {d["track_id"] for m in messages for d in m["detections"]} - {None}, "detections carry track ids"
    assert [r["frame_id"] for r in records] == list(range(FRAMES))
    assert [r["detections"] for r in records] == [m["detections"] for m in messages]
    video = cv2.VideoCapture(str(out / "demo.webm"))
    try:
        count = 0
        while True:
            ok, image = video.read()
            if not ok:
                break
            assert image.shape[:2] == (720, 1280)
            count += 1
    finally:
        video.release()
    assert count == FRAMES
    assert re.search(r"Recording 1280x720 at [\d.]+ fps", daemon.log), daemon.log
    # The recording opens where a user looks at it: a browser plays it from the start.
    with serve_directory(out) as base, Browser() as browser:
        state = browser.play_video(base + "demo.webm", play_for=1.0)
    assert state["error"] is None, f"Chromium refuses the demo's video: {state}"
    assert state["currentTime"] >= 1.0 and abs(state["duration"] - FRAMES / 10) < 0.15, state
    assert (state["videoWidth"], state["videoHeight"]) == (1280, 720), state
