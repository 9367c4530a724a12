"""Procedurally generated grayscale scenes with ground truth: the demo model's world.

Four classes of filled shapes (:data:`CLASSES`) are drawn anti-aliased at any position, size and
rotation, lighter or darker than their surroundings, over noisy gradient and textured
backgrounds, then blurred, re-lit, motion-blurred and given sensor noise. :func:`render_scene`
makes independent training/evaluation images; :class:`SceneStream` makes a deterministic video
of moving, rotating, bouncing shapes for the ``synthetic`` source (or shapes that leave the frame
and are replaced by new ones coming in, or shapes following a script of straight paths). Both
draw shapes with the same code, so a model trained on one detects the other. The video knows
which object is which: :attr:`SceneStream.last_ids` gives the identity of each truth row, for
measuring trackers.

Coordinates: pixel ``i`` covers the interval ``[i, i + 1)``; a truth row is
``[class_id, x1, y1, x2, y2]`` in those continuous pixel coordinates, the tight axis-aligned box
of the drawn shape (computed from the drawn polygon, clipped to the image; for a shape partly
hidden by a later one, the box of its visible pixels). Only numpy and OpenCV are used (no torch),
so sources can import this cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["CLASSES", "SceneStream", "ScriptedPath", "Shape", "render_scene", "render_shape", "shape_polygon"]

CLASSES = ("circle", "square", "triangle", "cross")

_SHIFT = 4  # fixed-point bits for sub-pixel drawing in cv2.fillPoly
_SUPERSAMPLE = 4  # anti-aliasing: shapes are filled at 4x and averaged down
_MIN_VISIBLE = 0.6  # a shape keeps at least this fraction of its area visible (else re-placed)
_MIN_CONTRAST = 28.0  # gray levels between a shape and the background under it, before re-lighting


@dataclass
class Shape:
    """One shape: class, centre (continuous pixels), size (longer side of its tight box before
    clipping), rotation in radians, and a class-specific form parameter in [0, 1) (cross arm
    thickness, triangle vertex jitter seed); ``value`` is its fill gray level."""

    class_id: int
    cx: float
    cy: float
    size: float
    angle: float
    form: float = 0.5
    value: float = 255.0


def _unit_outline(class_id: int, form: float) -> np.ndarray:
    """The shape's outline (K, 2) around the origin, before rotation and scaling."""
    if class_id == 0:  # circle
        t = np.linspace(0.0, 2.0 * math.pi, 96, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if class_id == 1:  # square
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    if class_id == 2:  # triangle: equilateral with each vertex moved a little, form seeds how
        t = np.array([-0.5 * math.pi, math.pi / 6.0, 5.0 * math.pi / 6.0])
        jitter = np.random.default_rng(int(form * 1e6)).uniform(-0.12, 0.12, (3, 2))
        return np.stack([np.cos(t), np.sin(t)], 1) + jitter
    if class_id == 3:  # cross: two bars of equal length, thickness 0.22..0.46 of the length
        h = 0.22 + 0.24 * form
        return np.array(
            [[-h, -1], [h, -1], [h, -h], [1, -h], [1, h], [h, h],
             [h, 1], [-h, 1], [-h, h], [-1, h], [-1, -h], [-h, -h]], np.float64)
    raise ValueError(f"class_id {class_id} is not one of 0..{len(CLASSES) - 1} ({', '.join(CLASSES)})")


def shape_polygon(shape: Shape) -> np.ndarray:
    """The drawn outline (K, 2) of ``shape`` in continuous image coordinates: rotated, and scaled
    so that the longer side of its tight axis-aligned box equals ``shape.size``."""
    pts = _unit_outline(shape.class_id, shape.form)
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    extent = float(max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1])))
    pts = pts * (shape.size / extent)
    return pts + np.array([shape.cx, shape.cy])


