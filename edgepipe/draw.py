"""Annotation drawing shared by the sinks that show pictures (preview page, video file, JPEG frames).

A frame reaches a sink with its detections in ORIGINAL-frame pixels. :func:`annotate` picks the
best picture the frame carries (the original when a sink asked for it with ``needs_original``,
else the letterboxed detector input, onto which the boxes are mapped forward through the
letterbox ``ratio``/``pad``), turns it into BGR so that boxes can be coloured on a gray stream, and
draws each detection as a rectangle with a filled tag reading ``label confidence``. Colours are a
fixed function of the class id, so the same class looks the same in every sink and every run.
Nothing here keeps a reference to the frame's arrays: the result is always a new image.

In a crowd (people in a queue, cars in a car park) tags placed blindly above each box hide one
another and the neighbours' outlines. :func:`tag_layout` places them first, in detection order
(NMS sorts by confidence, so the surest detection gets the best place): above the box, else
just inside its top edge, else below it, else the nearest spot that covers no other tag and no
other box's outline; every outline is drawn before any tag, so no box line crosses a tag.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np

from edgepipe.messages import Frame

__all__ = [
    "PALETTE", "Tag", "annotate", "color", "draw_detections", "map_to_letterbox", "picture",
    "tag_layout", "to_bgr",
]

# BGR. Saturated colours that stay distinguishable from any gray and from each other; the first
# four are the demo model's classes (circle, square, triangle, cross).
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (0, 0, 255),  # red
    (0, 200, 0),  # green
    (255, 64, 0),  # blue
    (0, 215, 255),  # amber
    (255, 0, 255),  # magenta
    (255, 255, 0),  # cyan
    (0, 128, 255),  # orange
    (160, 0, 255),  # pink
    (0, 255, 160),  # lime
    (255, 128, 128),  # lavender
)


def color(cls: int) -> Tuple[int, int, int]:
    """The BGR colour of class ``cls`` (cycles through :data:`PALETTE`)."""
    return PALETTE[int(cls) % len(PALETTE)]


def to_bgr(image: np.ndarray) -> np.ndarray:
    """A new contiguous uint8 BGR copy of a gray (H, W) / (H, W, 1) or BGR (H, W, 3) image.

    Raises ValueError naming the shape or dtype when the array is not an image.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype is {image.dtype}, expected uint8")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(np.ascontiguousarray(image.reshape(image.shape[0], image.shape[1])), cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return np.array(image, dtype=np.uint8, order="C", copy=True)
    raise ValueError(f"image shape {tuple(image.shape)} is neither (H, W) gray nor (H, W, 3) BGR")


def map_to_letterbox(
    boxes: np.ndarray, ratio: Sequence[float], pad: Sequence[float]
) -> np.ndarray:
    """Original-frame boxes (n, >=4) -> letterboxed-image pixels: ``x * rw + dw, y * rh + dh``.

    The inverse of the NMS stage's mapping (the reference ``scale_boxes``). Returns a new float32
    array with the same columns; only the first four are changed.
    """
    out = np.array(boxes, dtype=np.float32, copy=True)
    if out.size:
        out[:, [0, 2]] = out[:, [0, 2]] * float(ratio[0]) + float(pad[0])
        out[:, [1, 3]] = out[:, [1, 3]] * float(ratio[1]) + float(pad[1])
    return out


