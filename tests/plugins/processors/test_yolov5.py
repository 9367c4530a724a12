"""The ``yolov5`` stage driven directly (start/process/reconfigure), yolov5n on the CPU at small
sizes: its candidates equal the same untrained model run by hand, batches group by letterboxed
shape, only rows above ``conf_thres`` travel, raw frames are letterboxed, a weights file loads
with its class names, each backend (auto, torch, openvino) is named in its log line and info
series and gives torch's candidates, bad options are refused; on a CUDA machine it runs fp16
close to the CPU (``cuda``-marked, skipped elsewhere). One module-scoped stage serves most tests."""

from __future__ import annotations

from typing import List

import numpy as np
import pytest
import torch
from edgepipe_plugins.processors.letterbox import LetterboxConfig, LetterboxStage
from edgepipe_plugins.processors.yolov5 import YoloV5Config, YoloV5Stage
from helpers.frames import scene_frames
from helpers.yolo import detector_info, gray_images
from pydantic import ValidationError

from edgepipe.messages import Frame
from edgepipe.stage import StageContext
from edgepipe.yolo.model import build_model


@pytest.fixture(scope="module")
def detector() -> YoloV5Stage:
    stage = YoloV5Stage(
        YoloV5Config(inputs=["prep"], weights=None, cfg="yolov5n", seed=3, device="cpu", imgsz=96, conf_thres=0.001, max_batch=4, threads=1, backend="torch"),
        StageContext("detector"),
    )
    stage.start()
    yield stage
    stage.stop()


def reference_rows(images: List[np.ndarray], conf_thres: float, seed: int = 3) -> List[np.ndarray]:
    """The same untrained model built by hand: rows of its eval output with objectness > conf."""
    torch.manual_seed(seed)
    model = build_model("yolov5n", ch=1).fuse().eval()
    with torch.no_grad():
        x = torch.from_numpy(np.stack(images)).unsqueeze(1).float() / 255.0
        pred = model(x)
    return [p[p[:, 4] > conf_thres].numpy() for p in pred]


def test_yolov5_candidates_match_the_model_and_batches_group_by_shape(detector: YoloV5Stage):
    prep = LetterboxStage(LetterboxConfig(inputs=["cam"], imgsz=96), StageContext("prep"))
    prep.start()
    wide = prep.process(scene_frames(3, 160, 90, "wide"))  # -> 64x96
    tall = prep.process(scene_frames(2, 90, 160, "tall", seed=1))  # -> 96x64
    frames = [wide[0], tall[0], wide[1], wide[2], tall[1]]  # mixed shapes in one call
    inputs = [f.image.copy() for f in frames]
    before = detector.batch_size.count

    out = detector.process(frames)

    assert [(f.source, f.frame_id) for f in out] == [("wide", 0), ("tall", 0), ("wide", 1), ("wide", 2), ("tall", 1)]
    assert detector.batch_size.count - before == 2  # one batch per letterboxed shape
    assert detector.inference_seconds.count >= 2
    ref_wide = reference_rows([inputs[0], inputs[2], inputs[3]], 0.001)
    ref_tall = reference_rows([inputs[1], inputs[4]], 0.001)
    for f, ref in zip([out[0], out[2], out[3], out[1], out[4]], ref_wide + ref_tall):
        assert f.candidates.dtype == np.float32 and f.candidates.shape[1] == 85
        assert len(f.candidates) > 0
        np.testing.assert_allclose(f.candidates, ref, rtol=1e-4, atol=1e-4)
        assert f.image is None  # dropped: nothing downstream asked for it
        assert f.names == [f"class{i}" for i in range(80)]
        assert f.ratio is not None and f.width in (160, 90)
    # Only rows above conf_thres travel: at the median objectness about half of them.
    median = float(np.median(np.concatenate([r[:, 4] for r in ref_wide])))
    assert detector.reconfigure(detector.config.model_copy(update={"conf_thres": median}))
    try:
        again = detector.process(prep.process(scene_frames(3, 160, 90, "wide")))
    finally:
        detector.reconfigure(detector.config.model_copy(update={"conf_thres": 0.001}))
    for f, ref in zip(again, ref_wide):
        assert (f.candidates[:, 4] > median).all()
        np.testing.assert_allclose(f.candidates, ref[ref[:, 4] > median], rtol=1e-4, atol=1e-4)
    assert 0 < sum(len(f.candidates) for f in again) < sum(len(r) for r in ref_wide)
    assert list(detector.info.children) == [("cpu", "fp32", "torch", "yolov5n (untrained, seed 3)")]


