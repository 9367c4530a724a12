"""Our YOLOv5 training code (tools/): target assignment, the loss going down, mAP on hand-made
cases, reproducible and resumable runs, and the exported weights loading in edgepipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepipe.scenes import CLASSES
from tools import train
from tools.data import training_batch, training_image
from tools.loss import YoloLoss, bbox_ciou, build_targets
from tools.metrics import DetectionStats, average_precision

torch.set_num_threads(2)


def _cells(level) -> set:
    return {(int(i), int(a), int(gy), int(gx)) for i, a, gy, gx in
            zip(level.image, level.anchor, level.gy, level.gx)}


def test_assignment_hand_made_case() -> None:
    """One 10x10 grid at stride 8 with anchors 1x1 and 10x10 cells. A 16x16 px target (2 cells)
    centred at (21, 43) px = (2.625, 5.375) cells fits the 1x1 anchor (ratio 2) but not the
    10x10 one (ratio 5 > 4); it goes to its own cell, the cell above (y fraction < 0.5) and the
    cell to the right (x fraction > 0.5). A target in the first column gets no left neighbour."""
    anchors = torch.tensor([[[1.0, 1.0], [10.0, 10.0]]])
    targets = torch.tensor([
        [0, 2, 21.0, 43.0, 16.0, 16.0],
        [1, 3, 3.0, 44.0, 16.0, 16.0],  # (0.375, 5.5) cells: left edge, exactly mid-row
    ])
    (level,) = build_targets(targets, anchors, [8.0], [(10, 10)])
    assert _cells(level) == {(0, 0, 5, 2), (0, 0, 4, 2), (0, 0, 5, 3), (1, 0, 5, 0)}
    rows = {(int(i), int(gy), int(gx)): (b.tolist(), int(c)) for i, gy, gx, b, c in
            zip(level.image, level.gy, level.gx, level.box, level.cls)}
    assert rows[(0, 5, 2)] == ([0.625, 0.375, 2.0, 2.0], 2)
    assert rows[(0, 4, 2)] == ([0.625, 1.375, 2.0, 2.0], 2)
    assert rows[(0, 5, 3)] == ([-0.375, 0.375, 2.0, 2.0], 2)
    assert rows[(1, 5, 0)] == ([0.375, 0.5, 2.0, 2.0], 3)
    assert torch.equal(level.anchors, torch.ones(4, 2))


def test_assignment_anchor_ratio_threshold() -> None:
    anchors = torch.tensor([[[2.0, 2.0]]])
    fits = torch.tensor([[0, 0, 40.0, 40.0, 7.9 * 8, 16.0]])  # 7.9 cells: 3.95x the anchor
    too_wide = torch.tensor([[0, 0, 40.0, 40.0, 8.1 * 8, 16.0]])  # 4.05x the anchor
    assert len(build_targets(fits, anchors, [8.0], [(10, 10)])[0].image) > 0
    assert len(build_targets(too_wide, anchors, [8.0], [(10, 10)])[0].image) == 0


def test_ciou_is_one_for_identical_boxes_and_penalises_distance() -> None:
    a = torch.tensor([[5.0, 5.0, 4.0, 2.0]])
    assert bbox_ciou(a, a).item() == pytest.approx(1.0, abs=1e-5)
    apart = torch.tensor([[50.0, 5.0, 4.0, 2.0]])
    assert bbox_ciou(a, apart).item() < 0  # no overlap and a centre distance penalty
    shifted = torch.tensor([[6.0, 5.0, 4.0, 2.0]])
    assert 0 < bbox_ciou(a, shifted).item() < 0.6  # IoU 0.6 minus the distance term


def test_training_image_labels_follow_flips_and_letterbox() -> None:
    rng = np.random.default_rng(4)
    for _ in range(10):
        img, truth = training_image(rng, 128, (10, 40))
        assert img.shape == (128, 128) and img.dtype == np.uint8
        assert ((truth[:, 1:] >= 0) & (truth[:, 1:] <= 128)).all()
        for _c, x1, y1, x2, y2 in truth:  # the box is not padding
            region = img[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
            assert (region != 114).any()
    a_img, a_t = training_batch(3, 17, 2, 64, (8, 30))
    b_img, b_t = training_batch(3, 17, 2, 64, (8, 30))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_t, b_t)
    assert a_img.shape == (2, 1, 64, 64) and a_t.shape[1] == 6


def test_a_few_steps_reduce_the_loss() -> None:
    """Twenty optimizer steps on one small batch cut its loss by more than 30%."""
    args = train.parse_args(["--imgsz", "96", "--batch", "4", "--lr", "0.01", "--warmup", "1"])
    model = train.new_model(args)
    opt = train.make_optimizer(model, args)
    loss_fn = YoloLoss(model.detect.anchors, model.detect.stride.tolist(), len(CLASSES), 96)
    images, targets = training_batch(0, 0, 4, 96, (10, 50))
    x, t = torch.from_numpy(images), torch.from_numpy(targets)
    model.train()
    losses = []
    for _ in range(20):
        loss, _parts = loss_fn(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------------------- mAP

def _stats(dets, gts, method="101") -> dict:
    s = DetectionStats(len(CLASSES), method)
    for d, g in zip(dets, gts):
        s.add(np.array(d, float).reshape(-1, 6), np.array(g, float).reshape(-1, 5))
    return s.summary(CLASSES)


GT = [[0, 10, 10, 30, 30], [1, 50, 50, 90, 70]]


@pytest.mark.parametrize("method", ["101", "continuous"])
def test_map_perfect_detections_score_one(method: str) -> None:
    det = [[10, 10, 30, 30, 0.9, 0], [50, 50, 90, 70, 0.8, 1]]
    res = _stats([det, det], [GT, GT], method)
    assert res["mAP50"] == pytest.approx(1.0)
    assert res["mAP50_95"] == pytest.approx(1.0)


def test_map_one_miss() -> None:
    """Class 0 has two boxes over two images and one is found: recall stops at 0.5."""
    det0 = [[10, 10, 30, 30, 0.9, 0], [50, 50, 90, 70, 0.8, 1]]
    det1 = [[50, 50, 90, 70, 0.8, 1]]
    cont = _stats([det0, det1], [GT, GT], "continuous")
    assert cont["per_class_AP50"]["circle"] == pytest.approx(0.5)
    assert cont["per_class_AP50"]["square"] == pytest.approx(1.0)
    assert cont["mAP50"] == pytest.approx(0.75)
    coco = DetectionStats(len(CLASSES), "101")
    for d in (det0, det1):
        coco.add(np.array(d, float), np.array(GT, float))
    assert coco.ap()[0, 0] == pytest.approx(51 / 101)  # recall levels 0, 0.01 .. 0.5 reached


def test_map_duplicate_is_a_false_positive() -> None:
    """A second box on an already matched object is a false positive (harmless to AP when it
    scores lower); a confident box in the wrong place ahead of the real match halves the AP."""
    gt = [[0, 10, 10, 30, 30]]
    low_dup = [[10, 10, 30, 30, 0.9, 0], [11, 10, 31, 30, 0.5, 0]]
    assert _stats([low_dup], [gt], "continuous")["mAP50"] == pytest.approx(1.0)
    s = DetectionStats(len(CLASSES), "continuous")
    s.add(np.array(low_dup, float), np.array(gt, float))
    assert s._tp[0][:, 0].tolist() == [True, False]
    bad_first = [[20, 20, 40, 40, 0.9, 0], [10, 10, 30, 30, 0.8, 0]]  # IoU 1/7 with the truth
    assert _stats([bad_first], [gt], "continuous")["mAP50"] == pytest.approx(0.5)


def test_map_over_iou_thresholds_and_wrong_class() -> None:
    gt = [[0, 0, 0, 100, 100]]
    det = [[0, 0, 100, 75, 0.9, 0]]  # IoU 0.75: a hit at 0.50 .. 0.75 (6 of 10 thresholds)
    res = _stats([det], [gt], "continuous")
    assert res["mAP50"] == pytest.approx(1.0)
    assert res["mAP50_95"] == pytest.approx(0.6)
    wrong = [[0, 0, 100, 100, 0.9, 2]]
    assert _stats([wrong], [gt], "continuous")["mAP50"] == pytest.approx(0.0)


def test_average_precision_interpolations() -> None:
    recall = np.array([0.25, 0.5, 0.5, 0.75])
    precision = np.array([1.0, 1.0, 2 / 3, 0.75])
    # Envelope: 1 up to recall 0.5, then 0.75 up to 0.75, nothing after.
    assert average_precision(recall, precision, "continuous") == pytest.approx(0.5 + 0.25 * 0.75)
    assert average_precision(recall, precision, "101") == pytest.approx((51 + 25 * 0.75) / 101)
    with pytest.raises(ValueError, match="AP method"):
        average_precision(recall, precision, "11")


# ------------------------------------------------------------------ runs: seed, resume, export

TINY = ["--imgsz", "64", "--batch", "2", "--warmup", "1", "--min-size", "8", "--max-size", "30",
        "--val-every", "0", "--log-every", "1", "--save-every", "1"]


def _weights(out: Path) -> dict:
    return train.load_checkpoint(out / "last.pt")


def test_runs_are_reproducible_and_resume_exactly(tmp_path: Path) -> None:
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    assert train.main(TINY + ["--steps", "4", "--out", str(whole)]) == 0
    assert train.main(TINY + ["--steps", "4", "--out", str(chunked), "--chunk-steps", "2"]) == 0
    assert _weights(chunked)["step"] == 2
    assert train.main(TINY + ["--steps", "4", "--out", str(chunked), "--chunk-steps", "2"]) == 0
    a, b = _weights(whole), _weights(chunked)
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    logged = [json.loads(line)["step"] for line in (chunked / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_resume_refuses_a_changed_setting(tmp_path: Path) -> None:
    assert train.main(TINY + ["--steps", "1", "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit, match="--imgsz was 64 in this run, got 96"):
        train.main(["--imgsz", "96", "--batch", "2", "--steps", "2", "--out", str(tmp_path)])


def test_export_loads_in_edgepipe_and_matches_the_ema(tmp_path: Path) -> None:
    from edgepipe.yolo.weights import load_model

    out = tmp_path / "run"
    path = tmp_path / "demo.safetensors"
    assert train.main(TINY + ["--steps", "2", "--out", str(out), "--export", str(path)]) == 0
    ckpt = _weights(out)
    args = train.parse_args(TINY)
    ema = train.ema_model(ckpt, args)
    loaded = load_model(path, device="cpu", half=False)
    assert list(loaded.names) == list(CLASSES)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        ref, got = ema(x), loaded.float()(x)
    assert got.shape == ref.shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 9)
    # fp16 weights: scores agree to a few thousandths, boxes to a fraction of a pixel.
    assert torch.allclose(got[..., 4:], ref[..., 4:], atol=5e-3)
    assert torch.allclose(got[..., :4], ref[..., :4], atol=0.5)


# ------------------------------------------------------------------------ the shipped model

SHIPPED = Path(__file__).resolve().parents[1] / "edgepipe" / "data" / "demo-yolov5n.safetensors"


def test_shipped_demo_model_detects_held_out_scenes() -> None:
    """The committed weights find the shapes in scenes no training batch contained (a smaller
    sample than docs/training.md's 500 images, with a margin below its numbers)."""
    from edgepipe.yolo.weights import load_model
    from tools.evaluate import evaluate_frames, evaluate_scenes

    model = load_model(SHIPPED, device="cpu", half=False).float()
    assert list(model.names) == list(CLASSES)
    assert SHIPPED.stat().st_size < 8_000_000
    res = evaluate_scenes(model, seed=4242, n=48, imgsz=320, size_range=(12.0, 160.0))
    assert res["mAP50"] >= 0.90, res
    wide = evaluate_frames(model, seed=4243, n=16, frame=(1280, 720), imgsz=640, size_range=(28.0, 300.0))
    assert wide["mAP50"] >= 0.90, wide


def test_fine_tuning_starts_from_the_given_weights(tmp_path: Path) -> None:
    """``--init``: the run's model and EMA begin as the given weights file (here one exported by
    a first run), not from scratch; with a learning rate of 0 the convolutions stay exactly so."""
    from safetensors.torch import load_file

    first = tmp_path / "first.safetensors"
    assert train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "a"), "--export", str(first)]) == 0
    assert train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "b"), "--init", str(first),
                              "--lr", "0", "--seed", "5"]) == 0
    ckpt = _weights(tmp_path / "b")
    shipped = load_file(str(first))
    convs = [k for k in ckpt["model"] if k.endswith("conv.weight")]
    assert len(convs) > 50
    for key in convs:
        assert torch.equal(ckpt["model"][key], shipped[key].float()), key
    # From scratch (same seed, no --init) the same convolutions differ.
    assert train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "c"), "--lr", "0", "--seed", "5"]) == 0
    scratch = _weights(tmp_path / "c")
    assert not torch.equal(scratch["model"][convs[0]], shipped[convs[0]].float())


