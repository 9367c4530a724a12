"""Best-confidence snapshots of tracks: JPEG files in a directory with a size cap.

For each track two files, overwritten whenever the track is seen with a clearly better
confidence (at most every ``min_interval`` seconds): ``<source>-<run>-<id>-crop.jpg``, the box
with a margin around it, and (``full_frame``) ``<source>-<run>-<id>-frame.jpg``, the whole
original frame with the box drawn. Each file is written to a temporary name and renamed, so a
reader never sees half a picture. The directory belongs to the tracker: when the JPEG files in it
add up to more than ``max_bytes``, the oldest are removed first (also those of earlier runs).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Tuple

import cv2
import numpy as np

__all__ = ["SnapshotWriter"]


class SnapshotWriter:
    """Writes and caps the snapshot files (see the module docstring)."""

    def __init__(self, directory: str, max_bytes: int, jpeg_quality: int, full_frame: bool,
                 margin: float) -> None:
        self.directory = os.path.expanduser(directory)
        self.max_bytes = max_bytes
        self.jpeg_quality = jpeg_quality
        self.full_frame = full_frame
        self.margin = margin
        self.files: Dict[str, Tuple[float, int]] = {}  # name -> (mtime, bytes)
        self.total = 0
        self.removed = 0

    def open(self) -> None:
        """Create the directory if needed and index the JPEG files already in it; OSError when
        it cannot be used."""
        os.makedirs(self.directory, exist_ok=True)
        for entry in os.scandir(self.directory):
            if entry.is_file() and entry.name.endswith(".jpg"):
                st = entry.stat()
                self.files[entry.name] = (st.st_mtime, st.st_size)
        self.total = sum(size for _, size in self.files.values())
        probe = os.path.join(self.directory, ".edgepipe-write-test")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
        self._trim()

    def exists(self, name: str) -> bool:
        return name in self.files

    def write(self, prefix: str, image: np.ndarray, box: np.ndarray, caption: str,
              class_id: int) -> Dict[str, Any]:
        """Write the crop (and the full frame) of ``box`` on ``image`` (the original picture) as
        ``<prefix>-crop.jpg`` (and ``<prefix>-frame.jpg``); their names. OSError on failure."""
        from edgepipe.draw import draw_detections, to_bgr

        h, w = image.shape[:2]
        x1, y1, x2, y2 = (float(v) for v in box)
        mx, my = self.margin * (x2 - x1), self.margin * (y2 - y1)
        cx1, cy1 = int(max(0, np.floor(x1 - mx))), int(max(0, np.floor(y1 - my)))
        cx2, cy2 = int(min(w, np.ceil(x2 + mx))), int(min(h, np.ceil(y2 + my)))
        if cx2 <= cx1 or cy2 <= cy1:
            raise OSError(f"box {box.tolist()} lies outside the {w}x{h} picture")
        names: Dict[str, Any] = {"crop": self._put(f"{prefix}-crop.jpg", image[cy1:cy2, cx1:cx2]), "frame": None}
        if self.full_frame:
            full = to_bgr(image)
            draw_detections(full, np.array([[x1, y1, x2, y2, 0.0, class_id]], np.float32))
            cv2.putText(full, caption, (max(0, int(x1)), min(h - 4, int(y2) + 22)),
                        cv2.FONT_HERSHEY_SIMPLEX, max(0.5, max(h, w) / 1600), (255, 255, 255), 2, cv2.LINE_AA)
            names["frame"] = self._put(f"{prefix}-frame.jpg", full)
        self._trim()
        return names

    def _put(self, name: str, image: np.ndarray) -> str:
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image), [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise OSError(f"JPEG encoding of {name!r} failed")
        path = os.path.join(self.directory, name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(buf.tobytes())
        os.replace(tmp, path)
        old = self.files.get(name)
        if old is not None:
            self.total -= old[1]
        self.files[name] = (time.time(), len(buf))
        self.total += len(buf)
        return name

    def _trim(self) -> None:
        """Remove the oldest files until the directory holds at most ``max_bytes``."""
        if self.total <= self.max_bytes:
            return
        for name, (_, size) in sorted(self.files.items(), key=lambda kv: kv[1][0]):
            if self.total <= self.max_bytes:
                break
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
            del self.files[name]
            self.total -= size
            self.removed += 1