def picture(frame: Frame) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(BGR copy of the frame's best picture, its detections in that picture's pixels), or None.

    The original is used when present. Otherwise the letterboxed ``image`` is used and the
    detections are mapped through ``ratio``/``pad`` (unmapped when the frame was never
    letterboxed, i.e. ``image`` is still the source frame). None when the frame has no picture.
    """
    dets = frame.detections
    if dets is None:
        dets = np.zeros((0, 6), np.float32)
    if frame.original is not None:
        return to_bgr(frame.original), np.array(dets, dtype=np.float32, copy=True)
    if frame.image is None:
        return None
    if frame.ratio is not None and frame.pad is not None:
        dets = map_to_letterbox(dets, frame.ratio, frame.pad)
    return to_bgr(frame.image), np.array(dets, dtype=np.float32, copy=True)


def _label(cls: int, names: Optional[List[str]]) -> str:
    return names[cls] if names is not None and 0 <= cls < len(names) else str(cls)


class Tag(NamedTuple):
    """A placed label tag: its text, its filled rectangle (x1, y1, x2, y2, pixels inclusive) and
    the class colour it is filled with."""

    text: str
    rect: Tuple[int, int, int, int]
    color: Tuple[int, int, int]


FONT = cv2.FONT_HERSHEY_SIMPLEX


def _style(width: int, height: int, thickness: Optional[int]) -> Tuple[int, float, int]:
    """(box line thickness, font scale, font thickness) for a picture of this size."""
    t = thickness if thickness is not None else max(2, int(round(max(height, width) / 300)))
    return t, max(0.4, max(height, width) / 1600), max(1, t // 2)


def _hits(rects: np.ndarray, obstacles: np.ndarray) -> np.ndarray:
    """(m,) count of ``obstacles`` (k, 4) each of the ``rects`` (m, 4) shares a pixel with."""
    if not len(obstacles):
        return np.zeros(len(rects), np.int64)
    r, o = rects[:, None, :], obstacles[None, :, :]
    touch = (r[..., 0] <= o[..., 2]) & (o[..., 0] <= r[..., 2]) & (r[..., 1] <= o[..., 3]) & (o[..., 1] <= r[..., 3])
    return touch.sum(axis=1)


def _outlines(boxes: np.ndarray, half: int) -> np.ndarray:
    """(n, 4, 4): the four strips (top, bottom, left, right) each box's outline paints."""
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))
    strips = [
        np.concatenate([x1 - half, y1 - half, x2 + half, y1 + half], 1),
        np.concatenate([x1 - half, y2 - half, x2 + half, y2 + half], 1),
        np.concatenate([x1 - half, y1 - half, x1 + half, y2 + half], 1),
        np.concatenate([x2 - half, y1 - half, x2 + half, y2 + half], 1),
    ]
    return np.stack(strips, 1)


_SPIRALS: Dict[Tuple[int, int], np.ndarray] = {}


def _spiral(x: int, y: int, reach: int, step: int) -> np.ndarray:
    """(m, 2) grid points within ``reach`` of (x, y) in steps of ``step``, nearest first."""
    offsets = _SPIRALS.get((reach, step))
    if offsets is None:
        grid = np.arange(-reach, reach + 1, step)
        dx, dy = np.meshgrid(grid, grid)
        order = np.argsort(np.hypot(dx, dy).ravel(), kind="stable")
        offsets = _SPIRALS[(reach, step)] = np.stack([dx.ravel()[order], dy.ravel()[order]], 1)
    return offsets + [x, y]


