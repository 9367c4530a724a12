"""What the preview page draws on a picture besides the boxes: each track's id and short trail,
and the zones and lines of a ``zones`` stage with their live counts.

The ``zones`` stage leaves its zones and lines, in original-frame pixels with their counts, in
``Frame.meta["zones"]``; the tracker's ids are ``Frame.track_ids``; the trails are kept by the
preview sink itself (the last points of each track's box centre, from every frame it saw). On a
letterboxed picture everything is mapped like the boxes (:func:`edgepipe.draw.map_to_letterbox`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from edgepipe.draw import color
from edgepipe.messages import Frame

__all__ = ["LINE_COLOUR", "TRAIL_POINTS", "ZONE_COLOUR", "draw_overlay"]

ZONE_COLOUR = (255, 160, 0)  # BGR azure: no class colour of edgepipe.draw is near it
LINE_COLOUR = (255, 255, 255)  # BGR white, drawn over a dark outline so it shows on any gray
TRAIL_POINTS = 20  # box centres kept per track: two seconds at 10 fps


def _mapper(frame: Frame) -> Tuple[float, float, float, float]:
    """(sx, sy, dx, dy) taking original-frame pixels to the picture's (identity on the original)."""
    if frame.original is None and frame.ratio is not None and frame.pad is not None:
        return float(frame.ratio[0]), float(frame.ratio[1]), float(frame.pad[0]), float(frame.pad[1])
    return 1.0, 1.0, 0.0, 0.0


def _pts(points: Sequence[Sequence[float]], m: Tuple[float, float, float, float]) -> np.ndarray:
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return np.round(np.stack([p[:, 0] * m[0] + m[2], p[:, 1] * m[1] + m[3]], 1)).astype(np.int32)


def _text(image: np.ndarray, text: str, org: Tuple[int, int], scale: float, colour: Tuple[int, int, int]) -> None:
    """Text with a dark outline, readable over any background."""
    thick = max(1, int(round(scale * 2)))
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)


def draw_overlay(image: np.ndarray, frame: Frame, trails: Optional[Dict[int, List[List[float]]]] = None) -> np.ndarray:
    """Draw zones, lines, trails and track ids of ``frame`` onto its BGR picture ``image`` (in
    place); returns ``image``."""
    h, w = image.shape[:2]
    m = _mapper(frame)
    scale = max(0.45, max(h, w) / 1400)
    t = max(2, int(round(max(h, w) / 400)))
    found = frame.meta.get("zones")
    overlay: Dict[str, Any] = found if isinstance(found, dict) else {}
    for z in overlay.get("zones", []):
        pts = _pts(z["points"], m)
        fill = image.copy()
        cv2.fillPoly(fill, [pts], ZONE_COLOUR)
        cv2.addWeighted(fill, 0.18, image, 0.82, 0, dst=image)
        cv2.polylines(image, [pts], True, ZONE_COLOUR, t, cv2.LINE_AA)
        top = pts[np.argmin(pts[:, 1])]
        _text(image, f"{z['name']}: {z['objects']} now, {z['entries']} in", (int(top[0]) + 4, int(top[1]) + int(24 * scale) + 4), scale, ZONE_COLOUR)
    for line in overlay.get("lines", []):
        pts = _pts(line["points"], m)
        a, b = (int(pts[0][0]), int(pts[0][1])), (int(pts[1][0]), int(pts[1][1]))
        cv2.line(image, a, b, (0, 0, 0), t + 2, cv2.LINE_AA)
        cv2.line(image, a, b, LINE_COLOUR, t, cv2.LINE_AA)
        counts = ", ".join(f"{d} {n}" for d, n in zip(line["directions"], line["crossings"]))
        mid = ((a[0] + b[0]) // 2 + 6, (a[1] + b[1]) // 2)
        _text(image, f"{line['name']}: {counts}", mid, scale, LINE_COLOUR)
    dets = frame.detections if frame.detections is not None else np.zeros((0, 6), np.float32)
    ids = frame.track_ids or [None] * len(dets)
    for det, tid in zip(dets.tolist(), ids):
        if tid is None:
            continue
        c = color(int(det[5]))
        trail = (trails or {}).get(tid)
        if trail and len(trail) > 1:
            cv2.polylines(image, [_pts(trail, m)], False, c, max(1, t // 2 + 1), cv2.LINE_AA)
        x1, y2 = _pts([[det[0], det[3]]], m)[0]
        _text(image, f"#{tid}", (int(x1) + 2, min(h - 4, int(y2) + int(20 * scale) + 2)), scale, c)
    return image
