"""The preview page's test kit: a "cam" frame with known detections (a bright square moving right,
detected as class 0, and a fixed triangle, class 2, on the original 320x240 picture), the page's
JSON API, and where each source's stream image sits in a browser screenshot."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Dict, List

import cv2
import numpy as np

from edgepipe.messages import Frame
from helpers.browser import Browser
from helpers.frames import NAMES

CAM_TRIANGLE = [200.0, 140.0, 290.0, 220.0]


def moving_x(i: int) -> int:
    """Left edge of the moving square in frame i of "cam"."""
    return 10 + (i * 4) % 150


def cam_frame(i: int) -> Frame:
    """Frame i of "cam", with the time each stage took (the detector's 30 ms shows on the page)."""
    img = np.full((240, 320), 96, np.uint8)
    x = moving_x(i)
    cv2.rectangle(img, (x, 30), (x + 50, 80), 230, -1)
    dets = np.array([[x, 30, x + 50, 80, 0.91, 0], CAM_TRIANGLE + [0.77, 2]], np.float32)
    timing = {"cam": 0.002, "letterbox": 0.001, "yolov5": 0.030, "nms": 0.001}
    return Frame("cam", i, time.time(), image=img, original=img, detections=dets, names=NAMES,
                 timing=timing)


def get_json(url: str) -> Dict:
    """The JSON document at ``url`` (the page's ``api/latest``)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def stream_rects(b: Browser) -> Dict[str, Dict[str, float]]:
    """Viewport rectangle and natural size of each source's stream image."""
    return b.run(
        "const out = {};"
        "for (const card of document.querySelectorAll('.stream')) {"
        "  const img = card.querySelector('img'); const r = img.getBoundingClientRect();"
        "  out[card.dataset.source] = {x: r.left, y: r.top, w: r.width, h: r.height,"
        "    nw: img.naturalWidth, nh: img.naturalHeight};"
        "} return out;"
    )


def to_screen(box: List[float], r: Dict[str, float]) -> List[float]:
    """A box in picture pixels mapped onto the screenshot, through the image's rectangle ``r``."""
    sx, sy = r["w"] / r["nw"], r["h"] / r["nh"]
    return [r["x"] + box[0] * sx, r["y"] + box[1] * sy, r["x"] + box[2] * sx, r["y"] + box[3] * sy]


def crop(shot: np.ndarray, r: Dict[str, float]) -> np.ndarray:
    """The part of a screenshot that shows the image with rectangle ``r``."""
    return shot[int(r["y"]) : int(r["y"] + r["h"]), int(r["x"]) : int(r["x"] + r["w"])]
