"""`edgepipe quantize` as a user runs it: int8 by onnxruntime's quantizer, calibrated on a folder
of frames, written only when the accuracy gate accepts it (the demo model's mAP@0.5 on held-out
scenes within 0.01 of fp32; another model's boxes agreeing with fp32 on held-out frames), and the
written model runs in the yolov5 stage, which says it runs int8 and why."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers.yolo import detector_info

from edgepipe.scenes import render_scene

IMGSZ = "192,256"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True,
                          timeout=600, cwd=str(cwd), env=dict(os.environ, OMP_NUM_THREADS="2"))


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """30 camera-like frames of the demo's world (a user's own frames stand here)."""
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(99)
    for i in range(30):
        img, _ = render_scene(rng, 320, 240, n_objects=(2, 6), size_range=(24, 90))
        cv2.imwrite(str(folder / f"frame{i:03d}.png"), img)
    return folder


@pytest.fixture(scope="module")
def demo_int8(frames, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("q") / "demo-int8.onnx"
    proc = cli("quantize", "builtin:demo", "--calib", str(frames), "--imgsz", IMGSZ, "--scenes", "32", "-o", str(out),
               cwd=out.parent)
    return out, proc


def test_demo_model_quantized_behind_the_map_gate(demo_int8):
    out, proc = demo_int8
    assert proc.returncode == 0, proc.stderr
    assert "Calibrated on 24 of 30 frames" in proc.stdout and "6 held out" in proc.stdout
    assert "Gate (onnxruntime): int8 mAP@0.5" in proc.stdout and "on 32 held-out scenes" in proc.stdout
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    gate = json.loads(meta["gate"])
    assert meta["precision"] == "int8" and gate["passed"] and gate["metric"] == "mAP@0.5"
    assert gate["reference"] - gate["value"] <= 0.01 and gate["reference"] > 0.5
    assert json.loads(meta["names"]) == ["circle", "square", "triangle", "cross"]
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_stage_runs_the_int8_model_and_says_why(demo_int8, caplog):
    from edgepipe_plugins.processors.yolov5 import YoloV5Config, YoloV5Stage

    from edgepipe.messages import Frame
    from edgepipe.stage import StageContext

    out, _ = demo_int8
    stage = YoloV5Stage(YoloV5Config(inputs=["p"], weights=str(out), device="cpu", imgsz=[192, 256]), StageContext("q8"))
    with caplog.at_level(logging.INFO):
        stage.start()
    try:
        assert detector_info(stage)["precision"] == "int8" and detector_info(stage)["backend"] in ("onnxruntime", "openvino")
        assert "int8 gate passed when quantized: int8 mAP@0.5" in caplog.text
        img, truth = render_scene(np.random.default_rng(3), 256, 192, n_objects=(3, 3), size_range=(40, 70))
        (frame,) = stage.process([Frame("cam", 0, 0.0, image=img)])
        assert len(frame.candidates) >= len(truth)  # the shapes are there to be found
    finally:
        stage.stop()


def test_a_user_model_is_gated_by_box_agreement_on_held_out_frames(frames, tmp_path):
    from edgepipe.yolo.weights import load_model, save_model

    model = load_model("builtin:demo", device="cpu", fuse=False)
    model.names = ["disc", "box", "wedge", "plus"]  # not the scenes' classes: no labels to score
    weights = tmp_path / "mine.safetensors"
    save_model(model.float(), weights)
    proc = cli("quantize", str(weights), "--calib", str(frames), "--imgsz", IMGSZ, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Gate (onnxruntime): int8 boxes agree with fp32:" in proc.stdout and "on 6 frames" in proc.stdout
    assert (tmp_path / "mine-int8.onnx").is_file()


def test_a_model_the_gate_cannot_check_is_refused_and_nothing_written(frames, tmp_path):
    import torch

    from edgepipe.yolo.model import build_model
    from edgepipe.yolo.weights import save_model

    torch.manual_seed(0)
    save_model(build_model("yolov5n", ch=1).eval(), tmp_path / "untrained.safetensors")
    proc = cli("quantize", "untrained.safetensors", "--calib", str(frames), "--imgsz", "128", cwd=tmp_path)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "int8 refused by the accuracy gate" in line and "not checked: fp32 finds only 0 boxes" in line
    assert "nothing written" in line and not (tmp_path / "untrained-int8.onnx").exists()


def test_quantize_bad_input_is_one_line(frames, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        cv2.imwrite(str(few / f"{i}.png"), np.zeros((32, 32), np.uint8))
    cases = [
        (["builtin:demo", "--calib", str(few)], "has 3 images; at least"),
        (["builtin:demo", "--calib", str(tmp_path / "none")], "--calib: cannot list"),
        (["builtin:demo", "--calib", str(frames), "-o", "x.safetensors"], "must end in .onnx"),
        (["builtin:demo", "--calib", str(frames), "--imgsz", "100"], "image size '100'"),
    ]
    for args, expected in cases:
        proc = cli("quantize", *args, cwd=tmp_path)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], proc.stderr
