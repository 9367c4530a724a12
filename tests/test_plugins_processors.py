"""First-party processors driven directly: letterbox, yolov5 (yolov5n on CPU at small sizes) and
nms, each compared against a direct computation with the edgepipe.yolo functions."""

from __future__ import annotations

import subprocess
import sys
from typing import List

import numpy as np
import pytest
import torch
from edgepipe_plugins.processors.letterbox import LetterboxConfig, LetterboxStage
from edgepipe_plugins.processors.nms import NmsConfig, NmsStage
from edgepipe_plugins.processors.yolov5 import YoloV5Config, YoloV5Stage
from helpers.yolo import detector_info
from pydantic import ValidationError

from edgepipe.messages import Frame
from edgepipe.scenes import SceneStream
from edgepipe.stage import StageContext
from edgepipe.yolo.model import build_model
from edgepipe.yolo.ops import letterbox, nms_candidates


def scene_frames(n: int, width: int, height: int, source: str = "cam", seed: int = 0) -> List[Frame]:
    stream = SceneStream(width, height, seed=seed)
    frames = []
    for k in range(n):
        image, truth = stream.next()
        frames.append(Frame(source, k, 1000.0 + k, image=image, meta={"truth": truth.tolist()}))
    return frames


# ------------------------------------------------------------------------------------ letterbox


def test_letterbox_gray_bgr_and_original():
    stage = LetterboxStage(LetterboxConfig(inputs=["cam"], imgsz=128, keep_original=True), StageContext("prep"))
    stage.start()
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
    (frame,) = stage.process([Frame("cam", 0, 1.0, image=bgr)])
    expected, ratio, pad = letterbox(bgr, 128, gray=True)
    np.testing.assert_array_equal(frame.image, expected)
    assert frame.image.ndim == 2 and frame.image.shape == (96, 128)  # auto: minimal stride-32 rectangle
    assert (frame.width, frame.height) == (200, 120)
    assert frame.ratio == pytest.approx(ratio) and frame.pad == pytest.approx(pad)
    assert frame.original is bgr

    fixed = LetterboxStage(LetterboxConfig(inputs=["cam"], imgsz=[96, 192], auto=False), StageContext("p2"))
    fixed.start()
    (frame,) = fixed.process([Frame("cam", 0, 1.0, image=bgr[:, :, 0].copy())])
    assert frame.image.shape == (96, 192) and frame.original is None
    # Every pixel outside the resized picture is the padding gray.
    (left, top) = (int(round(frame.pad[0] - 0.1)), int(round(frame.pad[1] - 0.1)))
    assert top == 0 and left > 0 and (frame.image[:, :left] == 114).all()

    with pytest.raises(ValidationError, match="multiple of the stride 32"):
        LetterboxConfig(imgsz=100)


# ------------------------------------------------------------------------------------ yolov5


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


