"""docs/first-camera.md walked for real, once with each kind of weights file a user brings: a
checkpoint written the way the reference trainer writes one, for a 1-channel model (``best.pt``),
and a colour (3-channel) checkpoint standing in for an official ``yolov5s.pt``, which the guide
converts with ``--gray``. Both hold the shipped demo model (the colour one with its first layer
spread over three channels), so the detections on generated pictures can be checked against the
truth: the guide's commands must find the shapes, with their class names, in ``detect`` and in a
real ``edgepipe run`` (the ``images`` source standing in for the camera, as the guide's step 5
does). Every command run here is checked to be the guide's own, so the two cannot drift apart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np
import pytest
import yaml
from helpers.daemon import Daemon, Subscriber
from helpers.net import free_port

from edgepipe.scenes import CLASSES, render_scene

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "first-camera.md"


def guide_lines() -> List[str]:
    """Every line of the guide's fenced code blocks, stripped."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", GUIDE.read_text(), re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines()]


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Dict[str, object]:
    """The two checkpoints and three pictures with their truth (label, box) per file."""
    import torch
    from test_weights import write_reference_checkpoint

    from edgepipe.yolo.model import build_model
    from edgepipe.yolo.weights import load_model

    folder = tmp_path_factory.mktemp("kit")
    gray = load_model(REPO / "edgepipe" / "data" / "demo-yolov5n.safetensors", device="cpu", fuse=False)
    write_reference_checkpoint(folder / "best.pt", gray)
    # A colour model whose first layer sees each channel a third as strongly: fed a gray picture
    # in all three channels it is the gray model, so --gray must give the demo model back.
    colour = build_model("yolov5n", ch=3, nc=len(CLASSES)).eval()
    state = gray.state_dict()
    state["model.0.conv.weight"] = state["model.0.conv.weight"].repeat(1, 3, 1, 1) / 3
    colour.load_state_dict(state)
    colour.names = list(gray.names)
    with torch.no_grad():
        write_reference_checkpoint(folder / "yolov5s.pt", colour)
    images = folder / "my-images"
    images.mkdir()
    rng = np.random.default_rng(11)
    truth: Dict[str, list] = {}
    for i in range(3):
        img, boxes = render_scene(rng, 1280, 720, n_objects=(3, 5), size_range=(60, 200))
        cv2.imwrite(str(images / f"shot{i}.jpg"), img)
        truth[f"shot{i}.jpg"] = [(CLASSES[int(c)], [x1, y1, x2, y2]) for c, x1, y1, x2, y2 in boxes.tolist()]
    return {"folder": folder, "truth": truth}


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_found(name: str, found: List[tuple], truth: List[tuple]) -> None:
    """Every true shape found with its label (IoU >= 0.5); no confident box that is no shape."""
    for label, box in truth:
        assert any(lab == label and _iou(b, box) >= 0.5 for lab, b, _ in found), \
            f"{name}: the {label} at {box} was not found; found {found}"
    for label, box, conf in found:
        if conf >= 0.5:
            assert any(lab == label and _iou(b, box) >= 0.5 for lab, b in truth), \
                f"{name}: a {label} ({conf:.2f}) at {box} that is not there"


KINDS = [  # the file the user has, what the guide converts it to, the convert options
    ("best.pt", "best.safetensors", []),
    ("yolov5s.pt", "yolov5s-gray.safetensors", ["--gray"]),
]


