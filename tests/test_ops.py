"""letterbox, NMS and scale_boxes against independent, straightforward computations of the same
reference semantics (geometry and border pixels; a brute-force greedy NMS), numpy and torch."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from edgepipe.yolo import ops
from edgepipe.yolo.ops import letterbox, nms_candidates, non_max_suppression, scale_boxes

# --------------------------------------------------------------------------------------- letterbox

SIZES = [  # (h, w): portrait, landscape, square, tiny, odd, larger than every target
    (480, 640), (640, 480), (720, 1280), (1080, 1920), (1920, 1080), (333, 517), (517, 333),
    (1, 1), (3, 7), (7, 3), (31, 33), (64, 64), (640, 640), (2001, 3001), (100, 1000), (999, 37),
]
TARGETS = [640, 320, (320, 480), (480, 320), 160, (96, 64)]


def expected_geometry(h, w, target, auto, scale_fill, scaleup, stride):
    """(unpadded w, h, left, top, right, bottom, ratio) computed the plain way."""
    th, tw = (target, target) if isinstance(target, int) else target
    r = min(th / h, tw / w)
    if not scaleup and r > 1:
        r = 1.0
    uw, uh = int(round(w * r)), int(round(h * r))
    assert abs(uw - w * r) <= 0.5 and abs(uh - h * r) <= 0.5
    ratio = (r, r)
    if auto:
        pad_w, pad_h = (tw - uw) % stride, (th - uh) % stride
    elif scale_fill:
        uw, uh, pad_w, pad_h = tw, th, 0, 0
        ratio = (tw / w, th / h)
    else:
        pad_w, pad_h = tw - uw, th - uh
    # An odd total puts the extra pixel on the right/bottom.
    left, top = pad_w // 2, pad_h // 2
    return uw, uh, left, top, pad_w - left, pad_h - top, ratio


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "auto,scale_fill,scaleup", [(True, False, True), (False, False, True), (False, True, True),
                                (True, False, False), (False, False, False), (True, True, True)]
)
def test_letterbox_geometry_and_pixels(h, w, target, auto, scale_fill, scaleup):
    rng = np.random.default_rng(h * 7919 + w)
    img = rng.integers(0, 256, (h, w), dtype=np.uint8)
    img[img == 114] = 115  # so that a misplaced border pixel cannot pass for content
    out, ratio, (dw, dh) = letterbox(img, target, auto=auto, scaleFill=scale_fill, scaleup=scaleup)
    uw, uh, left, top, right, bottom, exp_ratio = expected_geometry(
        h, w, target, auto, scale_fill, scaleup, 32
    )
    assert out.dtype == np.uint8 and out.ndim == 2
    assert out.shape == (uh + top + bottom, uw + left + right)
    assert ratio == pytest.approx(exp_ratio, rel=1e-12)
    assert (dw, dh) == ((left + right) / 2, (top + bottom) / 2)
    if auto:  # a multiple of the stride short of the target on both axes
        th, tw = (target, target) if isinstance(target, int) else target
        assert (tw - out.shape[1]) % 32 == 0 and (th - out.shape[0]) % 32 == 0
    else:  # padded (or stretched) to exactly the target
        assert out.shape == th_tw(target)

    content = img if (uw, uh) == (w, h) else cv2.resize(img, (uw, uh), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out[top : top + uh, left : left + uw], content)
    border = np.ones(out.shape, dtype=bool)
    border[top : top + uh, left : left + uw] = False
    assert (out[border] == 114).all()


def th_tw(target):
    return (target, target) if isinstance(target, int) else tuple(target)


def test_letterbox_no_resize_when_size_fits():
    img = np.arange(480 * 640, dtype=np.uint32).reshape(480, 640).astype(np.uint8)
    out, ratio, pad = letterbox(img, 640, auto=False)
    assert ratio == (1.0, 1.0) and pad == (0.0, 80.0)
    np.testing.assert_array_equal(out[80:560], img)
    out, _, pad = letterbox(img, 640, auto=True)
    assert out.shape == (480, 640) and pad == (0.0, 0.0)
    np.testing.assert_array_equal(out, img)


def test_letterbox_gray_and_color():
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    gray_out, ratio, pad = letterbox(bgr, 320, gray=True)
    expected, ratio2, pad2 = letterbox(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), 320)
    assert gray_out.ndim == 2 and (ratio, pad) == (ratio2, pad2)
    np.testing.assert_array_equal(gray_out, expected)

    color_out, _, (dw, dh) = letterbox(bgr, 320, auto=False, color=(1, 2, 3))
    assert color_out.shape == (320, 320, 3)
    top = int(round(dh - 0.1))
    assert top > 0 and (color_out[0, 0] == (1, 2, 3)).all() and (color_out[-1, -1] == (1, 2, 3)).all()
    gray_pad, _, _ = letterbox(bgr[:, :, 0], 320, auto=False, color=(7, 7, 7))
    assert gray_pad[0, 0] == 7


def test_letterbox_rejects_bad_images():
    with pytest.raises(ValueError, match="empty"):
        letterbox(np.zeros((0, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\(2, 2, 2, 2\)"):
        letterbox(np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="neither gray"):
        letterbox(np.zeros((4, 4, 2), np.uint8), gray=True)


# --------------------------------------------------------------------------------------- NMS


def reference_nms(pred, conf_thres, iou_thres, classes=None, agnostic=False, multi_label=False,
                  max_det=300, max_nms=30000):
    """The textbook procedure, one box at a time; float32 arithmetic like the real thing."""
    f = np.float32
    cands = []
    nc = pred.shape[1] - 5
    for row in pred.astype(f):
        obj = row[4]
        if not obj > conf_thres:
            continue
        cx, cy, w, h = row[:4]
        box = [cx - w / f(2), cy - h / f(2), cx + w / f(2), cy + h / f(2)]
        scores = [row[5 + c] * obj for c in range(nc)]
        if multi_label and nc > 1:
            picks = [c for c in range(nc) if scores[c] > conf_thres]
        else:
            best = max(range(nc), key=lambda c: (scores[c], -c))  # first of equal maxima
            picks = [best] if scores[best] > conf_thres else []
        for c in picks:
            if classes is None or c in classes:
                cands.append(box + [scores[c], f(c)])
    cands = sorted(cands, key=lambda d: -d[4])[:max_nms]  # stable: ties keep input order
    kept, kept_off = [], np.zeros((0, 4), f)
    for d in cands:
        off = np.array(d[:4], f) + f(0 if agnostic else d[5] * 7680)
        if len(kept_off):
            iw = np.maximum(np.minimum(kept_off[:, 2], off[2]) - np.maximum(kept_off[:, 0], off[0]), f(0))
            ih = np.maximum(np.minimum(kept_off[:, 3], off[3]) - np.maximum(kept_off[:, 1], off[1]), f(0))
            inter = iw * ih
            area_k = (kept_off[:, 2] - kept_off[:, 0]) * (kept_off[:, 3] - kept_off[:, 1])
            area = (off[2] - off[0]) * (off[3] - off[1])
            with np.errstate(divide="ignore", invalid="ignore"):
                iou = inter / ((area_k + area) - inter)
            if (iou.astype(np.float64) > iou_thres).any():
                continue
        kept.append(d)
        kept_off = np.concatenate([kept_off, off[None]])
    out = np.array(kept, dtype=f).reshape(-1, 6)
    return out[:max_det]


def random_prediction(rng, n, nc, objects=8, spread=6.0, quantize=False):
    """(n, 5+nc) rows clustered around a few objects, like a detector's raw output."""
    centers = rng.uniform(0, 320, (objects, 2))
    sizes = rng.uniform(4, 120, (objects, 2))
    k = rng.integers(0, objects, n)
    p = np.zeros((n, 5 + nc), np.float32)
    p[:, :2] = centers[k] + rng.normal(0, spread, (n, 2))
    p[:, 2:4] = sizes[k] * rng.uniform(0.7, 1.3, (n, 2))
    p[:, 4] = rng.uniform(0, 1, n)
    p[:, 5:] = rng.uniform(0, 1, (n, nc))
    if quantize:  # many exactly equal confidences: the order of ties matters
        p[:, 4:] = np.round(p[:, 4:] * 4) / 4
    return p