def test_only_the_inference_stage_imports_torch():
    code = (
        "import sys\n"
        "from edgepipe.stage import StageContext\n"
        "from edgepipe_plugins.processors.yolov5 import YoloV5Stage, YoloV5Config\n"
        "from edgepipe_plugins.processors.nms import NmsStage, NmsConfig\n"
        "from edgepipe_plugins.processors.letterbox import LetterboxStage, LetterboxConfig\n"
        "from edgepipe.messages import Frame\n"
        "import numpy as np\n"
        "YoloV5Stage(YoloV5Config(), StageContext('d')).check()\n"
        "lb = LetterboxStage(LetterboxConfig(imgsz=64), StageContext('l')); lb.start()\n"
        "n = NmsStage(NmsConfig(), StageContext('n')); n.start()\n"
        "f = lb.process([Frame('c', 0, 0.0, image=np.zeros((48, 64), np.uint8))])[0]\n"
        "f.candidates = np.zeros((0, 85), np.float32)\n"
        "n.process([f])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_yolov5_config_errors():
    with pytest.raises(ValidationError, match="no such file"):
        YoloV5Config(weights="/nonexistent/best.pt")
    with pytest.raises(ValidationError, match="device"):
        YoloV5Config(device="gpu")
    with pytest.raises(ValidationError, match="no such model config file"):
        YoloV5Config(cfg="missing.yaml")


# ------------------------------------------------------------------------------------ nms


def test_nms_maps_letterboxed_boxes_to_original_pixels():
    """Truth boxes of a real scene, pushed through the real letterbox as detector rows, come out
    of the nms stage at the truth's original-frame coordinates."""
    prep = LetterboxStage(LetterboxConfig(inputs=["cam"], imgsz=160), StageContext("prep"))
    prep.start()
    nms = NmsStage(NmsConfig(inputs=["det"], conf_thres=0.25, iou_thres=0.45), StageContext("post"))
    nms.start()
    for width, height in ((300, 170), (170, 300)):
        (frame,) = prep.process(scene_frames(1, width, height, seed=width))
        truth = np.array(frame.meta["truth"], np.float32)  # (n, 5) cls x1 y1 x2 y2, original pixels
        (rw, rh), (dw, dh) = frame.ratio, frame.pad
        nc = 4
        rows = np.zeros((len(truth), 5 + nc), np.float32)
        x1, y1 = truth[:, 1] * rw + dw, truth[:, 2] * rh + dh
        x2, y2 = truth[:, 3] * rw + dw, truth[:, 4] * rh + dh
        rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        rows[:, 4] = 0.9
        rows[np.arange(len(truth)), 5 + truth[:, 0].astype(int)] = np.linspace(0.9, 0.6, len(truth))
        frame.candidates = rows
        (out,) = nms.process([frame])
        det = out.detections
        assert det.dtype == np.float32 and det.shape == (len(truth), 6)
        assert out.candidates is None
        order = np.argsort(-rows[np.arange(len(truth)), 5 + truth[:, 0].astype(int)], kind="stable")
        np.testing.assert_allclose(det[:, :4], np.clip(truth[order, 1:], 0, [width, height, width, height]), atol=1e-3)
        np.testing.assert_array_equal(det[:, 5], truth[order, 0])


def test_nms_matches_a_direct_computation_and_clips():
    rng = np.random.default_rng(5)
    k, nc = 400, 6
    rows = np.zeros((k, 5 + nc), np.float32)
    rows[:, :2] = rng.uniform(0, 128, (k, 2))
    rows[:, 2:4] = rng.uniform(4, 60, (k, 2))
    rows[:, 4:] = rng.uniform(0, 1, (k, 1 + nc))
    ratio, pad = (0.4, 0.4), (0.0, 16.0)  # a 320x240 frame letterboxed to 128x128 (auto off)
    frame = Frame("cam", 0, 1.0, width=320, height=240, ratio=ratio, pad=pad, candidates=rows.copy())
    nms = NmsStage(NmsConfig(inputs=["d"], conf_thres=0.3, iou_thres=0.5, max_det=50, classes=[0, 2, 3]), StageContext("n"))
    nms.start()
    (out,) = nms.process([frame])

    direct = nms_candidates(rows, conf_thres=0.3, iou_thres=0.5, classes=[0, 2, 3], max_det=50)
    direct[:, [0, 2]] = np.clip((direct[:, [0, 2]] - pad[0]) / ratio[0], 0, 320)
    direct[:, [1, 3]] = np.clip((direct[:, [1, 3]] - pad[1]) / ratio[1], 0, 240)
    assert len(out.detections) == 50
    np.testing.assert_allclose(out.detections, direct, rtol=1e-5, atol=1e-3)
    assert set(np.unique(out.detections[:, 5])) <= {0.0, 2.0, 3.0}
    assert out.detections[:, :4].min() >= 0 and out.detections[:, [0, 2]].max() <= 320


def test_nms_reconfigure_applies_in_place():
    nms = NmsStage(NmsConfig(inputs=["d"], conf_thres=0.25), StageContext("n"))
    nms.start()
    rows = np.array([[50, 50, 20, 20, 0.9, 0.5], [10, 10, 5, 5, 0.9, 0.9]], np.float32)  # conf 0.45 and 0.81

    def run() -> int:
        (f,) = nms.process([Frame("c", 0, 0.0, width=100, height=100, candidates=rows.copy())])
        return len(f.detections)

    assert run() == 2
    assert nms.reconfigure(NmsConfig(inputs=["d"], conf_thres=0.6))
    assert run() == 1
    assert not nms.reconfigure(NmsConfig(inputs=["other"], conf_thres=0.6))  # links changed: restart


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
