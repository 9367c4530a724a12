"""The ``nms`` stage driven directly (start/process/reconfigure): boxes of a real scene's truth,
letterboxed by the real ``letterbox`` stage and handed in as detector rows, come out at the
truth's original-pixel coordinates; random candidates give exactly a direct
``edgepipe.yolo.ops.nms_candidates`` computation mapped back and clipped; a threshold change
applies in place while a change of inputs asks for a restart."""

from __future__ import annotations

import numpy as np
from edgepipe_plugins.processors.letterbox import LetterboxConfig, LetterboxStage
from edgepipe_plugins.processors.nms import NmsConfig, NmsStage
from helpers.frames import scene_frames

from edgepipe.messages import Frame
from edgepipe.stage import StageContext
from edgepipe.yolo.ops import nms_candidates


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