NMS_CASES = [  # (n, nc, kwargs)
    (0, 3, {}),
    (50, 1, {}),
    (200, 1, {"iou_thres": 0.3}),
    (300, 5, {}),
    (300, 5, {"agnostic": True}),
    (300, 5, {"classes": [1, 3]}),
    (300, 5, {"classes": [4], "agnostic": True}),
    (300, 5, {"multi_label": True, "conf_thres": 0.1}),
    (300, 5, {"multi_label": True, "agnostic": True}),
    (300, 80, {"max_det": 7}),
    (300, 3, {"conf_thres": 0.0, "iou_thres": 0.0}),
    (300, 3, {"iou_thres": 1.0}),
    (300, 3, {"conf_thres": 1.0}),  # nothing passes
    (400, 2, {"conf_thres": 0.05, "iou_thres": 0.6}),
]


@pytest.mark.parametrize("n,nc,kwargs", NMS_CASES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quantize", [False, True])
def test_nms_matches_brute_force(n, nc, kwargs, seed, quantize):
    rng = np.random.default_rng([seed, n, nc])
    pred = random_prediction(rng, n, nc, quantize=quantize)
    args = {"conf_thres": 0.25, "iou_thres": 0.45, **kwargs}
    expected = reference_nms(pred, **args)
    got = nms_candidates(pred, **args)
    assert got.dtype == np.float32 and got.shape[1] == 6
    np.testing.assert_array_equal(got, expected)
    if n and kwargs.get("conf_thres") != 1.0:
        assert len(got) > 0  # the cases are chosen so that something survives
    if kwargs.get("conf_thres") == 1.0:
        assert got.shape == (0, 6)


def test_nms_batch_numpy_and_torch_agree():
    rng = np.random.default_rng(5)
    pred = np.stack([random_prediction(rng, 500, 6) for _ in range(3)])
    pred[1, :, 4] = 0.1  # nothing above threshold in the second image
    out_np = non_max_suppression(pred)
    out_t = non_max_suppression(torch.from_numpy(pred))
    assert len(out_np) == len(out_t) == 3
    assert out_np[1].shape == (0, 6) and tuple(out_t[1].shape) == (0, 6)
    for i, (a, b) in enumerate(zip(out_np, out_t)):
        assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor)
        assert b.dtype == torch.float32
        np.testing.assert_array_equal(a, b.numpy())
        np.testing.assert_array_equal(a, reference_nms(pred[i], 0.25, 0.45))
    half = non_max_suppression(torch.from_numpy(pred).half(), multi_label=True)
    assert half[0].dtype == torch.float16 and len(half[0]) > 0


