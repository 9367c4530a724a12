"""`edgepipe detect` as a user runs it (a subprocess): images, folders, globs, a generated video,
JSON messages in the published schema, annotated output, and one-line errors for bad input.

The model is a small yolov5n made to respond to its input (see the `weights` fixture); the CLI's
detections are checked against the Python API run in the test on the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import torch
from helpers.pixels import read_video

from edgepipe.client import DetectionMessage
from edgepipe.yolo import build_model, letterbox, load_model, non_max_suppression, scale_boxes
from edgepipe.yolo.weights import save_model

IMGSZ = 160
NAMES = ["circle", "square", "triangle"]
OBJ_BIAS = -3.0


def run_detect(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # One torch thread on both sides of every CLI-vs-API comparison: a different thread count
    # changes fp32 summation order, and so the last digits the messages carry.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "edgepipe", "detect", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def messages(proc: subprocess.CompletedProcess) -> List[dict]:
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    for m in out:
        DetectionMessage.model_validate(m)  # the published schema, strictly for detections
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """yolov5n, 3 classes, whose outputs depend on the picture: the BatchNorm statistics are
    measured on a few scenes (a freshly initialised network's activations fade to nothing), and
    the objectness bias is set so that a few dozen boxes clear 0.25."""
    torch.manual_seed(0)
    model = build_model("yolov5n", ch=1, nc=3)
    model.names = list(NAMES)
    batch = np.stack([
        letterbox(scene(IMGSZ, IMGSZ, 100 + i), IMGSZ, auto=False, gray=True)[0] for i in range(8)
    ])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration passes
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.from_numpy(batch)[:, None].float() / 255)
        for conv in model.detect.m:
            b = conv.bias.view(model.detect.na, -1)
            b[:, 4] = OBJ_BIAS
            b[:, 5:] = 0.0
    path = tmp_path_factory.mktemp("weights") / "calibrated.safetensors"
    save_model(model.eval(), path)
    return path


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """A BGR picture with a few filled shapes on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 120, (h, w, 3), dtype=np.uint8)
    for _ in range(4):
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        s = int(rng.integers(10, min(h, w) // 2))
        color = tuple(int(c) for c in rng.integers(150, 256, 3))
        cv2.rectangle(img, (x, y), (x + s, y + s), color, -1)
    return img


_MODELS: dict = {}


def api_detections(weights: Path, img: np.ndarray, conf: float = 0.25) -> np.ndarray:
    """What the Python API gives for one BGR frame: the reference detect flow, by hand."""
    if weights not in _MODELS:
        _MODELS[weights] = load_model(weights, device="cpu")
    model = _MODELS[weights]
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    lb, ratio, pad = letterbox(gray, IMGSZ, stride=32)
    x = torch.from_numpy(lb)[None, None].float() / 255
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs (see run_detect)
    try:
        with torch.no_grad():
            det = non_max_suppression(model(x), conf, 0.45)[0].numpy()
    finally:
        torch.set_num_threads(threads)
    return scale_boxes(lb.shape, det, gray.shape, ratio_pad=(ratio, pad))


def check_frame(msg: dict, expected: np.ndarray, h: int, w: int, conf: float = 0.25) -> None:
    """The message carries exactly the expected detections, in frame pixels, best first."""
    assert (msg["width"], msg["height"]) == (w, h)
    dets = msg["detections"]
    assert len(dets) == len(expected)
    for d, e in zip(dets, expected):
        np.testing.assert_allclose(d["bbox"], e[:4], atol=0.006)
        assert d["confidence"] == pytest.approx(float(e[4]), abs=6e-6)
        assert d["class_id"] == int(e[5]) and d["label"] == NAMES[int(e[5])]
        x1, y1, x2, y2 = d["bbox"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
    confs = [d["confidence"] for d in dets]
    assert confs == sorted(confs, reverse=True) and min(confs, default=1) > conf


def test_detect_one_image_json_matches_the_api(weights, tmp_path):
    img = scene(150, 210, 1)
    path = tmp_path / "street.jpg"
    cv2.imwrite(str(path), img)
    img = cv2.imread(str(path))  # what the CLI reads back (JPEG is lossy)
    (msg,) = messages(run_detect(str(path), "--weights", str(weights), "--imgsz", str(IMGSZ), "--json"))
    assert msg["schema"] == "edgepipe.detections/v2"
    assert msg["source"] == "street" and msg["frame_id"] == 0 and msg["file"] == str(path)
    assert set(msg["timing"]["stages"]) == {"letterbox", "inference", "nms"}
    expected = api_detections(weights, img)
    assert len(expected) > 0
    check_frame(msg, expected, 150, 210)


def test_detect_folder_table_and_save_dir(weights, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    imgs = {"a": scene(120, 160, 2), "b": scene(200, 140, 3)}
    cv2.imwrite(str(folder / "a.png"), imgs["a"])
    cv2.imwrite(str(folder / "b.png"), cv2.cvtColor(imgs["b"], cv2.COLOR_BGR2GRAY))  # gray file
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    proc = run_detect(str(folder), "-w", str(weights), "--imgsz", str(IMGSZ), "--save-dir", str(out))
    headers = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert [h.split()[:2] for h in headers] == [["a", "#0"], ["b", "#1"]]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(" ")]
    assert rows and all(r[1] in NAMES for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    for name, src in imgs.items():
        drawn = cv2.imread(str(out / f"{name}.png"))
        assert drawn.shape[:2] == src.shape[:2]
        if name == "a":
            assert (np.abs(drawn.astype(int) - src).sum(axis=2) > 60).mean() > 0.01  # boxes drawn

    proc = run_detect(str(folder / "*.png"), "-w", str(weights), "--imgsz", str(IMGSZ), "--json")
    msgs = messages(proc)
    assert [(m["source"], m["frame_id"]) for m in msgs] == [("a", 0), ("b", 1)]
    for m, name in zip(msgs, "ab"):
        expected = api_detections(weights, cv2.imread(str(folder / f"{name}.png")))
        assert len(expected) > 0
        check_frame(m, expected, *imgs[name].shape[:2])


def test_detect_video(weights, tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (176, 144))
    assert writer.isOpened()
    for i in range(5):
        writer.write(scene(144, 176, 1 + 2 * i))
    writer.release()
    frames, _ = read_video(path)
    assert len(frames) == 5

    out = tmp_path / "out"
    proc = run_detect(str(path), "-w", str(weights), "--imgsz", str(IMGSZ), "--json", "--save-dir", str(out))
    msgs = messages(proc)
    assert [(m["source"], m["frame_id"]) for m in msgs] == [("video", i) for i in range(5)]
    for m, frame in zip(msgs, frames):
        check_frame(m, api_detections(weights, frame), 144, 176)
    assert sum(len(m["detections"]) for m in msgs) > 0
    assert sorted(p.name for p in out.iterdir()) == [f"clip_{i:06d}.jpg" for i in range(5)]


def test_detect_classes_conf_and_max_det(weights, tmp_path):
    path = tmp_path / "x.png"
    img = scene(160, 160, 4)
    cv2.imwrite(str(path), img)
    low = api_detections(weights, img, conf=0.05)
    assert len({int(c) for c in low[:, 5]}) > 1  # more than one class to filter
    args = [str(path), "-w", str(weights), "--imgsz", str(IMGSZ), "--json", "--conf", "0.05"]
    (msg,) = messages(run_detect(*args))
    check_frame(msg, low, 160, 160, conf=0.05)
    (msg,) = messages(run_detect(*args, "--classes", "0,2", "--max-det", "3"))
    kept = low[np.isin(low[:, 5], [0, 2])][:3]
    assert len(kept) == 3
    check_frame(msg, kept, 160, 160, conf=0.05)


def test_detect_untrained_cfg_model_is_seeded(tmp_path):
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), scene(128, 128, 5))

    def dets(seed: str) -> list:
        proc = run_detect(str(path), "--cfg", "yolov5n", "--seed", seed, "--imgsz", "128",
                          "--conf", "0", "--max-det", "5", "--json")
        (msg,) = messages(proc)
        assert len(msg["detections"]) == 5
        return msg["detections"]

    first = dets("0")
    assert dets("0") == first
    assert dets("1") != first


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "does not exist"),
        ("unreadable", "cannot read image"),
        ("empty_folder", "no images or videos in folder"),
        ("no_glob_match", "no images or videos match"),
        ("bad_video", "cannot open video"),
        ("bad_weights", "not a known weights format"),
        ("missing_weights", "weights file"),
        ("no_model", "no model"),
        ("bad_cfg", "neither a file nor a shipped name"),
        ("bad_imgsz", "not a multiple of the model's stride 32"),
        ("bad_class", "--classes '7' is not a class index"),
    ],
)
def test_detect_bad_input_one_line_error(case, expected, weights, tmp_path):
    good = tmp_path / "ok.png"
    cv2.imwrite(str(good), scene(64, 64, 6))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    w = ["-w", str(weights)]
    args = {
        "missing": [str(tmp_path / "nope.jpg"), *w],
        "unreadable": [str(tmp_path / "bad.png"), *w],
        "empty_folder": [str(tmp_path / "empty"), *w],
        "no_glob_match": [str(tmp_path / "*.tif"), *w],
        "bad_video": [str(tmp_path / "bad.mp4"), *w],
        "bad_weights": [str(good), "-w", str(tmp_path / "junk.pt")],
        "missing_weights": [str(good), "-w", str(tmp_path / "none.pt")],
        "no_model": [str(good)],
        "bad_cfg": [str(good), "--cfg", "yolov9000"],
        "bad_imgsz": [str(good), *w, "--imgsz", "100"],
        "bad_class": [str(good), *w, "--classes", "1,7"],
    }[case]
    proc = run_detect(*args, check=False)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgepipe: error: ") and expected in lines[0]