@pytest.mark.parametrize("weights, converted, options", KINDS, ids=["1-channel", "colour"])
def test_the_guide_from_a_weights_file_to_a_running_pipeline(kit, tmp_path, weights, converted, options):
    work = tmp_path
    shutil.copy(kit["folder"] / weights, work / weights)
    shutil.copytree(kit["folder"] / "my-images", work / "my-images")
    truth = kit["truth"]
    documented = guide_lines()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")}

    def edgepipe(*args: str) -> subprocess.CompletedProcess:
        line = " ".join(("edgepipe",) + args)
        # The guide shows each command with the 1-channel file's names, and the convert for both.
        generic = line.replace(converted, "best.safetensors").replace(weights, "best.pt")
        assert line in documented or generic in documented, f"{line!r} is not a command of {GUIDE.name}"
        return subprocess.run([sys.executable, "-m", "edgepipe", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)

    # 1. Look at what you have.
    info = edgepipe("weights", "info", weights)
    assert info.returncode == 0, info.stderr
    channels = "3 channels" if options else "1 channel"
    assert re.search(rf"^input\s+{channels},", info.stdout, re.M), info.stdout
    assert re.search(r"^classes\s+4: circle, square, triangle, cross$", info.stdout, re.M), info.stdout

    # 2. Convert (a colour model only with --gray, as the guide says).
    if options:
        refused = subprocess.run([sys.executable, "-m", "edgepipe", "weights", "convert", weights, converted],
                                 cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "add --gray" in refused.stderr and not (work / converted).exists()
    done = edgepipe("weights", "convert", weights, converted, *options)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Wrote {converted}: 4 classes, 1-channel"), done.stdout

    # 3. Try it on the pictures.
    detect = edgepipe("detect", "my-images/", "--weights", converted, "--save-dir", "detect-out")
    assert detect.returncode == 0, detect.stderr
    blocks = re.split(r"^(\S+) #\d+ \S+ \(1280x720\): \d+ detections.*$", detect.stdout, flags=re.M)[1:]
    assert len(blocks) == 2 * len(truth), detect.stdout
    for stem, rows in zip(blocks[::2], blocks[1::2]):
        found = [(lab, [float(v) for v in box.split()], float(conf)) for lab, conf, box in
                 re.findall(r"^\s+\d+ (\S+)\s+([\d.]+)\s+\[([^\]]+)\]$", rows, re.M)]
        assert_found(f"detect {stem}", found, truth[f"{stem}.jpg"])
    assert sorted(p.name for p in (work / "detect-out").iterdir()) == sorted(truth)

    # 4. The camera config with the model in it, checked.
    assert "cp configs/camera.yaml my-camera.yaml" in documented
    text = (REPO / "configs" / "camera.yaml").read_text()
    text, edits = re.subn(r"(?m)^(\s+weights:) builtin:demo\b", rf"\1 {converted}", text)
    assert edits == 1
    (work / "my-camera.yaml").write_text(text)
    valid = edgepipe("validate", "my-camera.yaml")
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout == ("my-camera.yaml: OK: 5 stages: cam (camera), prep (letterbox), "
                            "detector (yolov5), post (nms), publish (zmq_pub)\n")

    # 5. The same pipeline on the pictures, the images source in the camera's place.
    assert "cp my-camera.yaml my-images.yaml" in documented and "edgepipe run my-images.yaml" in documented
    config = yaml.safe_load(text)
    config["stages"]["cam"] = {"type": "images", "path": "my-images/"}
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    run_env = {"EDGEPIPE_PUB": endpoint, "EDGEPIPE_METRICS": "127.0.0.1:0", "EDGEPIPE_DEVICE": "cpu"}
    with Subscriber(endpoint) as sub, Daemon(config, work, env=run_env, filename="my-images.yaml") as daemon:
        daemon.wait_ready(timeout=180)
        assert daemon.wait(timeout=180) == 0, daemon.log  # ends by itself after the last picture
        daemon.assert_no_leftovers()
        messages = [m for _, m in sub.wait_for(lambda ms: len(ms) >= len(truth), timeout=30)]
    assert sorted(Path(m["file"]).name for m in messages) == sorted(truth)
    for m in messages:
        found = [(d["label"], d["bbox"], d["confidence"]) for d in m["detections"]]
        assert_found(f"run {m['file']}", found, truth[Path(m["file"]).name])
