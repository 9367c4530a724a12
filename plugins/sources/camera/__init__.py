"""The ``camera`` source: a local V4L2 camera (USB webcam, MIPI bridge) through OpenCV.

The camera is read in a background thread that keeps only the newest frame, so the pipeline
always works on what the camera sees now. Gray sensors and cameras that offer the GREY format
deliver 1-channel frames directly, saving the letterbox stage a colour conversion. An unplugged
camera is reopened with backoff (counted in ``edgepipe_source_reconnects_total``, and reported on ``/healthz`` while it is gone).
"""

from __future__ import annotations

import os
from typing import Optional, Union

from pydantic import Field, field_validator

from edgepipe.stage import StageConfig, StageError

from .._common import CaptureSource, CaptureThread

__all__ = ["CameraConfig", "CameraSource", "device_path"]


class CameraConfig(StageConfig):
    device: Union[int, str] = Field(
        0, description="V4L2 camera: an index (0 is /dev/video0) or a device path such as /dev/video2."
    )
    width: Optional[int] = Field(None, gt=0, le=16384, description="Requested frame width (camera default when unset).")
    height: Optional[int] = Field(None, gt=0, le=16384, description="Requested frame height (camera default when unset).")
    fps: Optional[float] = Field(None, gt=0, le=1000, description="Requested frame rate (camera default when unset).")
    fourcc: Optional[str] = Field(
        None,
        description="Pixel format to request, four characters such as 'GREY', 'MJPG' or 'YUYV'. "
        "Unset: GREY when the camera offers it, else the camera's default.",
    )
    max_reconnects: Optional[int] = Field(
        None, ge=0, description="Give up after this many failed reopen attempts in a row (unset: never)."
    )

    @field_validator("fourcc")
    @classmethod
    def _four_chars(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and len(value) != 4:
            raise ValueError(f"fourcc must be four characters such as 'GREY' or 'MJPG', got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: Union[int, str]) -> Union[int, str]:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"device index must be >= 0, got {value}")
        if isinstance(value, str) and value.isdigit():
            return int(value)  # "${CAMERA:-0}" interpolates to a string
        return value


def device_path(device: Union[int, str]) -> str:
    return f"/dev/video{device}" if isinstance(device, int) else device


class CameraSource(CaptureSource):
    """V4L2 camera (index or /dev/videoN) read through OpenCV; prefers the GREY format."""

    Config = CameraConfig
    config: CameraConfig

    def check(self) -> None:
        path = device_path(self.config.device)
        if not os.path.exists(path):
            raise StageError(
                f"camera device {path!r} does not exist (no camera attached?); to try edgepipe "
                "without a camera run configs/synthetic.yaml"
            )
        if not os.access(path, os.R_OK | os.W_OK):
            raise StageError(f"camera device {path!r} is not readable by this user (add it to the 'video' group)")

    def start(self) -> None:
        self._capture = CaptureThread(
            device_path(self.config.device),
            self._open,
            self.log,
            self.reconnects.inc,
            on_health=self.capture_health,
            max_reconnects=self.config.max_reconnects,
        )
        self._capture.start()

    def _open(self):
        import cv2

        cfg = self.config
        cap = cv2.VideoCapture(cfg.device, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            raise StageError(f"cannot open camera {device_path(cfg.device)!r}")
        gray = False
        if cfg.fourcc is None or cfg.fourcc == "GREY":
            gray = cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"GREY")) and int(
                cap.get(cv2.CAP_PROP_FOURCC)
            ) == cv2.VideoWriter_fourcc(*"GREY")
            if cfg.fourcc == "GREY" and not gray:
                cap.release()
                raise StageError(f"camera {device_path(cfg.device)!r} does not offer the GREY format")
        else:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*cfg.fourcc))
        if gray:
            # Hand the 8-bit plane through untouched instead of expanding it to BGR.
            cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)
        if cfg.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
        if cfg.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
        if cfg.fps:
            cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        return cap
