"""The ``letterbox`` stage driven directly (start/process): its output is exactly
``edgepipe.yolo.ops.letterbox`` of the frame (gray, minimal stride-32 rectangle or a fixed size),
with the original picture kept on request, and an image size off the stride refused."""

from __future__ import annotations

import numpy as np
import pytest
from edgepipe_plugins.processors.letterbox import LetterboxConfig, LetterboxStage
from pydantic import ValidationError

from edgepipe.messages import Frame
from edgepipe.stage import StageContext
from edgepipe.yolo.ops import letterbox


def test_letterbox_gray_bgr_and_original():
    stage = LetterboxStage(LetterboxConfig(inputs=["cam"], imgsz=128, keep_original=True), StageContext("prep"))
    stage.start()
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
    (frame,) = stage.process([Frame("cam", 0, 1.0, image=bgr)])
    expected, ratio, pad = letterbox(bgr, 128, gray=True)
    np.testing.assert_array_equal(frame.image, expected)
    assert frame.image.ndim == 2 and frame.image.shape == (96, 128)  # auto: minimal stride-32 rectangle
    assert (frame.width, frame.height) == (200, 120)
    assert frame.ratio == pytest.approx(ratio) and frame.pad == pytest.approx(pad)
    assert frame.original is bgr

    fixed = LetterboxStage(LetterboxConfig(inputs=["cam"], imgsz=[96, 192], auto=False), StageContext("p2"))
    fixed.start()
    (frame,) = fixed.process([Frame("cam", 0, 1.0, image=bgr[:, :, 0].copy())])
    assert frame.image.shape == (96, 192) and frame.original is None
    # Every pixel outside the resized picture is the padding gray.
    (left, top) = (int(round(frame.pad[0] - 0.1)), int(round(frame.pad[1] - 0.1)))
    assert top == 0 and left > 0 and (frame.image[:, :left] == 114).all()

    with pytest.raises(ValidationError, match="multiple of the stride 32"):
        LetterboxConfig(imgsz=100)
