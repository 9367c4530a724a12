"""Annotation drawing shared by the sinks that show pictures (preview page, video file, JPEG frames).

A frame reaches a sink with its detections in ORIGINAL-frame pixels. :func:`annotate` picks the
best picture the frame carries (the original when a sink asked for it with ``needs_original``,
else the letterboxed detector input, onto which the boxes are mapped forward through the
letterbox ``ratio``/``pad``), turns it into BGR so that boxes can be coloured on a gray stream, and
draws each detection as a rectangle with a filled tag reading ``label confidence``. Colours are a
fixed function of the class id, so the same class looks the same in every sink and every run.
Nothing here keeps a reference to the frame's arrays: the result is always a new image.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from edgepipe.messages import Frame

__all__ = ["PALETTE", "annotate", "color", "draw_detections", "map_to_letterbox", "picture", "to_bgr"]

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


def draw_detections(
    image: np.ndarray,
    detections: np.ndarray,
    names: Optional[List[str]] = None,
    thickness: Optional[int] = None,
) -> np.ndarray:
    """Draw (n, 6) ``x1 y1 x2 y2 conf cls`` boxes, in ``image``'s pixels, onto BGR ``image`` in place.

    Each box gets its class colour and a filled tag ``"<label> <conf>"`` above it (inside the
    image when the box touches the top edge). ``thickness`` defaults to about 1/300 of the
    image's larger side, at least 2 px, so boxes stay visible after JPEG compression and scaling.
    Returns ``image``.
    """
    h, w = image.shape[:2]
    t = thickness if thickness is not None else max(2, int(round(max(h, w) / 300)))
    font_scale = max(0.4, max(h, w) / 1600)
    font_thick = max(1, t // 2)
    for x1, y1, x2, y2, conf, cls in np.asarray(detections, dtype=np.float64).reshape(-1, 6):
        if not all(np.isfinite(v) for v in (x1, y1, x2, y2)):
            continue
        c = color(int(cls))
        p1 = (int(round(x1)), int(round(y1)))
        p2 = (int(round(x2)), int(round(y2)))
        cv2.rectangle(image, p1, p2, c, t, cv2.LINE_AA)
        text = f"{_label(int(cls), names)} {conf:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, font_thick)
        tag_h = th + base + 2
        top = p1[1] - tag_h if p1[1] - tag_h >= 0 else p1[1]
        left = min(max(p1[0], 0), max(w - tw - 2, 0))
        cv2.rectangle(image, (left, top), (left + tw + 2, top + tag_h), c, -1)
        # Dark text on the bright tags, white on the dark ones: readable on every class colour.
        luma = 0.114 * c[0] + 0.587 * c[1] + 0.299 * c[2]
        ink = (0, 0, 0) if luma > 110 else (255, 255, 255)
        cv2.putText(
            image, text, (left + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, ink,
            font_thick, cv2.LINE_AA,
        )
    return image


def annotate(frame: Frame, thickness: Optional[int] = None) -> Optional[np.ndarray]:
    """A new BGR image of ``frame`` with its detections drawn (see :func:`picture`), or None
    when the frame carries no picture."""
    found = picture(frame)
    if found is None:
        return None
    image, dets = found
    return draw_detections(image, dets, frame.names, thickness)