def tag_layout(
    detections: np.ndarray,
    names: Optional[List[str]],
    width: int,
    height: int,
    thickness: Optional[int] = None,
) -> List[Optional[Tag]]:
    """Where :func:`draw_detections` puts each detection's tag in a ``width`` x ``height`` picture.

    One entry per (n, 6) ``x1 y1 x2 y2 conf cls`` row (None for a box with a non-finite corner).
    Tags are placed in row order. Each takes the first of these that lies inside the picture and
    covers no tag placed before it and no other box's outline: above the box (resting on its top
    edge, left-aligned), just inside the top edge, just below the bottom edge; else the nearest
    such spot on a grid of half a tag's height around the place above the box (within four tag
    heights); else, in a picture too crowded for any, the place above the box.
    """
    t, font_scale, font_thick = _style(width, height, thickness)
    dets = np.asarray(detections, dtype=np.float64).reshape(-1, 6)
    finite = np.asarray(np.isfinite(dets[:, :4]).all(axis=1), dtype=bool)
    boxes = np.zeros((len(dets), 4), np.int64)
    boxes[finite] = np.round(dets[finite, :4]).astype(np.int64)
    # Half the outline's width, and a pixel more for its anti-aliased fringe.
    outlines = _outlines(boxes, t // 2 + 1)
    placed = np.zeros((len(dets), 4), np.int64)
    tags: List[Optional[Tag]] = []
    for i, (_, _, _, _, conf, cls) in enumerate(dets):
        if not finite[i]:
            tags.append(None)
            continue
        text = f"{_label(int(cls), names)} {conf:.2f}"
        (tw, th), base = cv2.getTextSize(text, FONT, font_scale, font_thick)
        w, h = tw + 2, th + base + 2  # the tag is (w + 1) x (h + 1) pixels
        x1, y1, _, y2 = (int(v) for v in boxes[i])
        left = min(max(x1, 0), max(width - 1 - w, 0))
        reach = 4 * h
        # Only what lies within the search area can be in the way.
        area = np.array([[left - reach, y1 - h - reach, left + w + reach, y1 + reach]])
        obstacles = np.concatenate([np.delete(outlines, i, axis=0).reshape(-1, 4), placed[: len(tags)]])
        obstacles = obstacles[_hits(obstacles, area) > 0]
        rect = None
        for corners in (
            np.array([[left, y1 - h], [left, y1], [left, y2]]),  # above, inside, below
            _spiral(left, y1 - h, reach, max(2, h // 2)),  # then the nearest free spot
        ):
            rects = np.concatenate([corners, corners + [w, h]], 1)
            inside = (rects[:, 0] >= 0) & (rects[:, 1] >= 0) & (rects[:, 2] < width) & (rects[:, 3] < height)
            free = np.flatnonzero(inside & (_hits(rects, obstacles) == 0))
            if len(free):
                rect = rects[free[0]]
                break
        if rect is None:  # nowhere free: above the box, kept inside the picture
            top = min(max(y1 - h, 0), max(height - 1 - h, 0))
            rect = np.array([left, top, left + w, top + h])
        placed[len(tags)] = rect
        tags.append(Tag(text, (int(rect[0]), int(rect[1]), int(rect[2]), int(rect[3])), color(int(cls))))
    return tags


def draw_detections(
    image: np.ndarray,
    detections: np.ndarray,
    names: Optional[List[str]] = None,
    thickness: Optional[int] = None,
) -> np.ndarray:
    """Draw (n, 6) ``x1 y1 x2 y2 conf cls`` boxes, in ``image``'s pixels, onto BGR ``image`` in place.

    Each box gets its class colour and a filled tag ``"<label> <conf>"`` placed by
    :func:`tag_layout` (above the box unless that covers another tag or box). ``thickness``
    defaults to about 1/300 of the image's larger side, at least 2 px, so boxes stay visible
    after JPEG compression and scaling. Every box is drawn before the tags. Returns ``image``.
    """
    h, w = image.shape[:2]
    t, font_scale, font_thick = _style(w, h, thickness)
    dets = np.asarray(detections, dtype=np.float64).reshape(-1, 6)
    tags = tag_layout(dets, names, w, h, thickness)
    for (x1, y1, x2, y2, _, cls), tag in zip(dets, tags):
        if tag is not None:
            p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
            cv2.rectangle(image, p1, p2, color(int(cls)), t, cv2.LINE_AA)
    for tag in tags:
        if tag is None:
            continue
        left, top, right, bottom = tag.rect
        c = tag.color
        cv2.rectangle(image, (left, top), (right, bottom), c, -1)
        # Dark text on the bright tags, white on the dark ones: readable on every class colour.
        luma = 0.114 * c[0] + 0.587 * c[1] + 0.299 * c[2]
        ink = (0, 0, 0) if luma > 110 else (255, 255, 255)
        (_, th), _ = cv2.getTextSize(tag.text, FONT, font_scale, font_thick)
        cv2.putText(image, tag.text, (left + 1, top + th + 1), FONT, font_scale, ink, font_thick, cv2.LINE_AA)
    return image


def annotate(frame: Frame, thickness: Optional[int] = None) -> Optional[np.ndarray]:
    """A new BGR image of ``frame`` with its detections drawn (see :func:`picture`), or None
    when the frame carries no picture."""
    found = picture(frame)
    if found is None:
        return None
    image, dets = found
    return draw_detections(image, dets, frame.names, thickness)
