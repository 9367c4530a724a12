"""The model owner's first hour, as a user runs it (real subprocesses): a weights reference means
the same in every command, `detect` says how fast and where, `export` judges its check by the
precision and writes an `.onnx` that `detect` and the daemon run, `weights convert` writes what
its name says with the user's umask, and `validate`/`run` say when the weights cannot be read by
this user or by the systemd service's dynamic user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers.yolo import detector_info, randomize

from edgepipe.scenes import render_scene
from edgepipe.yolo.model import build_model
from edgepipe.yolo.weights import save_model

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict = None, cwd: Path = None, preexec=None, check: bool = False) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True,
                          timeout=300, env=full, cwd=str(cwd or REPO), preexec_fn=preexec)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    model = randomize(build_model("yolov5n", nc=3), seed=11).eval()
    model.names = ["cat", "dog", "bird"]
    path = tmp_path_factory.mktemp("w") / "small.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    img, _ = render_scene(np.random.default_rng(21), 320, 256, n_objects=(3, 3), size_range=(40, 90))
    path = tmp_path_factory.mktemp("img") / "scene.png"
    cv2.imwrite(str(path), img)
    return path


def test_weights_info_reads_builtin_demo_like_every_other_command():
    proc = cli("weights", "info", "builtin:demo", "--json", check=True)
    info = json.loads(proc.stdout)
    assert info["names"] == ["circle", "square", "triangle", "cross"] and info["path"] == "builtin:demo"
    assert info["file_bytes"] > 1_000_000 and info["file"].endswith("demo-yolov5n.safetensors")
    table = cli("weights", "info", "builtin:nope")
    assert table.returncode == 1 and "unknown built-in model 'nope'" in table.stderr


def test_detect_prints_the_speed_summary_and_where_it_wrote(scene_png, tmp_path):
    out = tmp_path / "results"
    proc = cli("detect", str(scene_png), "-w", "builtin:demo", "--imgsz", "320", "--save-dir", str(out), check=True)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("Speed: ") and "ms pre-process" in lines[0] and "ms inference" in lines[0]
    assert "ms post-process per image at shape (1, 1, 320, 320)" in lines[0]
    assert f"saved to {out.resolve()} (1 file)" in lines[1] and "1 image" in lines[1]
    assert (out / "scene.png").is_file()
    as_json = cli("detect", str(scene_png), "-w", "builtin:demo", "--imgsz", "320", "--json", check=True)
    json.loads(as_json.stdout)  # stdout stays one JSON document per frame
    assert "JSON lines on stdout" in as_json.stderr


def test_export_half_judges_by_fp16_tolerance_and_says_so(small, tmp_path):
    out = tmp_path / "half.onnx"
    proc = cli("export", str(small), "--half", "--device", "cpu", "--imgsz", "640", "-o", str(out), check=True)
    assert "matches torch within fp16 tolerance" in proc.stdout
    assert "allowed 0.5%" in proc.stdout and "(allowed 0.01)" in proc.stdout
    full = cli("export", str(small), "--device", "cpu", "--imgsz", "64", "-o", str(tmp_path / "f.onnx"), check=True)
    assert "within fp32 tolerance" in full.stdout and "allowed 0.01%" in full.stdout


def test_a_parity_beyond_the_precision_fails_plainly():
    from edgepipe.yolo.export import compare_outputs, describe_parity

    ref = np.zeros((1, 4, 8), np.float32)
    ref[..., :4] = 600.0
    ref[..., 4:] = 0.5
    fp16_step = ref.copy()
    fp16_step[..., 0] += 0.5  # one fp16 step at 600 px
    assert compare_outputs(fp16_step, ref, "fp16")["ok"]
    assert not compare_outputs(fp16_step, ref, "fp32")["ok"]
    off = ref.copy()
    off[..., 0] += 30.0  # 5%: no rounding explains that
    bad = compare_outputs(off, ref, "fp16")
    assert not bad["ok"] and "boxes differ by at most 30 px (5% of the value; allowed 0.5%)" in describe_parity(bad)


def test_exported_onnx_runs_in_detect_and_as_stage_weights(small, scene_png, tmp_path):
    onnx_path = tmp_path / "small.onnx"
    cli("export", str(small), "--device", "cpu", "--imgsz", "256,320", "--dynamic", "-o", str(onnx_path), check=True)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["names"]) == ["cat", "dog", "bird"] and meta["nc"] == "3" and meta["precision"] == "fp32"
    assert json.loads(meta["arch"])["nc"] == 3
    args = [str(scene_png), "--imgsz", "320", "--conf", "0.05", "--json"]
    via_torch = json.loads(cli("detect", *args, "-w", str(small), check=True).stdout)
    via_onnx = json.loads(cli("detect", *args, "-w", str(onnx_path), "--backend", "onnxruntime", check=True).stdout)
    assert len(via_onnx["detections"]) == len(via_torch["detections"]) > 0
    left = list(via_torch["detections"])  # equal confidences may come in either order
    for a in via_onnx["detections"]:
        same = [b for b in left if b["label"] == a["label"] and abs(b["confidence"] - a["confidence"]) < 1e-4
                and np.allclose(a["bbox"], b["bbox"], atol=0.05)]
        assert same, (a, left)
        left.remove(same[0])

    from edgepipe_plugins.processors.yolov5 import YoloV5Config, YoloV5Stage

    from edgepipe.stage import StageContext

    stage = YoloV5Stage(YoloV5Config(inputs=["prep"], weights=str(onnx_path), device="cpu", imgsz=[256, 320],
                                     backend="onnxruntime", conf_thres=0.05), StageContext("onnx"))
    stage.start()
    try:
        assert detector_info(stage)["backend"] == "onnxruntime" and detector_info(stage)["model"] == "small.onnx"
        assert stage.names == ["cat", "dog", "bird"]
    finally:
        stage.stop()


def test_weights_convert_writes_only_safetensors_names(small, tmp_path):
    proc = cli("weights", "convert", str(small), str(tmp_path / "model.onnx"))
    assert proc.returncode == 1 and not (tmp_path / "model.onnx").exists()
    assert "OUT must end in .safetensors" in proc.stderr and "edgepipe export" in proc.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_weights_convert_honours_the_umask(small, tmp_path, umask, mode):
    dst = tmp_path / "out.safetensors"
    cli("weights", "convert", str(small), str(dst), preexec=lambda: os.umask(umask), check=True)
    assert dst.stat().st_mode & 0o777 == mode


def _pipeline(tmp_path: Path, weights: Path) -> Path:
    config = {
        "name": "unreadable",
        "stages": {
            "cam": {"type": "synthetic", "width": 64, "height": 48, "count": 2},
            "prep": {"type": "letterbox", "inputs": ["cam"], "imgsz": 64},
            "det": {"type": "yolov5", "inputs": ["prep"], "weights": str(weights), "device": "cpu", "imgsz": 64},
            "post": {"type": "nms", "inputs": ["det"]},
            "out": {"type": "jsonl", "inputs": ["post"], "path": str(tmp_path / "out.jsonl")},
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture()
def private_weights(small) -> Path:
    """A 0600 copy of the weights in a folder everyone may enter (pytest's own are 0700)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ep-weights-", dir="/tmp"))
    folder.chmod(0o755)
    dst = folder / "model.safetensors"
    shutil.copy(small, dst)
    dst.chmod(0o600)
    yield dst
    shutil.rmtree(folder)


def _without_dac_override() -> None:
    """In the child, before exec: root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped
    from the bounding set) is held to file modes like any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_validate_and_run_say_this_user_cannot_read_the_weights(private_weights, tmp_path):
    """The weights belong to another user (as root, CI: 'nobody' owns them and the commands run
    without root's override of file modes) or are mode 0000 (as any other user)."""
    config = _pipeline(tmp_path, private_weights)
    root = os.geteuid() == 0
    if root:
        os.chown(private_weights, 65534, 65534)
    else:
        private_weights.chmod(0o000)
    for command in ("validate", "run"):
        proc = cli(command, str(config), preexec=_without_dac_override if root else None)
        assert proc.returncode != 0, proc.stdout
        assert "is not readable by this user" in proc.stderr and str(private_weights) in proc.stderr
        assert ("mode 0600, owner nobody" if root else "mode 0000") in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()  # no worker started


def test_validate_says_the_dynamic_user_service_cannot_read_the_weights(private_weights, tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(REPO / "deploy" / "systemd" / "edgepipe.service", units / "edgepipe.service")
    config = _pipeline(tmp_path, private_weights)
    env = {"SYSTEMD_UNIT_PATH": str(units)}
    proc = cli("validate", str(config), env=env)
    assert proc.returncode != 0
    assert "is not world-readable (mode 0600" in proc.stderr and "DynamicUser=yes" in proc.stderr
    assert "will not be able to read it" in proc.stderr and f"chmod o+r {private_weights}" in proc.stderr
    private_weights.chmod(0o644)
    assert cli("validate", str(config), env=env).returncode == 0, cli("validate", str(config), env=env).stderr
    private_weights.parent.chmod(0o700)
    closed = cli("validate", str(config), env=env)
    assert closed.returncode != 0 and "which others cannot enter (mode 0700)" in closed.stderr
    private_weights.parent.chmod(0o755)
    assert cli("validate", str(config)).returncode == 0  # no such unit installed: nothing to say
