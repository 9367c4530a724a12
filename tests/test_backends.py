"""The detector's backends: onnxruntime gives torch's candidates, `auto` picks it on the CPU, the
torch backend's reused buffers never mix shapes up, and the yolov5 stage runs and names it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from edgepipe_plugins.processors.yolov5 import YoloV5Config, YoloV5Stage
from helpers.yolo import detector_info

from edgepipe.messages import Frame
from edgepipe.stage import StageContext
from edgepipe.yolo.backends import BackendError, OnnxRuntimeBackend, TorchBackend, create_backend
from edgepipe.yolo.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return build_model("yolov5n", ch=1).fuse().eval()


def images(batch: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, h, w), dtype=np.uint8)


def reference(model, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch).unsqueeze(1).float() / 255.0).numpy()


def test_onnxruntime_matches_torch_on_any_batch_and_shape(model):
    ort = create_backend("onnxruntime", model, (64, 96))
    assert isinstance(ort, OnnxRuntimeBackend) and ort.describe() == "onnxruntime fp32 on cpu"
    for batch, h, w in ((1, 64, 96), (3, 96, 64), (2, 128, 128)):  # dynamic batch, height, width
        x = images(batch, h, w, seed=batch)
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
        x = images(batch, h, w, seed=h + w + batch)
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


def test_yolov5_stage_says_which_backend_runs_and_gives_torch_candidates(caplog):
    cfg = dict(inputs=["prep"], weights=None, cfg="yolov5n", seed=3, device="cpu", imgsz=64, conf_thres=0.01)
    stages = {name: YoloV5Stage(YoloV5Config(backend=name, **cfg), StageContext(f"det-{name}")) for name in ("auto", "torch")}
    with caplog.at_level("INFO"):
        for s in stages.values():
            s.start()
    try:
        assert detector_info(stages["auto"])["backend"] == "onnxruntime"
        assert detector_info(stages["torch"])["backend"] == "torch"
        assert "backend onnxruntime" in caplog.text and "backend torch" in caplog.text
        frames = {k: [Frame("cam", i, 0.0, image=img) for i, img in enumerate(images(3, 48, 64))] for k in stages}
        out = {k: s.process(frames[k]) for k, s in stages.items()}
        for a, t in zip(out["auto"], out["torch"]):
            assert len(a.candidates) == len(t.candidates) > 0
            np.testing.assert_allclose(a.candidates, t.candidates, rtol=1e-4, atol=1e-3)
    finally:
        for s in stages.values():
            s.stop()


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
    x = images(2, 64, 96)
    first = b.candidates(x, 0.0)[0]
    staged = b._buffers[(2, 64, 96)]
    again = b.candidates(x, 0.0)[0]
    assert requests == [True] and b._buffers[(2, 64, 96)] is staged  # pinned once, then reused
    ref = reference(model, x).reshape(-1, 85)
    np.testing.assert_allclose(first, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(first, again)
    other = images(1, 32, 32)
    np.testing.assert_allclose(b.candidates(other, 0.0)[0], reference(model, other)[0], rtol=1e-5, atol=1e-4)
    assert list(b._buffers) == [(1, 32, 32)] and requests == [True, True]  # one pinned shape at a time


def test_openvino_matches_torch_in_fp32_compiles_per_shape_and_runs_bf16_close(model):
    from edgepipe.yolo.backends import OpenVinoBackend, cpu_has_bf16, onnx_from_model

    onnx = onnx_from_model(model, (64, 96))
    ov = create_backend("openvino", model, (64, 96), precision="fp32")
    assert isinstance(ov, OpenVinoBackend) and ov.describe() == "openvino fp32 on cpu"
    for batch, h, w in ((1, 64, 96), (2, 96, 64), (1, 64, 96)):
        x = images(batch, h, w, seed=batch + h)
        ref = reference(model, x)
        np.testing.assert_allclose(ov.forward(x), ref, rtol=1e-4, atol=1e-3)
        rows, counts = ov.candidates(x, 0.01)
        keep = ref[..., 4] > 0.01
        assert counts.tolist() == keep.sum(1).tolist()
        np.testing.assert_allclose(rows, ref[keep], rtol=1e-4, atol=1e-3)
    # one compiled model per input shape (forward takes the batch whole, candidates image by image)
    assert set(ov._compiled) == {(1, 64, 96), (2, 96, 64), (1, 96, 64)}
    small = OpenVinoBackend(onnx, "CPU", "fp32", max_shapes=1)
    small.forward(images(1, 64, 64))
    small.forward(images(1, 32, 32))
    assert list(small._compiled) == [(1, 32, 32)]
    if cpu_has_bf16():
        bf16 = OpenVinoBackend(onnx, "CPU", "bf16")
        x = images(1, 64, 96, seed=9)
        ref = reference(model, x)
        got = bf16.forward(x)
        assert bf16.precision == "bf16"
        assert np.abs(got[..., 4:] - ref[..., 4:]).max() < 0.05  # scores: bf16 keeps about 3 digits
    with pytest.raises(BackendError, match="OpenVINO device 'NPU' is not present here"):
        OpenVinoBackend(onnx, "NPU")


def test_yolov5_stage_runs_openvino_and_names_it(caplog):
    stage = YoloV5Stage(YoloV5Config(inputs=["prep"], weights=None, cfg="yolov5n", seed=3, device="cpu", imgsz=64,
                                     conf_thres=0.01, backend="openvino", precision="fp32"), StageContext("det-ov"))
    torch_stage = YoloV5Stage(YoloV5Config(inputs=["prep"], weights=None, cfg="yolov5n", seed=3, device="cpu",
                                           imgsz=64, conf_thres=0.01, backend="torch"), StageContext("det-t"))
    with caplog.at_level("INFO"):
        stage.start()
        torch_stage.start()
    try:
        assert detector_info(stage)["backend"] == "openvino" and detector_info(stage)["precision"] == "fp32"
        assert "backend openvino" in caplog.text
        frames = [Frame("cam", i, 0.0, image=img) for i, img in enumerate(images(2, 48, 64))]
        twins = [Frame("cam", i, 0.0, image=img) for i, img in enumerate(images(2, 48, 64))]
        for a, t in zip(stage.process(frames), torch_stage.process(twins)):
            assert len(a.candidates) == len(t.candidates) > 0
            np.testing.assert_allclose(a.candidates, t.candidates, rtol=1e-4, atol=1e-3)
    finally:
        stage.stop()
        torch_stage.stop()