def test_init_weights_of_another_size_are_refused(tmp_path: Path) -> None:
    first = tmp_path / "n.safetensors"
    assert train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "a"), "--export", str(first)]) == 0
    with pytest.raises(SystemExit, match=r"--init .*n\.safetensors: does not fit a 1-channel 4-class model"):
        train.main(TINY + ["--size", "s", "--steps", "1", "--out", str(tmp_path / "b"), "--init", str(first)])
    with pytest.raises(SystemExit, match=r"--init .*missing\.safetensors: .*not found"):
        train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "c"), "--init", str(tmp_path / "missing.safetensors")])


def test_resume_refuses_a_changed_visibility_and_reads_older_checkpoints(tmp_path: Path) -> None:
    assert train.main(TINY + ["--steps", "1", "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit, match="--min-visible was 0.6 in this run, got 0.3"):
        train.main(TINY + ["--steps", "2", "--out", str(tmp_path), "--min-visible", "0.3"])
    # A checkpoint written before --min-visible and --init existed resumes as 0.6 and none.
    ckpt = _weights(tmp_path)
    saved = json.loads(ckpt["args"])
    del saved["min_visible"], saved["init"]
    ckpt["args"] = json.dumps(saved)
    torch.save(ckpt, tmp_path / "last.pt")
    assert train.main(TINY + ["--steps", "2", "--out", str(tmp_path)]) == 0
    assert _weights(tmp_path)["step"] == 2

