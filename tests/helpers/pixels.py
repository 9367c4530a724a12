"""Pixel checks for annotated pictures (video frames read back, browser screenshots): is a box of
a given colour drawn along given edges, which pixels are clearly coloured rather than gray; and
reading a video file back frame by frame."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import cv2
import numpy as np


def edge_colour_ratio(
    img: np.ndarray, box: Sequence[float], bgr: Tuple[int, int, int], tol: int = 80
) -> float:
    """Fraction of points along the box's four edges whose 3x3 neighbourhood holds a pixel within
    ``tol`` of ``bgr`` in every channel. Compression and scaling blur a 2 px line, hence the
    slack in place and colour; a gray picture without the box scores 0."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    pts = [(x, y1) for x in range(x1 + 4, x2 - 4, 3)] + [(x, y2) for x in range(x1 + 4, x2 - 4, 3)]
    pts += [(x1, y) for y in range(y1 + 4, y2 - 4, 3)] + [(x2, y) for y in range(y1 + 4, y2 - 4, 3)]
    if not pts:
        raise ValueError(f"box {box} is too small to check")
    target = np.array(bgr, np.int32)
    hits = 0
    for x, y in pts:
        patch = img[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].reshape(-1, 3).astype(np.int32)
        if len(patch) and (np.abs(patch - target).max(axis=1) < tol).any():
            hits += 1
    return hits / len(pts)


def colour_mask(img: np.ndarray, spread: int = 80) -> np.ndarray:
    """Mask of clearly coloured (not gray) pixels: channels differ by more than ``spread``."""
    i = img.astype(np.int32)
    return (i.max(axis=2) - i.min(axis=2)) > spread


def read_video(path: Path) -> Tuple[List[np.ndarray], float]:
    """Every frame of a video file (BGR) and the rate in its header; AssertionError if unreadable."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} does not open"
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    images = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        images.append(img)
    cap.release()
    return images, fps
