"""The ``camera`` (V4L2) source's pre-flight on this machine, which has no camera: ``check()``
fails at once naming the device and pointing at configs/synthetic.yaml, and the config's
device and fourcc options validate. No camera is faked; frames from a real one are not tested."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgepipe_plugins.sources.camera import CameraConfig, CameraSource
from pydantic import ValidationError

from edgepipe.stage import StageContext, StageError


def test_camera_check_fails_fast_without_a_device():
    for device in (0, "/dev/video7", "3"):
        cfg = CameraConfig(device=device)
        src = CameraSource(cfg, StageContext("cam"))
        if Path(f"/dev/video{cfg.device}" if isinstance(cfg.device, int) else cfg.device).exists():
            pytest.fail("this test expects a machine without V4L2 cameras")
        with pytest.raises(StageError, match=r"does not exist.*configs/synthetic.yaml"):
            src.check()
    assert CameraConfig(device="3").device == 3  # "${CAMERA:-3}" interpolates to a string
    with pytest.raises(ValidationError, match="fourcc"):
        CameraConfig(fourcc="MJPEG")
