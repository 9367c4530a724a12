"""The generated scenes behind the demo model and the synthetic source: deterministic, with
tight truth boxes, the four documented classes, sizes in range and varied rotations."""

from __future__ import annotations

import math
from typing import List

import numpy as np
import pytest

from edgepipe.scenes import CLASSES, SceneStream, Shape, render_scene, render_shape, shape_polygon


def test_classes_are_exactly_the_documented_four() -> None:
    assert CLASSES == ("circle", "square", "triangle", "cross")


def test_render_scene_is_deterministic_by_seed() -> None:
    a_img, a_truth = render_scene(np.random.default_rng(7), 160, 120)
    b_img, b_truth = render_scene(np.random.default_rng(7), 160, 120)
    c_img, _ = render_scene(np.random.default_rng(8), 160, 120)
    assert a_img.dtype == np.uint8 and a_img.shape == (120, 160)
    assert a_truth.dtype == np.float32 and a_truth.shape[1] == 5
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_truth, b_truth)
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("class_id", range(4))
@pytest.mark.parametrize("angle", [0.0, 0.3, 1.1, 2.5])
def test_box_is_tight_around_the_drawn_pixels(class_id: int, angle: float) -> None:
    shape = Shape(class_id=class_id, cx=50.3, cy=41.7, size=37.0, angle=angle, form=0.4)
    alpha, box = render_shape(shape, 100, 90)
    x1, y1, x2, y2 = (float(v) for v in box)
    # Longer side of the box is the requested size (nothing clipped here).
    assert max(x2 - x1, y2 - y1) == pytest.approx(37.0, abs=1e-3)
    ys, xs = np.nonzero(alpha > 0.02)
    # Every touched pixel [i, i+1) overlaps the box (anti-aliasing reaches under half a pixel).
    assert xs.min() + 1 > x1 - 0.5 and xs.max() < x2 + 0.5
    assert ys.min() + 1 > y1 - 0.5 and ys.max() < y2 + 0.5
    # ...and the mostly covered pixels reach each side of the box within a pixel.
    ys, xs = np.nonzero(alpha >= 0.5)
    assert abs(xs.min() - x1) <= 1.0 and abs(xs.max() + 1 - x2) <= 1.0
    assert abs(ys.min() - y1) <= 1.0 and abs(ys.max() + 1 - y2) <= 1.0


def test_box_is_clipped_to_the_image() -> None:
    shape = Shape(class_id=1, cx=5.0, cy=60.0, size=30.0, angle=0.2)
    _, box = render_shape(shape, 80, 70)
    assert box[0] == 0.0 and box[3] == 70.0
    assert shape_polygon(shape)[:, 0].min() < 0


def _single_shapes(seed: int, n: int, size_range: tuple, side: int = 200):
    """Yields (image, class_id, box, fill) for scenes with one shape well inside the frame,
    rendered without camera effects (so the shape is a flat fill)."""
    rng = np.random.default_rng(seed)
    got = 0
    while got < n:
        img, truth = render_scene(rng, side, side, n_objects=(1, 1), size_range=size_range,
                                  effects=False)
        for c, x1, y1, x2, y2 in truth:
            if min(x1, y1) < 4 or max(x2, y2) > side - 4:
                continue
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            got += 1
            yield img, int(c), (x1, y1, x2, y2), int(img[cy, cx])


def test_scene_boxes_are_tight_on_the_image() -> None:
    """Each side of a truth box has shape pixels (at least a quarter of the way from the
    background to the fill) within its first two pixel rows/columns, and nothing looking like
    the shape (its exact fill) lies two to four pixels outside it."""
    for img, c, (x1, y1, x2, y2), fill in _single_shapes(3, 12, (20, 70)):
        ix1, iy1, ix2, iy2 = int(x1), int(y1), int(math.ceil(x2)), int(math.ceil(y2))
        outside = np.ones(img.shape, bool)
        outside[max(iy1 - 2, 0):iy2 + 2, max(ix1 - 2, 0):ix2 + 2] = False
        around = np.zeros(img.shape, bool)
        around[max(iy1 - 6, 0):iy2 + 6, max(ix1 - 6, 0):ix2 + 6] = True
        background = float(np.median(img[outside & around]))
        frac = (img.astype(float) - background) / (fill - background)
        inside = frac[iy1:iy2, ix1:ix2] >= 0.25
        assert inside[:, :2].any() and inside[:, -2:].any(), (c, x1, x2)
        assert inside[:2, :].any() and inside[-2:, :].any(), (c, y1, y2)
        ring = outside.copy()
        ring[:max(iy1 - 4, 0)] = ring[iy2 + 4:] = False
        ring[:, :max(ix1 - 4, 0)] = ring[:, ix2 + 4:] = False
        assert not (np.abs(img.astype(int) - fill) <= 2)[ring].any(), c


def test_scene_classes_and_sizes_within_range() -> None:
    rng = np.random.default_rng(11)
    classes, sizes = [], []
    for _ in range(30):
        _, truth = render_scene(rng, 256, 256, size_range=(16, 90))
        for c, x1, y1, x2, y2 in truth:
            classes.append(int(c))
            # Clipped or partly covered shapes are smaller, never larger.
            long_side = max(x2 - x1, y2 - y1)
            unclipped = x1 > 0 and y1 > 0 and x2 < 256 and y2 < 256
            assert long_side <= 90 + 1e-3
            if unclipped:
                sizes.append(long_side)
    assert set(classes) == {0, 1, 2, 3}
    assert min(sizes) >= 16 - 1.0  # occlusion trims to whole pixels
    assert max(sizes) > 60 and min(sizes) < 25


