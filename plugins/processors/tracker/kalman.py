"""A constant-velocity Kalman filter for boxes, batched over every track of a source.

State per track: ``[cx, cy, w, h, vx, vy, vw, vh]`` (box centre and size in original-frame
pixels, and their rates per frame period); measurement: ``[cx, cy, w, h]``. The noise grows with
the box's size (a big, near object moves more pixels per frame than a small, far one), with the
weights ByteTrack and SORT use (position 1/20, velocity 1/160 of the box side). The time step is
a float number of frame periods: a frame that a ``latest`` link skipped makes the next step 2.0,
so the prediction moves twice as far and its uncertainty grows twice as much, instead of the
filter acting as if one period had passed.

Everything works on stacked arrays, ``means`` (n, 8) and ``covs`` (n, 8, 8): one numpy call per
step for all tracks of a frame, which is what keeps 50 objects well under a millisecond (a loop
of 8x8 products per track costs about 50 us each).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["KalmanXYWH", "xywh_to_xyxy", "xyxy_to_xywh"]

_H = np.eye(4, 8)  # measurement: the first four state entries


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) x1 y1 x2 y2 -> (n, 4) cx cy w h, float64."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    wh = b[:, 2:4] - b[:, 0:2]
    return np.concatenate([b[:, 0:2] + wh / 2, wh], axis=1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(n, >=4) cx cy w h ... -> (n, 4) x1 y1 x2 y2."""
    b = np.asarray(boxes, np.float64).reshape(len(boxes), -1)[:, :4]
    half = b[:, 2:4] / 2
    return np.concatenate([b[:, 0:2] - half, b[:, 0:2] + half], axis=1)


class KalmanXYWH:
    """Predict and correct boxes under constant velocity (see the module docstring)."""

    def __init__(self, std_position: float = 1.0 / 20, std_velocity: float = 1.0 / 160) -> None:
        self.std_position = std_position
        self.std_velocity = std_velocity

    def _sides(self, means: np.ndarray) -> np.ndarray:
        """(n, 4) w, h, w, h of each state, floored at 1 px so a degenerate box keeps some noise."""
        wh = np.maximum(means[:, 2:4], 1.0)
        return np.concatenate([wh, wh], axis=1)

    def initiate(self, boxes_xywh: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """New tracks at measured boxes (k, 4): velocity 0 with a wide uncertainty."""
        z = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
        means = np.concatenate([z, np.zeros_like(z)], axis=1)
        sides = self._sides(means)
        std = np.concatenate([2 * self.std_position * sides, 10 * self.std_velocity * sides], axis=1)
        covs = np.zeros((len(z), 8, 8))
        idx = np.arange(8)
        covs[:, idx, idx] = std**2
        return means, covs

    def predict(self, means: np.ndarray, covs: np.ndarray, dt: float) -> Tuple[np.ndarray, np.ndarray]:
        """Every state ``dt`` frame periods ahead (dt may be fractional or larger than 1)."""
        if not len(means):
            return means, covs
        f = np.eye(8)
        f[:4, 4:] = dt * np.eye(4)
        means = means @ f.T
        sides = self._sides(means)
        q = np.concatenate([self.std_position * sides, self.std_velocity * sides], axis=1) ** 2 * dt
        covs = f @ covs @ f.T
        idx = np.arange(8)
        covs[:, idx, idx] += q
        return means, covs

    def update(self, means: np.ndarray, covs: np.ndarray, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Correct states (k, 8)/(k, 8, 8) with measured boxes ``z`` (k, 4) cx cy w h."""
        if not len(means):
            return means, covs
        sides = self._sides(means)[:, :4]
        r = (self.std_position * sides) ** 2  # (k, 4) measurement noise, diagonal
        s = covs[:, :4, :4].copy()  # H P H^T
        idx = np.arange(4)
        s[:, idx, idx] += r
        pht = covs[:, :, :4]  # P H^T, (k, 8, 4)
        # K = P H^T S^-1, solved rather than inverted: S is symmetric positive definite.
        gain = np.linalg.solve(s, np.transpose(pht, (0, 2, 1))).transpose(0, 2, 1)
        innovation = np.asarray(z, np.float64).reshape(-1, 4) - means[:, :4]
        means = means + np.einsum("kij,kj->ki", gain, innovation)
        covs = covs - gain @ covs[:, :4, :]
        return means, covs