def test_nms_keeps_detections_in_descending_confidence_and_max_det():
    rng = np.random.default_rng(11)
    pred = random_prediction(rng, 2000, 10, objects=40)
    full = nms_candidates(pred, max_det=100000)
    assert len(full) > 50
    assert (np.diff(full[:, 4]) <= 0).all()
    np.testing.assert_array_equal(nms_candidates(pred, max_det=50), full[:50])
    assert nms_candidates(pred, max_det=0).shape == (0, 6)


def test_nms_chain_of_overlaps():
    """Each box overlaps only its neighbours: greedy keeps every other one, which needs the
    whole chain of decisions (a single 'suppressed by any higher box' pass would keep only 1)."""
    n = 300
    x = np.arange(n, dtype=np.float32) * 6
    pred = np.zeros((n, 6), np.float32)
    pred[:, 0], pred[:, 1], pred[:, 2], pred[:, 3] = x + 5, 5, 10, 10  # IoU(i, i+1) = 40/160
    pred[:, 4] = np.linspace(1, 0.5, n)
    pred[:, 5] = 1
    got = nms_candidates(pred, iou_thres=0.2)
    np.testing.assert_array_equal(got, reference_nms(pred, 0.25, 0.2))
    assert len(got) == n // 2


def test_nms_large_groups_many_rounds():
    """Big single-class and many-class inputs that take several rounds and the memory cap."""
    rng = np.random.default_rng(3)
    pred = random_prediction(rng, 6000, 1, objects=300, spread=20)
    np.testing.assert_array_equal(
        nms_candidates(pred, conf_thres=0.1, max_det=10**6), reference_nms(pred, 0.1, 0.45, max_det=10**6)
    )
    pred = random_prediction(rng, 6000, 40, objects=200, spread=10)
    np.testing.assert_array_equal(
        nms_candidates(pred, conf_thres=0.05, iou_thres=0.3, max_det=10**6),
        reference_nms(pred, 0.05, 0.3, max_det=10**6),
    )


def test_nms_takes_only_the_30000_most_confident():
    rng = np.random.default_rng(8)
    crowd = random_prediction(rng, 30000, 2, objects=5, spread=3)
    crowd[:, 4] = rng.uniform(0.6, 1.0, len(crowd))
    crowd[:, 5:] = 1.0
    loners = np.zeros((300, 7), np.float32)  # isolated boxes, less confident than the crowd
    loners[:, 0] = 2000 + 20 * np.arange(300)
    loners[:, 1:4] = (2000, 10, 10)
    loners[:, 4] = 0.5
    loners[:, 5:] = 1.0
    pred = np.concatenate([loners, crowd])
    got = nms_candidates(pred, max_det=10**6)
    assert (got[:, 0] < 1500).all()  # no loner: they were cut at 30000
    np.testing.assert_array_equal(got, reference_nms(pred, 0.25, 0.45, max_det=10**6))
    assert len(nms_candidates(pred[:1000], max_det=10**6)) >= 300  # they would have been kept


