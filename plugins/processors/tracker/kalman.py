"""A constant-velocity Kalman filter for boxes, batched over every track of a source.

State per track: ``[cx, cy, w, h, vx, vy, vw, vh]`` (box centre and size in original-frame
pixels, and their rates per frame period); measurement: ``[cx, cy, w, h]``. The noise grows with
the box's size (a big, near object moves more pixels per frame than a small, far one), with the
weights ByteTrack and SORT use (position 1/20, velocity 1/160 of the box side). The time step is
a float number of frame periods: a frame that a ``latest`` link skipped makes the next step 2.0,
so the prediction moves twice as far and its uncertainty grows twice as much, instead of the
filter acting as if one period had passed.

Everything works on stacked arrays, one numpy call per step for all tracks of a frame. The
filter also never builds 8x8 matrices: the motion, the noise and the measurement treat the four
box quantities independently (each is a position and its rate), so the 8x8 covariance stays
block-diagonal and is kept as its three distinct entries per quantity, ``covs`` (n, 3, 4): the
variance of the position, the covariance of position and rate, the variance of the rate. The
result is exactly the full filter's, at a tenth of the cost (about 10 us per step for 50 tracks).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["KalmanXYWH", "xywh_to_xyxy", "xyxy_to_xywh"]


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
    """Predict and correct boxes under constant velocity (see the module docstring).

    ``means`` (n, 8): cx, cy, w, h and their rates; ``covs`` (n, 3, 4): per quantity the
    position variance, the position-rate covariance and the rate variance."""

    def __init__(self, std_position: float = 1.0 / 20, std_velocity: float = 1.0 / 160) -> None:
        self.std_position = std_position
        self.std_velocity = std_velocity

    @staticmethod
    def _sides(means: np.ndarray) -> np.ndarray:
        """(n, 4) w, h, w, h of each state, floored at 1 px so a degenerate box keeps some noise."""
        wh = np.maximum(means[:, 2:4], 1.0)
        return np.concatenate([wh, wh], axis=1)

    def initiate(self, boxes_xywh: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """New tracks at measured boxes (k, 4): rate 0 with a wide uncertainty."""
        z = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
        means = np.concatenate([z, np.zeros_like(z)], axis=1)
        return means, self.initial_covs(means)

    def initial_covs(self, means: np.ndarray) -> np.ndarray:
        """The uncertainty of new tracks at states ``means`` (k, >=4): wide, uncorrelated."""
        sides = self._sides(means)
        covs = np.zeros((len(means), 3, 4))
        covs[:, 0] = (2 * self.std_position * sides) ** 2
        covs[:, 2] = (10 * self.std_velocity * sides) ** 2
        return covs

    def predict(self, means: np.ndarray, covs: np.ndarray, dt: float) -> Tuple[np.ndarray, np.ndarray]:
        """Every state ``dt`` frame periods ahead (dt may be fractional or larger than 1)."""
        if not len(means):
            return means, covs
        means = means.copy()
        means[:, :4] += dt * means[:, 4:]
        sides = self._sides(means)
        pp, pv, vv = covs[:, 0], covs[:, 1], covs[:, 2]
        out = np.empty_like(covs)
        out[:, 0] = pp + 2 * dt * pv + dt * dt * vv + (self.std_position * sides) ** 2 * dt
        out[:, 1] = pv + dt * vv
        out[:, 2] = vv + (self.std_velocity * sides) ** 2 * dt
        return means, out

    def update(self, means: np.ndarray, covs: np.ndarray, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Correct states (k, 8)/(k, 3, 4) with measured boxes ``z`` (k, 4) cx cy w h."""
        if not len(means):
            return means, covs
        r = (self.std_position * self._sides(means)) ** 2  # measurement noise
        pp, pv, vv = covs[:, 0], covs[:, 1], covs[:, 2]
        s = pp + r
        gain_p, gain_v = pp / s, pv / s
        innovation = np.asarray(z, np.float64).reshape(-1, 4) - means[:, :4]
        means = means.copy()
        means[:, :4] += gain_p * innovation
        means[:, 4:] += gain_v * innovation
        out = np.empty_like(covs)
        out[:, 0] = (1 - gain_p) * pp
        out[:, 1] = (1 - gain_p) * pv
        out[:, 2] = vv - gain_v * pv
        return means, out

    def gating_distance(self, means: np.ndarray, covs: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance (n, m) of each measured box ``z`` (m, 4) cx cy w h from
        each predicted state (n, 8)/(n, 3, 4), under the covariance the filter would give the
        measurement (predicted position variance plus measurement noise). The quantities are
        independent, so the 4x4 covariance is diagonal and the distance a sum of four ratios;
        it follows a chi-square law with 4 degrees of freedom when the model is right."""
        s = covs[:, 0] + (self.std_position * self._sides(means)) ** 2  # (n, 4)
        d = np.asarray(z, np.float64).reshape(1, -1, 4) - means[:, None, :4]  # (n, m, 4)
        return np.einsum("nmq,nq->nm", d * d, 1.0 / s)
