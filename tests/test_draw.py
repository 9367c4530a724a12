"""Annotation drawing (edgepipe/draw.py) on crowded frames: every label tag stays readable and
hides nothing else. A tag must not cover another tag or another box's outline; it sits above its
box when there is room, else inside or below it, else at the nearest free spot. Checked twice:
on the tag rectangles the layout reports, and on the drawn pixels."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import pytest

from edgepipe.draw import PALETTE, color, draw_detections, tag_layout

W, H = 480, 320
NAMES = ["circle", "square", "triangle", "cross", "pedestrian", "bicycle", "motorcycle", "truck",
         "traffic light", "umbrella"]

# One class (so one colour) per box. Stacked boxes 10 px apart (each one's tag above would land
# on the previous box's top edge and tag), a box at the top edge (no room above), two boxes side
# by side whose tags are wider than the boxes, a box inside a box, a box at the right edge.
CROWD = np.array([
    [40, 60, 150, 160, 0.95, 0],
    [50, 70, 160, 170, 0.90, 1],
    [60, 80, 170, 180, 0.85, 2],
    [200, 0, 260, 60, 0.80, 3],
    [300, 120, 330, 160, 0.75, 4],
    [332, 120, 362, 160, 0.70, 5],
    [200, 200, 420, 300, 0.65, 6],
    [240, 230, 300, 280, 0.60, 7],
    [430, 20, 479, 90, 0.55, 8],
    [20, 250, 90, 310, 0.50, 9],
], np.float32)


def _intersects(a: Sequence[int], b: Sequence[int]) -> bool:
    """Inclusive pixel rectangles (x1, y1, x2, y2) share at least one pixel."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _outline_bands(box: Sequence[float], half: int) -> List[Tuple[int, int, int, int]]:
    """The four strips a box outline of half-width ``half`` paints (with anti-aliasing slack)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box[:4])
    return [(x1 - half, y1 - half, x2 + half, y1 + half), (x1 - half, y2 - half, x2 + half, y2 + half),
            (x1 - half, y1 - half, x1 + half, y2 + half), (x2 - half, y1 - half, x2 + half, y2 + half)]


def _gray() -> np.ndarray:
    return np.full((H, W, 3), 128, np.uint8)


def test_tags_cover_no_other_tag_nor_another_box_outline():
    tags = tag_layout(CROWD, NAMES, W, H, thickness=2)
    assert len(tags) == len(CROWD) and all(t is not None for t in tags)
    rects = [t.rect for t in tags]
    for i, r in enumerate(rects):
        assert 0 <= r[0] <= r[2] < W and 0 <= r[1] <= r[3] < H, f"tag {i} {r} leaves the image"
        for j, other in enumerate(rects):
            if j != i:
                assert not _intersects(r, other), f"tag {i} {r} covers tag {j} {other}"
        for j, box in enumerate(CROWD):
            if j != i:
                for band in _outline_bands(box, 1):
                    assert not _intersects(r, band), f"tag {i} {r} covers the outline of box {j}"
        assert tags[i].text == f"{NAMES[int(CROWD[i, 5])]} {CROWD[i, 4]:.2f}"


def test_tag_goes_above_then_inside_or_below_then_nearest_free_spot():
    tags = tag_layout(CROWD, NAMES, W, H, thickness=2)
    x1, y1 = int(CROWD[0, 0]), int(CROWD[0, 1])
    first = tags[0].rect
    assert (first[0], first[3]) == (x1, y1), "with room above, the tag sits on the top edge"
    top_edge = tags[3].rect  # the box at y=0 has no room above: inside, under its top edge
    assert top_edge[1] == 0 and top_edge[0] == 200
    # The stacked boxes' tags cannot sit on their own top edges; each stays near its box.
    for i in (1, 2):
        r, box = tags[i].rect, CROWD[i]
        assert abs((r[0] + r[2]) / 2 - (box[0] + box[2]) / 2) < 150
        assert abs((r[1] + r[3]) / 2 - (box[1] + box[3]) / 2) < 150
    # A lone box keeps the classic place: above, left-aligned.
    (alone,) = tag_layout(CROWD[:1], NAMES, W, H, thickness=2)
    assert alone.rect == first


def _near(pixels: np.ndarray, bgr: Tuple[int, int, int], tol: int) -> np.ndarray:
    return (np.abs(pixels.astype(np.int32) - np.array(bgr)).max(axis=-1) <= tol)


def test_drawn_pixels_keep_every_outline_and_every_tag_whole():
    image = draw_detections(_gray(), CROWD, NAMES, thickness=2)
    # Every box outline keeps its colour, except where other boxes' own outlines cross it (and
    # under its own tag, which sits on it).
    tags = tag_layout(CROWD, NAMES, W, H, thickness=2)
    for i, box in enumerate(CROWD):
        x1, y1, x2, y2 = (int(v) for v in box[:4])
        points = [(x, y) for x in range(x1, x2 + 1) for y in (y1, y2)]
        points += [(x, y) for y in range(y1, y2 + 1) for x in (x1, x2)]
        others = [band for j, b in enumerate(CROWD) if j != i for band in _outline_bands(b, 2)]
        keep = [(x, y) for x, y in points if 0 <= x < W and 0 <= y < H
                and not _intersects((x, y, x, y), tags[i].rect)
                and not any(_intersects((x, y, x, y), band) for band in others)]
        assert len(keep) > 20
        hits = sum(_near(image[y, x], color(int(box[5])), 60) for x, y in keep)
        assert hits / len(keep) > 0.97, f"box {i}: {len(keep) - hits} outline pixels covered"
    # Every tag's border is its own colour all round: nothing was drawn over it.
    for i, tag in enumerate(tags):
        x1, y1, x2, y2 = tag.rect
        border = np.concatenate([image[y1, x1:x2 + 1], image[y2, x1:x2 + 1],
                                 image[y1:y2 + 1, x1], image[y1:y2 + 1, x2]])
        share = _near(border, tag.color, 8).mean()
        assert share > 0.98, f"tag {i} {tag.rect} is partly covered ({share:.2f})"
        inside = image[y1:y2 + 1, x1:x2 + 1]
        assert _near(inside, tag.color, 8).mean() > 0.4, f"tag {i} is not a filled block"


def test_layout_is_quick_and_total_for_a_full_frame_of_detections():
    # max_det boxes in a small picture: no free spot for most tags. Each still gets a place (the
    # preferred one), inside the image, and the drawing finishes.
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, [W - 40, H - 40], (300, 2))
    dets = np.concatenate([xy, xy + rng.uniform(10, 40, (300, 2)), rng.uniform(0.3, 1, (300, 1)),
                           rng.integers(0, len(PALETTE), (300, 1))], 1).astype(np.float32)
    tags = tag_layout(dets, NAMES, W, H)
    assert all(t is not None and 0 <= t.rect[0] and t.rect[2] < W and 0 <= t.rect[1] and t.rect[3] < H
               for t in tags)
    draw_detections(_gray(), dets, NAMES)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_boxes_get_no_tag(bad):
    dets = CROWD[:2].copy()
    dets[1, 2] = bad
    tags = tag_layout(dets, NAMES, W, H)
    assert tags[0] is not None and tags[1] is None