def test_nms_torchvision_path_gives_the_same_boxes():
    """The glue around torchvision's kernel (rank scores, class offsets) with a torch
    implementation of that kernel's contract: sort by score, suppress IoU > threshold."""

    def kernel(boxes, scores, iou_thres):
        order = torch.sort(scores, descending=True).indices
        b = boxes[order]
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        suppressed = torch.zeros(len(b), dtype=torch.bool)
        keep = []
        for i in range(len(b)):
            if suppressed[i]:
                continue
            keep.append(int(order[i]))
            iw = (torch.minimum(b[i, 2], b[:, 2]) - torch.maximum(b[i, 0], b[:, 0])).clamp(min=0)
            ih = (torch.minimum(b[i, 3], b[:, 3]) - torch.maximum(b[i, 1], b[:, 1])).clamp(min=0)
            inter = iw * ih
            suppressed |= (inter / ((area[i] + area) - inter)).double() > iou_thres
        return torch.tensor(keep, dtype=torch.int64)

    rng = np.random.default_rng(2)
    for kwargs in ({}, {"agnostic": True}, {"multi_label": True}):
        pred = random_prediction(rng, 400, 4, quantize=True)
        np.testing.assert_array_equal(
            nms_candidates(pred, _kernel=kernel, **kwargs), nms_candidates(pred, **kwargs)
        )


def test_nms_rejects_bad_arguments():
    with pytest.raises(ValueError, match="conf_thres=1.5"):
        non_max_suppression(np.zeros((1, 5, 7), np.float32), conf_thres=1.5)
    with pytest.raises(ValueError, match="iou_thres=-0.1"):
        nms_candidates(np.zeros((5, 7), np.float32), iou_thres=-0.1)
    with pytest.raises(ValueError, match=r"\(B, N, 5\+nc\).*\(5, 7\)"):
        non_max_suppression(np.zeros((5, 7), np.float32))
    with pytest.raises(ValueError, match=r"\(k, 5\+nc\).*\(5, 5\)"):
        nms_candidates(np.zeros((5, 5), np.float32))


# --------------------------------------------------------------------------------------- scale_boxes


@pytest.mark.parametrize("h0,w0", [(480, 640), (1080, 1920), (517, 333), (100, 1000)])
@pytest.mark.parametrize("auto", [True, False])
def test_scale_boxes_round_trip(h0, w0, auto):
    rng = np.random.default_rng(h0 + w0)
    xy1 = rng.uniform(0, 1, (50, 2)) * (w0, h0)
    xy2 = xy1 + rng.uniform(0, 1, (50, 2)) * ((w0, h0) - xy1)
    boxes0 = np.concatenate([xy1, xy2], 1).astype(np.float32)
    img1, (rw, rh), (dw, dh) = letterbox(np.zeros((h0, w0), np.uint8), 640, auto=auto)
    boxes1 = boxes0 * np.float32(rw) + np.float32([dw, dh, dw, dh])  # into letterbox pixels

    exact = scale_boxes(img1.shape, boxes1.copy(), (h0, w0), ratio_pad=((rw, rh), (dw, dh)))
    np.testing.assert_allclose(exact, boxes0, atol=1e-3)
    # From the shapes alone the pad is recomputed unrounded: off by at most half a pixel.
    approx = scale_boxes(img1.shape, boxes1.copy(), (h0, w0))
    np.testing.assert_allclose(approx, boxes0, atol=0.5 / rw + 1e-3)
    as_tensor = scale_boxes(img1.shape, torch.from_numpy(boxes1.copy()), (h0, w0))
    np.testing.assert_allclose(as_tensor.numpy(), approx, rtol=0, atol=1e-5)


def test_scale_boxes_clips_in_place_with_extra_columns():
    boxes = np.array([[-50, -10, 700, 500, 0.9, 2], [10, 20, 30, 40, 0.5, 1]], np.float32)
    # 640x480 letterboxed to 640x640 with 80 px bands top and bottom.
    out = scale_boxes((640, 640), boxes, (480, 640))
    assert out is boxes
    np.testing.assert_allclose(out, [[0, 0, 640, 420, 0.9, 2], [10, 0, 30, 0, 0.5, 1]])
    t = torch.tensor([[-50, -10, 700, 500.0]])
    assert scale_boxes((640, 640), t, (480, 640)).tolist() == [[0, 0, 640, 420]]


def test_importing_ops_does_not_import_torch():
    code = "import sys, edgepipe.yolo.ops, edgepipe.yolo; edgepipe.yolo.letterbox; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_numpy_nms_does_not_import_torch():
    code = (
        "import sys, numpy as np\n"
        "from edgepipe.yolo.ops import non_max_suppression\n"
        "p = np.random.default_rng(0).uniform(0, 1, (2, 100, 8)).astype(np.float32)\n"
        "p[..., :4] *= 100\n"
        "out = non_max_suppression(p)\n"
        "print(len(out[0]) > 0, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_module_constants_match_reference():
    assert ops.MAX_WH == 7680 and ops.MAX_NMS == 30000
