"""Driving a source directly, as its worker would: read until the end of the stream, and the
generated video files the file-reading sources are given."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import cv2
import numpy as np

from edgepipe.messages import Frame
from edgepipe.stage import EndOfStream, Source


def read_all(source: Source, limit: int = 1000, timeout: float = 20.0) -> List[Frame]:
    """Read until EndOfStream (or ``limit`` frames); None answers are waited through."""
    frames: List[Frame] = []
    deadline = time.monotonic() + timeout
    while len(frames) < limit:
        assert time.monotonic() < deadline, f"source stalled after {len(frames)} frames"
        try:
            frame = source.read()
        except EndOfStream:
            break
        if frame is not None:
            frames.append(frame)
    return frames


def write_video(path: Path, levels: List[int], fps: float = 25.0, size=(96, 64)) -> None:
    """A video whose frame k is a flat gray image of brightness levels[k] (decodes within a few levels)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for level in levels:
        writer.write(np.full((size[1], size[0], 3), level, np.uint8))
    writer.release()
