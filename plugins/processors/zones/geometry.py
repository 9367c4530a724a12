"""Plane geometry the ``zones`` stage needs, in numpy: is a polygon simple, which points lie in
it, which side of a line a point is on, does a step cross a segment.

A polygon is a handful of vertices and a frame holds at most a few hundred tracked points, so a
vectorised ray-casting test over all points at once costs microseconds; a geometry library
(shapely, with GEOS underneath) would add a large dependency for four formulas.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["passes_through", "inside", "polygon_problem", "side"]

Point = Tuple[float, float]


def _orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
    """Twice the signed area of triangle abc (> 0: counter-clockwise in x-right, y-up axes)."""
    return float((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))


def _segments_meet(p1: np.ndarray, p2: np.ndarray, q1: np.ndarray, q2: np.ndarray) -> bool:
    """True when segments p1p2 and q1q2 share a point (touching counts)."""
    d1, d2 = _orient(q1, q2, p1), _orient(q1, q2, p2)
    d3, d4 = _orient(p1, p2, q1), _orient(p1, p2, q2)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True

    def on(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: float) -> bool:
        return d == 0 and min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])

    return on(q1, q2, p1, d1) or on(q1, q2, p2, d2) or on(p1, p2, q1, d3) or on(p1, p2, q2, d4)


def polygon_problem(points: Sequence[Sequence[float]]) -> Optional[str]:
    """Why ``points`` is not a simple polygon (one line), or None when it is: fewer than 3
    vertices, repeated vertices, zero area, or two edges that cross or touch (self-intersecting)."""
    pts = np.asarray(points, np.float64)
    n = len(pts)
    if n < 3:
        return f"a polygon needs at least 3 points, got {n}"
    for i in range(n):
        if np.array_equal(pts[i], pts[(i + 1) % n]):
            return f"points {i} and {(i + 1) % n} are the same"
    for i in range(n):
        a1, a2 = pts[i], pts[(i + 1) % n]
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):
                continue  # neighbouring edges share a vertex by construction
            if _segments_meet(a1, a2, pts[j], pts[(j + 1) % n]):
                return f"edges {i}-{(i + 1) % n} and {j}-{(j + 1) % n} cross: the polygon intersects itself"
    area = 0.5 * float(np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1]))
    if abs(area) < 1e-12:
        return "the polygon has no area (its points lie on one line)"
    return None


def inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """(n,) bool: which of ``points`` (n, 2) lie inside ``polygon`` (k, 2) (ray casting; a point
    exactly on an edge may fall either way)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if not len(pts):
        return np.zeros(0, bool)
    x, y = pts[:, 0:1], pts[:, 1:2]  # (n, 1)
    xa, ya = polygon[:, 0][None, :], polygon[:, 1][None, :]  # (1, k)
    nxt = np.concatenate((polygon[1:], polygon[:1]))  # each vertex's successor
    xb, yb = nxt[:, 0][None, :], nxt[:, 1][None, :]
    straddles = (ya > y) != (yb > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = xa + (y - ya) * (xb - xa) / (yb - ya)
    hits = straddles & (x < x_cross)
    return (np.count_nonzero(hits, axis=1) % 2) == 1


def side(points: np.ndarray, a: np.ndarray, b: np.ndarray, margin: float) -> np.ndarray:
    """(n,) int: +1 for points to the right of the line a->b as seen on the picture (y down),
    -1 to its left, 0 within ``margin`` pixels of it."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    d = b - a
    dist = (d[0] * (pts[:, 1] - a[1]) - d[1] * (pts[:, 0] - a[0])) / float(np.hypot(d[0], d[1]))
    return np.where(dist > margin, 1, np.where(dist < -margin, -1, 0))


def passes_through(p: Sequence[float], q: Sequence[float], a: np.ndarray, b: np.ndarray) -> bool:
    """True when the step p -> q (points as [x, y]) passes through the segment a-b (not around
    one of its ends)."""
    return _segments_meet(np.asarray(p, np.float64), np.asarray(q, np.float64), a, b)
