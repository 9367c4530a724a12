"""ONNX export: a 1-channel graph whose outputs match torch in onnxruntime (fp32, fp16, dynamic)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers.yolo import gray_batch, randomize

from edgepipe.yolo.export import ExportError, export_onnx, parse_imgsz
from edgepipe.yolo.model import build_model
from edgepipe.yolo.weights import load_model, save_model

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    model = randomize(build_model("yolov5n", nc=3), seed=11).eval()
    model.names = ["cat", "dog", "bird"]
    path = tmp_path_factory.mktemp("export") / "m.safetensors"
    save_model(model, path)
    return path


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images"
    return session.run(None, {"images": x})[0]


def torch_run(weights: Path, x: torch.Tensor, half: bool = False) -> torch.Tensor:
    model = load_model(weights, device="cpu", half=half)
    with torch.no_grad():
        return model(x.half() if half else x).float()


def assert_close(onnx_out: np.ndarray, ref: torch.Tensor, rel_to_max: float) -> None:
    """Absolute error bounded relative to the largest output (box sizes in pixels dominate)."""
    assert onnx_out.shape == tuple(ref.shape)
    diff = np.abs(onnx_out.astype(np.float32) - ref.numpy()).max()
    assert diff <= rel_to_max * float(ref.abs().max()), diff


def test_fixed_shape_fp32_matches_torch(weights, tmp_path):
    out = tmp_path / "m.onnx"
    result = export_onnx(weights, out, imgsz=(64, 96), device="cpu")
    assert result["path"] == str(out) and result["max_abs_diff"] is not None
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 64, 96]  # one input channel
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["names"]) == ["cat", "dog", "bird"] and json.loads(meta["stride"]) == [8, 16, 32]
    x = gray_batch(1, 64, 96, seed=4)
    onnx_out = ort_run(out, x.numpy())
    assert onnx_out.shape == (1, 3 * (96 + 24 + 6), 8) and onnx_out.dtype == np.float32
    assert_close(onnx_out, torch_run(weights, x), 1e-5)


def test_dynamic_axes_accept_other_batches_and_sizes(weights, tmp_path):
    out = tmp_path / "dyn.onnx"
    export_onnx(weights, out, imgsz=64, dynamic=True, device="cpu")
    for b, h, w in ((1, 64, 64), (3, 96, 160), (2, 128, 32)):
        x = gray_batch(b, h, w, seed=b)
        assert_close(ort_run(out, x.numpy()), torch_run(weights, x), 1e-5)


def test_half_export_is_float16_and_matches(weights, tmp_path):
    out = tmp_path / "half.onnx"
    result = export_onnx(weights, out, imgsz=64, half=True, device="cpu")
    assert result["dtype"] == "float16"
    x = gray_batch(1, 64, 64, seed=6)
    onnx_out = ort_run(out, x.half().numpy())
    assert onnx_out.dtype == np.float16
    # fp16 on both sides: within a few fp16 steps of the largest value
    assert_close(onnx_out, torch_run(weights, x, half=True), 5e-3)
    assert_close(onnx_out, torch_run(weights, x), 5e-3)  # and close to fp32 torch


@pytest.mark.parametrize("value, expected", [(640, (640, 640)), ("384,640", (384, 640)),
                                             ("384x640", (384, 640)), ([320], (320, 320))])
def test_parse_imgsz(value, expected):
    assert parse_imgsz(value) == expected


@pytest.mark.parametrize("value", [100, "abc", "0", "32,32,32", -32])
def test_parse_imgsz_rejects(value):
    with pytest.raises(ExportError, match="image size"):
        parse_imgsz(value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=180)


def test_cli_export_with_parity(weights, tmp_path):
    out = tmp_path / "cli.onnx"
    res = run_cli("export", str(weights), "--format", "onnx", "--imgsz", "64,96", "--dynamic",
                  "--output", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert f"Wrote {out}" in res.stdout and "onnxruntime matches torch" in res.stdout
    x = gray_batch(2, 96, 64, seed=8)
    assert_close(ort_run(out, x.numpy()), torch_run(weights, x), 1e-5)
    # default output path: next to the weights, .onnx
    res = run_cli("export", str(weights), "--imgsz", "64", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert weights.with_suffix(".onnx").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--format", "tflite"], "export format 'tflite' is not supported"),
    (["--imgsz", "100"], "image size '100'"),
])
def test_cli_export_bad_options(weights, tmp_path, args, expected):
    res = run_cli("export", str(weights), "--output", str(tmp_path / "x.onnx"), *args)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_bad_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    res = run_cli("export", str(bad))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a known weights format" in lines[0]