def test_yolov5_letterboxes_raw_frames_and_keeps_image_on_request(detector: YoloV5Stage):
    (raw,) = scene_frames(1, 200, 100)
    (frame,) = detector.process([raw])
    assert frame.ratio == pytest.approx((0.48, 0.48))  # 200x100 into exactly 96x96
    assert (frame.width, frame.height) == (200, 100)
    assert detector.reconfigure(detector.config.model_copy(update={"keep_image": True, "conf_thres": 0.5}))
    try:
        (kept,) = detector.process(scene_frames(1, 200, 100))
        assert kept.image.shape == (96, 96)
        assert (kept.candidates[:, 4] > 0.5).all()
    finally:
        assert detector.reconfigure(detector.config.model_copy(update={"keep_image": False, "conf_thres": 0.001}))
    assert not detector.reconfigure(detector.config.model_copy(update={"imgsz": 128}))


def test_yolov5_config_errors():
    with pytest.raises(ValidationError, match="no such file"):
        YoloV5Config(weights="/nonexistent/best.pt")
    with pytest.raises(ValidationError, match="device"):
        YoloV5Config(device="gpu")
    with pytest.raises(ValidationError, match="no such model config file"):
        YoloV5Config(cfg="missing.yaml")


def test_yolov5_loads_a_weights_file(tmp_path, detector: YoloV5Stage):
    """A model saved in edgepipe's format and loaded by path gives the same candidates as the
    same model built in place, with its class names."""
    from edgepipe.yolo.weights import save_model

    torch.manual_seed(3)
    model = build_model("yolov5n", ch=1).eval()
    model.names = [f"thing{i}" for i in range(model.nc)]
    path = tmp_path / "n.safetensors"
    save_model(model, path)
    stage = YoloV5Stage(
        YoloV5Config(inputs=["prep"], weights=str(path), device="cpu", imgsz=96, conf_thres=0.001), StageContext("det2")
    )
    stage.start()
    frames = scene_frames(2, 96, 96)
    expected = detector.process([Frame(f.source, f.frame_id, f.timestamp, image=f.image.copy()) for f in frames])
    got = stage.process(frames)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.candidates, e.candidates, rtol=1e-4, atol=1e-4)
        assert g.names[:2] == ["thing0", "thing1"]
    assert detector_info(stage)["model"] == "n.safetensors"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_yolov5_on_cuda_runs_fp16_and_matches_the_cpu(detector: YoloV5Stage):
    stage = YoloV5Stage(
        YoloV5Config(inputs=["prep"], cfg="yolov5n", seed=3, device="auto", imgsz=96, conf_thres=0.001),
        StageContext("gpu"),
    )
    stage.start()
    try:
        assert stage.device.type == "cuda" and stage.half
        frames = scene_frames(3, 96, 96)
        cpu = detector.process([Frame(f.source, f.frame_id, f.timestamp, image=f.image.copy()) for f in frames])
        gpu = stage.process(frames)
        for g, c in zip(gpu, cpu):
            # fp16 moves objectness a little: compare the rows both keep well above the threshold.
            strong = c.candidates[c.candidates[:, 4] > 0.01]
            g_strong = g.candidates[g.candidates[:, 4] > 0.01]
            assert abs(len(strong) - len(g_strong)) <= max(2, len(strong) // 20)
            assert g.candidates.dtype == np.float32
        ((device, precision, _, _),) = stage.info.children  # the one label set the stage reports
        assert precision == "fp16" and device.startswith("cuda")
        assert list(stage.gpu_memory.children.values())[0].value > 0
    finally:
        stage.stop()


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
        frames = {k: [Frame("cam", i, 0.0, image=img) for i, img in enumerate(gray_images(3, 48, 64))] for k in stages}
        out = {k: s.process(frames[k]) for k, s in stages.items()}
        for a, t in zip(out["auto"], out["torch"]):
            assert len(a.candidates) == len(t.candidates) > 0
            np.testing.assert_allclose(a.candidates, t.candidates, rtol=1e-4, atol=1e-3)
    finally:
        for s in stages.values():
            s.stop()


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
        frames = [Frame("cam", i, 0.0, image=img) for i, img in enumerate(gray_images(2, 48, 64))]
        twins = [Frame("cam", i, 0.0, image=img) for i, img in enumerate(gray_images(2, 48, 64))]
        for a, t in zip(stage.process(frames), torch_stage.process(twins)):
            assert len(a.candidates) == len(t.candidates) > 0
            np.testing.assert_allclose(a.candidates, t.candidates, rtol=1e-4, atol=1e-3)
    finally:
        stage.stop()
        torch_stage.stop()
