"""Training batches from generated scenes, shaped like what the detector sees in the pipeline.

The pipeline letterboxes every frame to the model's input (aspect kept, gray 114 padding), so a
training image is a scene of random aspect ratio placed in a square ``imgsz`` canvas of 114;
sometimes the scene is rendered larger and shrunk with the same bilinear resize letterbox uses
(scale jitter), and images are flipped at random. Each step's batch comes from its own
``numpy.random.default_rng([seed, step])``, so a run is reproducible and a resumed run sees the
same data as an uninterrupted one without storing any generator state.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import cv2
import numpy as np

from edgepipe.scenes import render_scene

PAD_VALUE = 114  # letterbox border gray, as in the pipeline


def training_image(
    rng: np.random.Generator,
    imgsz: int,
    size_range: Tuple[float, float],
    n_objects: Tuple[int, int] = (1, 10),
    min_visible: float = 0.6,
    place_visible: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """One letterboxed training image (imgsz, imgsz) uint8 and its labels (n, 5) float32 rows
    ``[class_id, x1, y1, x2, y2]`` in that image's pixels; objects' longer sides lie in
    ``size_range`` (input pixels) before clipping; objects are labelled down to ``min_visible``
    of their area in sight, and placed down to ``place_visible`` (default ``min_visible`` + 0.1;
    :func:`edgepipe.scenes.render_scene`)."""
    if rng.random() < 0.5:  # full square frame
        w = h = imgsz
    else:  # a wide or tall frame, letterboxed
        aspect = math.exp(rng.uniform(math.log(9 / 16), math.log(16 / 9)))
        w = imgsz if aspect >= 1 else max(32, int(round(imgsz * aspect)))
        h = imgsz if aspect < 1 else max(32, int(round(imgsz / aspect)))
    f = 1.0 if rng.random() < 0.75 else float(rng.uniform(1.2, 2.0))  # render larger, shrink
    rw, rh = int(round(w * f)), int(round(h * f))
    lo, hi = size_range
    scene, truth = render_scene(rng, rw, rh, n_objects=n_objects, size_range=(lo * f, hi * f),
                                min_visible=min_visible, place_visible=place_visible)
    if (rw, rh) != (w, h):
        scene = cv2.resize(scene, (w, h), interpolation=cv2.INTER_LINEAR)
        truth[:, 1:] *= np.array([w / rw, h / rh, w / rw, h / rh], np.float32)
    canvas = np.full((imgsz, imgsz), PAD_VALUE, np.uint8)
    if w == imgsz and h == imgsz:
        left = top = 0
    elif rng.random() < 0.7:  # centred, as letterbox pads
        left, top = (imgsz - w) // 2, (imgsz - h) // 2
    else:
        left, top = int(rng.integers(0, imgsz - w + 1)), int(rng.integers(0, imgsz - h + 1))
    canvas[top:top + h, left:left + w] = scene
    truth[:, [1, 3]] += left
    truth[:, [2, 4]] += top
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
        truth[:, [1, 3]] = imgsz - truth[:, [3, 1]]
    if rng.random() < 0.5:
        canvas = canvas[::-1, :]
        truth[:, [2, 4]] = imgsz - truth[:, [4, 2]]
    keep = (truth[:, 3] - truth[:, 1] >= 2) & (truth[:, 4] - truth[:, 2] >= 2)
    return np.ascontiguousarray(canvas), truth[keep]


def training_batch(
    seed: int, step: int, batch: int, imgsz: int, size_range: Tuple[float, float],
    min_visible: float = 0.6,
    place_visible: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """The batch of ``step``: images (batch, 1, imgsz, imgsz) float32 in [0, 1] and targets
    (n, 6) float32 rows ``[image_index, class_id, cx, cy, w, h]`` in input pixels."""
    rng = np.random.default_rng([seed, step])
    images = np.empty((batch, 1, imgsz, imgsz), np.float32)
    rows = []
    for i in range(batch):
        img, truth = training_image(rng, imgsz, size_range, min_visible=min_visible, place_visible=place_visible)
        images[i, 0] = img * np.float32(1.0 / 255.0)
        xyxy = truth[:, 1:]
        rows.append(np.column_stack([
            np.full(len(truth), i, np.float32), truth[:, 0],
            (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
            xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]]))
    targets = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 6), np.float32)
    return images, targets.reshape(-1, 6)
