"""The detector's backends: onnxruntime gives torch's candidates, `auto` picks it on the CPU, the
torch backend's reused buffers never mix shapes up (nor does the CUDA path's pinned buffer) and
OpenVINO matches torch. The yolov5 stage running and naming each backend is tested in
tests/plugins/processors/test_yolov5.py."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.yolo import gray_images

from edgepipe.yolo.backends import BackendError, OnnxRuntimeBackend, TorchBackend, create_backend
from edgepipe.yolo.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return build_model("yolov5n", ch=1).fuse().eval()


def reference(model, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch).unsqueeze(1).float() / 255.0).numpy()


def test_onnxruntime_matches_torch_on_any_batch_and_shape(model):
    ort = create_backend("onnxruntime", model, (64, 96))
    assert isinstance(ort, OnnxRuntimeBackend) and ort.describe() == "onnxruntime fp32 on cpu"
    for batch, h, w in ((1, 64, 96), (3, 96, 64), (2, 128, 128)):  # dynamic batch, height, width
        x = gray_images(batch, h, w, seed=batch)
        ref = reference(model, x)
        got = ort.forward(x)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)  # boxes in pixels, scores in [0, 1]
        rows, counts = ort.candidates(x, 0.01)
        keep = ref[..., 4] > 0.01
        assert counts.tolist() == keep.sum(1).tolist() and 0 < len(rows) < keep.size
        np.testing.assert_allclose(rows, ref[keep], rtol=1e-4, atol=1e-3)


def test_torch_backend_reuses_buffers_without_mixing_shapes(model):
    b = TorchBackend(model)
    for batch, h, w in ((1, 64, 64), (2, 64, 96), (1, 64, 64), (2, 64, 96), (4, 32, 32)):
        x = gray_images(batch, h, w, seed=h + w + batch)
        rows, counts = b.candidates(x, 0.0)
        ref = reference(model, x)
        assert counts.tolist() == [ref.shape[1]] * batch
        np.testing.assert_allclose(rows, ref.reshape(-1, ref.shape[2]), rtol=1e-5, atol=1e-4)
    assert len(b._buffers) <= 4


def test_auto_picks_onnxruntime_for_an_fp32_cpu_model_and_torch_otherwise(model):
    assert create_backend("auto", model, (64, 64)).name == "onnxruntime"
    assert create_backend("torch", model, (64, 64)).name == "torch"
    half = build_model("yolov5n", ch=1).fuse().eval().half()
    assert create_backend("auto", half, (64, 64)).name == "torch"  # onnxruntime here runs fp32 only
    with pytest.raises(BackendError, match="fp32 model on the CPU"):
        create_backend("onnxruntime", half, (64, 64))
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        create_backend("tensorrt", model, (64, 64))


def test_detector_process_threads_wait_passively_unless_told_otherwise():
    code = ("from edgepipe.yolo.backends import prepare_process; prepare_process(); "
            "import os; print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert plain.stdout.strip() == "PASSIVE"
    told = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(env, OMP_WAIT_POLICY="ACTIVE"), check=True)
    assert told.stdout.strip() == "ACTIVE"


def test_torch_backend_cuda_path_stages_through_one_pinned_buffer(model, monkeypatch):
    """The CUDA branch of the input copy, on the CPU: no GPU here, so only pinning is faked (it
    needs a CUDA driver); the copy, the dtype, the normalisation and the buffer reuse are real."""
    requests = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        requests.append(pin_memory)
        return real_empty(*args, **kwargs)

    b = TorchBackend(model)
    b.cuda, b.max_forward_batch = True, None  # what a CUDA device sets
    monkeypatch.setattr(torch, "empty", empty)
    x = gray_images(2, 64, 96)
    first = b.candidates(x, 0.0)[0]
    staged = b._buffers[(2, 64, 96)]
    again = b.candidates(x, 0.0)[0]
    assert requests == [True] and b._buffers[(2, 64, 96)] is staged  # pinned once, then reused
    ref = reference(model, x).reshape(-1, 85)
    np.testing.assert_allclose(first, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(first, again)
    other = gray_images(1, 32, 32)
    np.testing.assert_allclose(b.candidates(other, 0.0)[0], reference(model, other)[0], rtol=1e-5, atol=1e-4)
    assert list(b._buffers) == [(1, 32, 32)] and requests == [True, True]  # one pinned shape at a time


def test_openvino_matches_torch_in_fp32_compiles_per_shape_and_runs_bf16_close(model):
    from edgepipe.yolo.backends import OpenVinoBackend, cpu_has_bf16, onnx_from_model

    onnx = onnx_from_model(model, (64, 96))
    ov = create_backend("openvino", model, (64, 96), precision="fp32")
    assert isinstance(ov, OpenVinoBackend) and ov.describe() == "openvino fp32 on cpu"
    for batch, h, w in ((1, 64, 96), (2, 96, 64), (1, 64, 96)):
        x = gray_images(batch, h, w, seed=batch + h)
        ref = reference(model, x)
        np.testing.assert_allclose(ov.forward(x), ref, rtol=1e-4, atol=1e-3)
        rows, counts = ov.candidates(x, 0.01)
        keep = ref[..., 4] > 0.01
        assert counts.tolist() == keep.sum(1).tolist()
        np.testing.assert_allclose(rows, ref[keep], rtol=1e-4, atol=1e-3)
    # one compiled model per input shape (forward takes the batch whole, candidates image by image)
    assert set(ov._compiled) == {(1, 64, 96), (2, 96, 64), (1, 96, 64)}
    small = OpenVinoBackend(onnx, "CPU", "fp32", max_shapes=1)
    small.forward(gray_images(1, 64, 64))
    small.forward(gray_images(1, 32, 32))
    assert list(small._compiled) == [(1, 32, 32)]
    if cpu_has_bf16():
        bf16 = OpenVinoBackend(onnx, "CPU", "bf16")
        x = gray_images(1, 64, 96, seed=9)
        ref = reference(model, x)
        got = bf16.forward(x)
        assert bf16.precision == "bf16"
        assert np.abs(got[..., 4:] - ref[..., 4:]).max() < 0.05  # scores: bf16 keeps about 3 digits
    with pytest.raises(BackendError, match="OpenVINO device 'NPU' is not present here"):
        OpenVinoBackend(onnx, "NPU")