def test_detect_builtin_demo_model_finds_the_shapes(tmp_path):
    """`--weights builtin:demo` names the packaged model; on a generated scene it finds the drawn
    shapes with their labels (each truth box matched by a detection of its class, IoU > 0.5)."""
    from edgepipe.scenes import CLASSES, render_scene

    img, truth = render_scene(np.random.default_rng(777), 320, 256, n_objects=(3, 3), size_range=(40, 90))
    cv2.imwrite(str(tmp_path / "scene.png"), img)
    proc = run_detect(str(tmp_path / "scene.png"), "--weights", "builtin:demo", "--imgsz", "320", "--json")
    (msg,) = messages(proc)
    dets = msg["detections"]
    assert {d["label"] for d in dets} <= set(CLASSES)

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    for cls, *box in truth.tolist():
        assert any(d["label"] == CLASSES[int(cls)] and iou(d["bbox"], box) > 0.5 for d in dets), (
            f"{CLASSES[int(cls)]} at {box} not found in {dets}"
        )


def test_detect_unknown_builtin_is_one_line_error(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((64, 64), np.uint8))
    proc = run_detect(str(tmp_path / "a.png"), "--weights", "builtin:nope", check=False)
    assert proc.returncode != 0
    assert "builtin:nope" in proc.stderr or "'nope'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