def _clip_box(pts: np.ndarray, width: int, height: int) -> Tuple[float, float, float, float]:
    x1, y1 = pts.min(0)
    x2, y2 = pts.max(0)
    return (float(np.clip(x1, 0, width)), float(np.clip(y1, 0, height)),
            float(np.clip(x2, 0, width)), float(np.clip(y2, 0, height)))


def _alpha(pts: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Coverage (h, w) float32 in [0, 1] of polygon ``pts`` inside the window whose top-left
    pixel is (x0, y0), by 4x4 supersampling (OpenCV's own LINE_AA fill spreads shapes by most of
    a pixel, which would make the boxes loose). OpenCV puts pixel centres on integers."""
    ss = _SUPERSAMPLE
    mask = np.zeros((h * ss, w * ss), np.uint8)
    fixed = np.round((ss * (pts - (x0, y0)) - 0.5) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [fixed], 255, cv2.LINE_8, _SHIFT)
    cover = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA)
    return cover.astype(np.float32) * (1.0 / 255.0)


def _window(pts: np.ndarray, width: int, height: int) -> Tuple[int, int, int, int] | None:
    """Pixel window (x0, y0, x1, y1), exclusive end, covering the polygon plus a margin for
    anti-aliasing, clipped to the image; None when it is entirely outside."""
    x0 = max(int(math.floor(pts[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(pts[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + 2, width)
    y1 = min(int(math.ceil(pts[:, 1].max())) + 2, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def render_shape(shape: Shape, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """Coverage of ``shape`` alone: (alpha float32 (height, width) in [0, 1], box float32 (4,)
    x1, y1, x2, y2 clipped to the image). The box is computed from the same polygon that is
    filled, so it is tight up to anti-aliasing (half a pixel)."""
    pts = shape_polygon(shape)
    alpha = np.zeros((height, width), np.float32)
    win = _window(pts, width, height)
    if win is not None:
        x0, y0, x1, y1 = win
        alpha[y0:y1, x0:x1] = _alpha(pts, x0, y0, x1 - x0, y1 - y0)
    return alpha, np.array(_clip_box(pts, width, height), np.float32)


# ----------------------------------------------------------------------------------------------
# Backgrounds and image effects


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish amplitude value noise with about ``cells`` blobs across the image."""
    gw = max(2, int(round(cells * width / max(width, height))) + 1)
    gh = max(2, int(round(cells * height / max(width, height))) + 1)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A linear ramp in a random direction, -1 at one corner side to +1 at the other."""
    a = rng.uniform(0, 2 * math.pi)
    xs = (np.arange(width, dtype=np.float32) - width / 2) / max(width, height) * 2
    ys = (np.arange(height, dtype=np.float32) - height / 2) / max(width, height) * 2
    return math.cos(a) * xs[None, :] + math.sin(a) * ys[:, None]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A float32 gray background: base level, gradient, and one or two kinds of texture."""
    bg = np.full((height, width), rng.uniform(25, 230), np.float32)
    bg += rng.uniform(0, 60) * _gradient(rng, width, height)
    kinds = rng.choice(5, size=int(rng.integers(1, 3)), replace=False)
    for kind in kinds:
        if kind == 0:  # large soft blotches
            bg += rng.uniform(5, 35) * _smooth_noise(rng, width, height, int(rng.integers(2, 6)))
        elif kind == 1:  # multi-octave texture
            for octave in range(3):
                bg += rng.uniform(2, 14) * _smooth_noise(rng, width, height, 8 * 2 ** octave)
        elif kind == 2:  # stripes
            f = rng.uniform(0.02, 0.25)
            a = rng.uniform(0, math.pi)
            xs = np.arange(width, dtype=np.float32)[None, :]
            ys = np.arange(height, dtype=np.float32)[:, None]
            bg += rng.uniform(4, 22) * np.sin(f * (math.cos(a) * xs + math.sin(a) * ys))
        elif kind == 3:  # fine grain that stays put (paper, concrete)
            grain = rng.standard_normal((height, width)).astype(np.float32)
            bg += rng.uniform(3, 14) * cv2.GaussianBlur(grain, (0, 0), rng.uniform(0.6, 1.5))
        else:  # clutter that is not a class: lines and soft blobs
            _clutter(rng, bg, int(rng.integers(2, 10)))
    return bg


def _clutter(rng: np.random.Generator, bg: np.ndarray, count: int) -> None:
    """Draws distractors (thin lines, soft elongated blobs) into ``bg`` in place."""
    height, width = bg.shape
    for _ in range(count):
        v = float(rng.uniform(-70, 70))
        if rng.random() < 0.6:
            p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            layer = np.zeros_like(bg)
            cv2.line(layer, p1, p2, 1.0, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            layer = np.zeros_like(bg)
            c = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(4, max(5, width // 6))), int(rng.integers(2, max(3, height // 12))))
            cv2.ellipse(layer, c, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
            layer = cv2.GaussianBlur(layer, (0, 0), float(rng.uniform(2, 6)))
        bg += v * layer


def _fill_value(rng: np.random.Generator, region: np.ndarray, min_contrast: float) -> float:
    """A gray level lighter than the brighter part of the background ``region`` under a shape,
    or darker than its darker part, by at least ``min_contrast`` where 0..255 leaves room (a
    gradient under a large shape must not hide one of its sides)."""
    dark, light = (float(v) for v in np.percentile(region, (5, 95)))
    room_up, room_down = 255.0 - light, dark
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if (room_up if sign > 0 else room_down) < min_contrast:
        sign = -sign
    room = max(room_up if sign > 0 else room_down, 0.0)
    # Low contrasts are the hard cases worth seeing often, so favour them.
    c = min_contrast + max(room - min_contrast, 0.0) * rng.random() ** 1.5
    return float(np.clip((light if sign > 0 else dark) + sign * c, 0, 255))


def _composite(canvas: np.ndarray, shapes: List[Shape], polys: List[np.ndarray],
               min_visible: float, kept: Optional[List[int]] = None) -> np.ndarray:
    """Draws ``shapes`` in order onto the float canvas; returns truth rows for those at least
    ``min_visible`` visible (later shapes cover earlier ones; the box of a partly covered
    shape is the box of its pixels that stay at least half visible). ``kept``, when given,
    receives the index in ``shapes`` of each returned row."""
    height, width = canvas.shape
    drawn: List[Tuple[int, Tuple[int, int, int, int], np.ndarray]] = []
    for i, (shape, pts) in enumerate(zip(shapes, polys)):
        win = _window(pts, width, height)
        if win is None:
            continue
        x0, y0, x1, y1 = win
        a = _alpha(pts, x0, y0, x1 - x0, y1 - y0)
        roi = canvas[y0:y1, x0:x1]
        roi += (shape.value - roi) * a
        drawn.append((i, win, a))
    truth = []
    for k, (i, (x0, y0, x1, y1), a) in enumerate(drawn):
        cover = np.zeros_like(a)
        for _, (u0, v0, u1, v1), b in drawn[k + 1:]:  # later shapes lie on top
            ix0, iy0, ix1, iy1 = max(x0, u0), max(y0, v0), min(x1, u1), min(y1, v1)
            if ix0 < ix1 and iy0 < iy1:
                sub = cover[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
                np.maximum(sub, b[iy0 - v0:iy1 - v0, ix0 - u0:ix1 - u0], out=sub)
        area = abs(cv2.contourArea(polys[i].astype(np.float32)))
        visible = a * (1.0 - cover)
        seen = float(visible.sum())
        if area <= 0 or seen < min_visible * area:
            continue
        box = _clip_box(polys[i], width, height)
        if seen < 0.995 * float(a.sum()):  # partly covered: box of what is left
            ys, xs = np.nonzero(visible >= 0.5)
            if xs.size == 0:
                continue
            box = (float(x0 + xs.min()), float(y0 + ys.min()),
                   float(x0 + xs.max() + 1), float(y0 + ys.max() + 1))
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        truth.append((shapes[i].class_id,) + box)
        if kept is not None:
            kept.append(i)
    return np.array(truth, np.float32).reshape(-1, 5)


def _visible_fraction(pts: np.ndarray, width: int, height: int) -> float:
    """Fraction of the shape's convex hull inside the image (close enough for a cross too)."""
    hull = cv2.convexHull(pts.astype(np.float32))
    rect = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    inter, _ = cv2.intersectConvexConvex(hull, rect)
    hull_area = abs(cv2.contourArea(hull))
    return float(inter) / hull_area if hull_area > 0 else 0.0


def _overlap_ok(pts: np.ndarray, placed: List[np.ndarray], width: int, height: int,
                visible: float = _MIN_VISIBLE + 0.1) -> bool:
    """True when drawing ``pts`` over the already placed shapes leaves each of them at least
    ``visible`` visible (cheap test on the shapes' windows)."""
    for other in placed:
        win = _window(other, width, height)
        if win is None:
            continue
        x0, y0, x1, y1 = win
        a = _alpha(other, x0, y0, x1 - x0, y1 - y0)
        b = _alpha(pts, x0, y0, x1 - x0, y1 - y0)
        total = float(a.sum())
        if total > 0 and float((a * (1.0 - b)).sum()) < visible * total:
            return False
    return True


def _motion_blur(rng: np.random.Generator, img: np.ndarray, length: float) -> np.ndarray:
    k = int(math.ceil(length)) | 1
    kernel = np.zeros((k, k), np.float32)
    a = rng.uniform(0, math.pi)
    c = (k - 1) / 2
    dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
    cv2.line(kernel, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))),
             1.0, 1, cv2.LINE_AA)
    kernel /= max(float(kernel.sum()), 1e-6)
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)


def _effects(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Camera effects on a float image: uneven lighting, blur, motion blur, brightness/gamma,
    sensor noise, occasional JPEG; returns uint8."""
    height, width = img.shape
    if rng.random() < 0.6:  # uneven illumination multiplies everything, shapes included
        light = 1.0 + rng.uniform(0, 0.35) * _gradient(rng, width, height)
        light += rng.uniform(0, 0.2) * _smooth_noise(rng, width, height, 3)
        img = img * np.clip(light, 0.4, 1.8)
    if rng.random() < 0.4:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.4, 1.2)))
    if rng.random() < 0.3:
        img = _motion_blur(rng, img, float(rng.uniform(2, 6)))
    if rng.random() < 0.7:  # brightness, contrast, gamma
        img = img * rng.uniform(0.7, 1.25) + rng.uniform(-25, 25)
        if rng.random() < 0.4:
            g = rng.uniform(0.7, 1.4)
            img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** g
    sigma = rng.uniform(0, 12) if rng.random() < 0.85 else rng.uniform(12, 20)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 90))])
        decoded = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
        if decoded is not None:
            out = decoded.astype(np.uint8, copy=False)
    return out


def _random_shape(rng: np.random.Generator, size_range: Tuple[float, float],
                  width: int, height: int) -> Shape:
    lo, hi = size_range
    size = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))  # small ones as often as large
    margin = 0.2 * size  # may stick out of the frame a little
    return Shape(
        class_id=int(rng.integers(0, len(CLASSES))),
        cx=float(rng.uniform(-margin, width + margin)),
        cy=float(rng.uniform(-margin, height + margin)),
        size=size,
        angle=float(rng.uniform(0, 2 * math.pi)),
        form=float(rng.random()),
    )


def render_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    n_objects: Tuple[int, int] = (1, 8),
    size_range: Tuple[float, float] = (12, 160),
    min_contrast: float = _MIN_CONTRAST,
    effects: bool = True,
    min_visible: float = _MIN_VISIBLE,
    place_visible: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """One random scene: (image uint8 (height, width), truth float32 (n, 5) rows
    ``[class_id, x1, y1, x2, y2]``).

    ``n_objects`` is the inclusive range of shapes attempted (a shape that cannot be placed with
    at least ``place_visible`` of it inside the frame, and leaving each shape under it that much
    visible, is left out; a shape drawn less than ``min_visible`` visible gets no label;
    ``place_visible`` is ``min_visible`` + 0.1 unless given: below ``min_visible``, some shapes
    are drawn too little visible to be labelled, as objects are that a detector should not report);
    ``size_range`` bounds the longer side of each shape's tight box in pixels (log-uniform).
    ``effects=False`` skips the camera effects (lighting, blur, noise), for tests.
    Deterministic for a given ``rng`` state.
    """
    if width < 8 or height < 8:
        raise ValueError(f"scene size {width}x{height} is too small (need at least 8x8)")
    lo, hi = float(size_range[0]), float(size_range[1])
    if not 2 <= lo <= hi:
        raise ValueError(f"size_range {size_range!r} must satisfy 2 <= min <= max")
    hi = min(hi, 0.95 * min(width, height) / 0.8)  # the largest still mostly fits
    lo = min(lo, hi)
    place = min_visible + 0.1 if place_visible is None else float(place_visible)
    canvas = _background(rng, width, height)
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    shapes: List[Shape] = []
    polys: List[np.ndarray] = []
    for _ in range(n):
        for _attempt in range(12):
            shape = _random_shape(rng, (lo, hi), width, height)
            pts = shape_polygon(shape)
            if _visible_fraction(pts, width, height) >= place and _overlap_ok(pts, polys, width, height, place):
                break
        else:
            continue
        win = _window(pts, width, height)
        assert win is not None
        x0, y0, x1, y1 = win
        shape.value = _fill_value(rng, canvas[y0:y1, x0:x1], min_contrast)
        shapes.append(shape)
        polys.append(pts)
    truth = _composite(canvas, shapes, polys, min_visible)
    if effects:
        image = _effects(rng, canvas)
    else:
        image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return image, truth


# ----------------------------------------------------------------------------------------------
# A deterministic video of moving shapes


@dataclass
class _Mover:
    shape: Shape
    vx: float
    vy: float
    spin: float
    contrast: float
    ident: int = 0  # ground-truth identity, 1, 2, ... in order of appearance
    path: Optional[ScriptedPath] = None  # scripted objects follow their path instead of vx, vy
    gone: int = 0  # exits mode: frames until a new object comes in to replace this one (0: here)


@dataclass
class ScriptedPath:
    """One scripted object: a shape of ``class_id`` and ``size`` (pixels) moving in a straight
    line at constant speed from ``start`` (x, y centre, continuous pixels) on frame ``first`` to
    ``end`` on frame ``first + frames``; it is not in the picture before or after. ``contrast``
    is its gray level above (positive) or below (negative) the background."""

    class_id: int
    size: float
    start: Tuple[float, float]
    end: Tuple[float, float]
    first: int = 0
    frames: int = 100
    angle: float = 0.0
    contrast: float = 90.0

    def centre(self, frame: int) -> Optional[Tuple[float, float]]:
        """Where the object is on ``frame``; None when it is not in the scene then."""
        if not self.first <= frame <= self.first + self.frames:
            return None
        f = (frame - self.first) / max(self.frames, 1)
        return (self.start[0] + f * (self.end[0] - self.start[0]),
                self.start[1] + f * (self.end[1] - self.start[1]))


class SceneStream:
    """A deterministic endless video: ``objects`` shapes of the four classes moving smoothly
    (constant velocity, bouncing off the frame edges, rotating) over a fixed noisy gray
    background with fresh sensor noise each frame.

    ``next()`` returns (image uint8 (height, width), truth float32 (n, 5)) exactly like
    :func:`render_scene`, and :attr:`last_ids` the ground-truth identity of each truth row. The
    same ``(width, height, seed, objects, size_range, exits, script)`` always gives the same
    frames. ``size_range`` defaults to 28/720 .. 300/720 of the shorter frame side (28 to 300 px
    for 1280x720 or 720x1280 frames).

    ``exits=True``: objects do not bounce but leave the frame; some frames later a new object
    (a new identity, its own class and size) comes in from a random edge. A tracker cannot know
    that an object coming back in is one it saw before (the shapes of a class look alike), so the
    truth gives it a new identity, as it would a stranger. ``script`` replaces the random objects
    by :class:`ScriptedPath` objects (identities 1, 2, ... in script order): scenes whose
    crossings and zone entries are known in advance.
    """

    def __init__(self, width: int, height: int, seed: int = 0, objects: int = 4,
                 size_range: Tuple[float, float] | None = None, exits: bool = False,
                 script: Optional[Sequence[ScriptedPath]] = None) -> None:
        if width < 16 or height < 16:
            raise ValueError(f"frame size {width}x{height} is too small (need at least 16x16)")
        if objects < 0:
            raise ValueError(f"objects must be >= 0, got {objects}")
        short = min(width, height)
        if size_range is None:
            size_range = (max(4.0, short * 28.0 / 720.0), short * 300.0 / 720.0)
        lo, hi = float(size_range[0]), float(size_range[1])
        if not 2 <= lo <= hi:
            raise ValueError(f"size_range {size_range!r} must satisfy 2 <= min <= max")
        self.width, self.height = int(width), int(height)
        self.size_range = (lo, min(hi, 0.9 * short))
        self.exits = bool(exits)
        self.frame_index = 0
        self.last_ids: List[int] = []  # identity of each truth row of the latest next()
        self._next_ident = 1
        self._rng = np.random.default_rng(seed)
        rng = self._rng
        bg = np.full((height, width), rng.uniform(70, 190), np.float32)
        bg += rng.uniform(10, 40) * _gradient(rng, width, height)
        bg += rng.uniform(6, 18) * _smooth_noise(rng, width, height, int(rng.integers(3, 7)))
        bg += rng.uniform(2, 6) * _smooth_noise(rng, width, height, 40)
        self._background = bg
        # Sensor noise: one large field, a random window of it per frame (cheap and still fresh).
        self._noise_sigma = float(rng.uniform(3, 8))
        pad = 64
        noise = rng.standard_normal((height + pad, width + pad)).astype(np.float32)
        self._noise = (noise * self._noise_sigma).astype(np.float32)
        self._movers: List[_Mover] = []
        if script is not None:
            for path in script:
                if not 0 <= path.class_id < len(CLASSES):
                    raise ValueError(f"scripted class_id {path.class_id} is not one of 0..{len(CLASSES) - 1}")
                shape = Shape(class_id=path.class_id, cx=path.start[0], cy=path.start[1],
                              size=float(path.size), angle=float(path.angle), form=0.5)
                self._movers.append(_Mover(shape=shape, vx=0.0, vy=0.0, spin=0.0,
                                           contrast=float(path.contrast), ident=self._ident(), path=path))
            return
        for i in range(objects):
            lo_s, hi_s = self.size_range
            size = float(math.exp(rng.uniform(math.log(lo_s), math.log(hi_s))))
            speed = rng.uniform(0.4, 2.5) * max(width, height) / 640.0
            heading = rng.uniform(0, 2 * math.pi)
            shape = Shape(
                class_id=i % len(CLASSES) if i < len(CLASSES) else int(rng.integers(0, len(CLASSES))),
                cx=float(rng.uniform(size / 2, width - size / 2)),
                cy=float(rng.uniform(size / 2, height - size / 2)),
                size=size,
                angle=float(rng.uniform(0, 2 * math.pi)),
                form=float(rng.random()),
            )
            self._movers.append(_Mover(
                shape=shape, vx=speed * math.cos(heading), vy=speed * math.sin(heading),
                spin=float(rng.uniform(-0.05, 0.05)),
                contrast=float(rng.uniform(40, 110)) * (1 if rng.random() < 0.5 else -1),
                ident=self._ident()))

    def _ident(self) -> int:
        self._next_ident += 1
        return self._next_ident - 1

    def _outside(self, s: Shape) -> bool:
        half = s.size / 2
        return (s.cx + half < 0 or s.cx - half > self.width or
                s.cy + half < 0 or s.cy - half > self.height)

    def _come_in(self, m: _Mover) -> None:
        """Exits mode: ``m`` becomes a new object entering from a random edge, heading inwards."""
        rng = self._rng
        lo_s, hi_s = self.size_range
        size = float(math.exp(rng.uniform(math.log(lo_s), math.log(hi_s))))
        speed = rng.uniform(0.4, 2.5) * max(self.width, self.height) / 640.0
        edge = int(rng.integers(0, 4))  # 0 left, 1 right, 2 top, 3 bottom
        inward = (0.0, math.pi, 0.5 * math.pi, -0.5 * math.pi)[edge]
        heading = inward + rng.uniform(-1.0, 1.0)
        along = rng.uniform(0.15, 0.85)
        half = size / 2
        cx, cy = (
            (-half + 1, along * self.height), (self.width + half - 1, along * self.height),
            (along * self.width, -half + 1), (along * self.width, self.height + half - 1),
        )[edge]
        m.shape = Shape(class_id=int(rng.integers(0, len(CLASSES))), cx=float(cx), cy=float(cy),
                        size=size, angle=float(rng.uniform(0, 2 * math.pi)), form=float(rng.random()))
        m.vx, m.vy = speed * math.cos(heading), speed * math.sin(heading)
        m.spin = float(rng.uniform(-0.05, 0.05))
        m.contrast = float(rng.uniform(40, 110)) * (1 if rng.random() < 0.5 else -1)
        m.ident = self._ident()
        m.gone = 0

    def _step(self) -> None:
        for m in self._movers:
            s = m.shape
            if m.path is not None:
                continue  # placed from its path in next()
            if self.exits and m.gone:
                m.gone -= 1
                if not m.gone:
                    self._come_in(m)
                continue
            s.cx += m.vx
            s.cy += m.vy
            s.angle = (s.angle + m.spin) % (2 * math.pi)
            if self.exits:
                if self._outside(s):
                    m.gone = int(self._rng.integers(5, 40))  # out of the picture for a while
                continue
            half = s.size / 2
            if s.cx < half or s.cx > self.width - half:
                m.vx = -m.vx
                s.cx = float(np.clip(s.cx, half, self.width - half))
            if s.cy < half or s.cy > self.height - half:
                m.vy = -m.vy
                s.cy = float(np.clip(s.cy, half, self.height - half))

    def next(self) -> Tuple[np.ndarray, np.ndarray]:
        """The next frame and its truth; advances the stream by one frame."""
        canvas = self._background.copy()
        shapes, polys, idents = [], [], []
        for m in self._movers:
            if m.path is not None:
                centre = m.path.centre(self.frame_index)
                if centre is None:
                    continue
                m.shape.cx, m.shape.cy = centre
            elif m.gone:
                continue
            pts = shape_polygon(m.shape)
            win = _window(pts, self.width, self.height)
            if win is None:
                continue
            x0, y0, x1, y1 = win
            dark, light = (float(v) for v in np.percentile(self._background[y0:y1, x0:x1], (5, 95)))
            value = light + m.contrast if m.contrast > 0 else dark + m.contrast
            if not 0 <= value <= 255:  # not enough room on that side: go the other way
                value = dark - m.contrast if m.contrast > 0 else light - m.contrast
            m.shape.value = float(np.clip(value, 0, 255))
            shapes.append(m.shape)
            polys.append(pts)
            idents.append(m.ident)
        kept: List[int] = []
        truth = _composite(canvas, shapes, polys, 0.4, kept)
        self.last_ids = [idents[i] for i in kept]
        ox, oy = int(self._rng.integers(0, 64)), int(self._rng.integers(0, 64))
        canvas += self._noise[oy:oy + self.height, ox:ox + self.width]
        image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        self._step()
        self.frame_index += 1
        return image, truth
