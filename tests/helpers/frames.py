"""Frames as stages receive them, for driving a stage directly: frames of the generated scene
stream with their truth (what a source hands the processors) and frames carrying detections in
original pixels (what nms hands the sinks), with the class names of the demo model's scenes."""

from __future__ import annotations

import time
from typing import List

import numpy as np

from edgepipe.messages import Frame
from edgepipe.scenes import SceneStream

NAMES = ["circle", "square", "triangle", "cross"]


def scene_frames(n: int, width: int, height: int, source: str = "cam", seed: int = 0) -> List[Frame]:
    """Frames 0..n-1 of ``SceneStream(width, height, seed)``, truth rows [class_id, x1, y1, x2, y2]
    in ``meta["truth"]``."""
    stream = SceneStream(width, height, seed=seed)
    frames = []
    for k in range(n):
        image, truth = stream.next()
        frames.append(Frame(source, k, 1000.0 + k, image=image, meta={"truth": truth.tolist()}))
    return frames


def det_frame(source: str, frame_id: int, n: int = 2, with_picture: bool = False) -> Frame:
    """A 160x120 frame with ``n`` boxes side by side (class i % 4, confidence 0.9 - 0.1 i), as nms
    hands it on; ``with_picture`` adds a flat gray original to draw on."""
    boxes = [[10 + 45 * i, 20 + 10 * i, 40 + 45 * i, 60 + 10 * i, 0.9 - 0.1 * i, i % 4] for i in range(n)]
    dets = np.array(boxes, np.float32).reshape(-1, 6)
    frame = Frame(source, frame_id, time.time() - 0.05, width=160, height=120, detections=dets, names=NAMES)
    if with_picture:
        frame.original = np.full((120, 160), 90, np.uint8)
    return frame