def test_scene_has_lighter_and_darker_shapes() -> None:
    rng = np.random.default_rng(5)
    signs = set()
    for _ in range(20):
        img, truth = render_scene(rng, 160, 160, n_objects=(1, 1), size_range=(40, 60), effects=False)
        for _c, x1, y1, x2, y2 in truth:
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            centre = float(img[cy - 2:cy + 3, cx - 2:cx + 3].mean())
            ring = np.concatenate([img[max(int(y1) - 4, 0), int(x1):int(x2)],
                                   img[min(int(y2) + 3, 159), int(x1):int(x2)]]).astype(float)
            if abs(centre - ring.mean()) > 10:
                signs.add(centre > ring.mean())
    assert signs == {True, False}


def test_rotation_variety() -> None:
    """Squares come at many angles: the fraction of their box they fill is 1 when axis-aligned
    and 1/2 at 45 degrees, and the scenes cover that range."""
    fills = []
    for img, c, (x1, y1, x2, y2), fill in _single_shapes(2, 60, (50, 80)):
        if c != 1:
            continue
        box = img[int(y1):int(math.ceil(y2)), int(x1):int(math.ceil(x2))].astype(int)
        fills.append(float((np.abs(box - fill) <= 2).mean()))
    assert len(fills) >= 8
    assert min(fills) < 0.6 and max(fills) > 0.85
    assert len(np.unique(np.round(np.array(fills), 1))) >= 3


def test_stream_is_deterministic_and_moves() -> None:
    a, b = SceneStream(320, 180, seed=4), SceneStream(320, 180, seed=4)
    frames = [a.next() for _ in range(5)]
    for img, truth in frames:
        img_b, truth_b = b.next()
        np.testing.assert_array_equal(img, img_b)
        np.testing.assert_array_equal(truth, truth_b)
    assert frames[0][0].shape == (180, 320) and frames[0][0].dtype == np.uint8
    assert not np.array_equal(frames[0][1], frames[4][1])  # shapes moved
    assert not np.array_equal(SceneStream(320, 180, seed=5).next()[0], frames[0][0])


def test_stream_default_sizes_scale_with_the_frame() -> None:
    for w, h in ((1280, 720), (720, 1280)):
        stream = SceneStream(w, h, seed=1, objects=8)
        assert stream.size_range == pytest.approx((28.0, 300.0))
        sizes, classes = [], set()
        for _ in range(40):
            _, truth = stream.next()
            for c, x1, y1, x2, y2 in truth:
                classes.add(int(c))
                sizes.append(max(x2 - x1, y2 - y1))
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert classes == {0, 1, 2, 3}
        assert max(sizes) <= 300 + 1e-3 and min(sizes) >= 0.4 * 28  # covered ones shrink


def test_stream_stays_in_frame_over_time() -> None:
    stream = SceneStream(200, 150, seed=9, objects=3)
    counts = [len(stream.next()[1]) for _ in range(300)]
    assert np.mean(counts) > 2.0  # bouncing keeps them in view; only overlaps hide one briefly


def test_bad_arguments_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="size_range"):
        render_scene(np.random.default_rng(0), 64, 64, size_range=(30, 10))
    with pytest.raises(ValueError, match="too small"):
        SceneStream(8, 8)
    with pytest.raises(ValueError, match="class_id 7"):
        shape_polygon(Shape(class_id=7, cx=0, cy=0, size=10, angle=0))


def test_min_visible_labels_shapes_partly_out_of_the_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """``min_visible`` and ``place_visible`` (what training for partly seen objects uses): with
    0.3, shapes are placed down to 40% inside the frame and labelled; by default none is placed
    under 70%; with 0.4 placed down to 0.3, the shapes drawn under 40% inside get no label."""
    import edgepipe.scenes as scenes

    placed: List[float] = []
    labelled: List[float] = []
    original = scenes._composite

    def spy(canvas, shapes, polys, min_visible, kept=None):  # type: ignore[no-untyped-def]
        kept_here: List[int] = []
        truth = original(canvas, shapes, polys, min_visible, kept_here)
        h, w = canvas.shape
        inside = [scenes._visible_fraction(p, w, h) for p in polys]
        placed.extend(inside)
        labelled.extend(inside[i] for i in kept_here)
        return truth

    monkeypatch.setattr(scenes, "_composite", spy)
    found = {}
    for min_visible, place_visible in ((0.6, None), (0.3, None), (0.4, 0.3)):
        placed.clear()
        labelled.clear()
        rng = np.random.default_rng(17)
        for _ in range(60):
            render_scene(rng, 160, 160, n_objects=(2, 6), size_range=(30, 120), effects=False,
                         min_visible=min_visible, place_visible=place_visible)
        found[min_visible] = np.array(placed), np.array(labelled)
    for _, kept in found.values():
        assert len(kept) > 100
    assert found[0.6][0].min() >= 0.7 - 1e-6
    assert found[0.3][1].min() >= 0.4 - 1e-6
    assert (found[0.3][1] < 0.6).mean() > 0.05
    placed_04, kept_04 = found[0.4]
    assert placed_04.min() >= 0.3 - 1e-6 and (placed_04 < 0.37).sum() >= 5
    # A shape less than 40% inside is less than 40% visible (the fraction inside is measured on
    # the convex hull, a little under the true one for a cross).
    assert kept_04.min() >= 0.37
