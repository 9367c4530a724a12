"""Multi-object tracking of one source's detections in the manner of ByteTrack.

ByteTrack's idea (Zhang et al., "ByteTrack: Multi-Object Tracking by Associating Every Detection
Box", ECCV 2022): keep the low-confidence detections instead of throwing them away, and use them
in a second round to continue tracks whose object became hard to see (partly occluded, blurred)
rather than letting those tracks die. Per frame:

1. Every track's box is predicted to this frame by a constant-velocity Kalman filter
   (:mod:`.kalman`), over the time that really passed (frame-id gaps count).
2. High-confidence detections (``>= track_thresh``) are matched to confirmed tracks, lost ones
   included, by IoU with an optimal assignment (``scipy.optimize.linear_sum_assignment``; a
   pair needs ``1 - IoU <= match_thresh``).
3. Low-confidence detections (``low_thresh`` up to ``track_thresh``) are matched to the
   confirmed tracks still unmatched that were seen on the previous frame (``1 - IoU <= 0.5``).
4. Tentative tracks (seen on fewer than ``min_hits`` frames) are matched to the high detections
   left (``1 - IoU <= 0.7``); a tentative track that misses a frame is dropped.
5. High detections still left, of at least ``new_track_thresh``, start tentative tracks.
6. A confirmed track unseen for longer than ``track_buffer`` ends.

With ``class_aware`` (the default) a detection is only ever matched to a track of its class, so
two objects of different classes crossing each other cannot swap identities; without it, the
track's label is the class with the most confidence summed over its detections.

Ids are given when a track is confirmed, through the ``allocate`` callback (the stage persists
the next id before any frame carrying it leaves, so a restarted tracker never reuses one).
This module is pure computation: no I/O, no clock of its own.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .kalman import KalmanXYWH, xywh_to_xyxy, xyxy_to_xywh

__all__ = ["ByteTracker", "Params", "Track", "iou_matrix"]

LOW_MATCH_THRESH = 0.5  # step 3: the low boxes must overlap well to continue a track
TENTATIVE_MATCH_THRESH = 0.7  # step 4: ByteTrack's value for unconfirmed tracks


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4), x1 y1 x2 y2 -> (n, m)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


class Params:
    """The tracker's thresholds (the stage's config, resolved)."""

    def __init__(
        self,
        track_thresh: float = 0.5,
        low_thresh: float = 0.1,
        new_track_thresh: float = 0.6,
        match_thresh: float = 0.8,
        min_hits: int = 2,
        class_aware: bool = True,
        classes: Optional[List[int]] = None,
    ) -> None:
        self.track_thresh = track_thresh
        self.low_thresh = low_thresh
        self.new_track_thresh = new_track_thresh
        self.match_thresh = match_thresh
        self.min_hits = min_hits
        self.class_aware = class_aware
        self.classes = None if classes is None else set(classes)


class Track:
    """One tracked object. ``track_id`` is None while it is tentative."""

    __slots__ = (
        "best_confidence", "box", "class_id", "confidence", "cov", "first_seen", "hits",
        "last_seen", "lost_for", "mean", "track_id", "votes",
    )

    def __init__(self, mean: np.ndarray, cov: np.ndarray, box: np.ndarray, confidence: float,
                 class_id: int, timestamp: float) -> None:
        self.mean = mean
        self.cov = cov
        self.track_id: Optional[int] = None
        self.box = box  # (4,) x1 y1 x2 y2 of its latest detection
        self.confidence: Optional[float] = confidence  # on the current frame, None when unmatched
        self.best_confidence = confidence
        self.class_id = class_id
        self.votes: Dict[int, float] = {class_id: confidence}
        self.hits = 1  # frames it was matched on, in a row while tentative
        self.lost_for = 0.0  # frame periods since it was last matched
        self.first_seen = timestamp
        self.last_seen = timestamp

    def predicted_box(self) -> np.ndarray:
        return xywh_to_xyxy(self.mean[None])[0]


Event = Tuple[str, Track, Dict[str, object]]


class ByteTracker:
    """The tracks of one source; :meth:`step` once per frame, in frame order."""

    def __init__(self, params: Params, allocate: Callable[[], int]) -> None:
        self.params = params
        self.allocate = allocate
        self.kalman = KalmanXYWH()
        self.tracks: List[Track] = []
        self.clock: Optional[float] = None  # time of the last step, in frame periods

    def confirmed(self) -> List[Track]:
        return [t for t in self.tracks if t.track_id is not None]

    def step(
        self,
        detections: np.ndarray,
        clock: float,
        timestamp: float,
        buffer_frames: float,
    ) -> Tuple[List[Optional[int]], List[Event]]:
        """Track the (n, 6) ``x1 y1 x2 y2 conf cls`` detections of one frame at time ``clock``
        (frame periods); ``timestamp`` is its capture time, ``buffer_frames`` how many periods a
        lost track survives. Returns the track id of each detection row (None: no confirmed
        track) and the lifecycle events: ``("new", track, {})``, ``("update", track,
        {"changed": ["label"]})``, ``("end", track, {"reason": "lost"})``."""
        p = self.params
        dt = 1.0 if self.clock is None else max(0.0, clock - self.clock)
        self.clock = clock
        events: List[Event] = []
        dets = np.asarray(detections, np.float32).reshape(-1, 6)
        ids: List[Optional[int]] = [None] * len(dets)

        # 1. predict every track to now
        if self.tracks:
            means, covs = self.kalman.predict(
                np.stack([t.mean for t in self.tracks]), np.stack([t.cov for t in self.tracks]), dt)
            for t, m, c in zip(self.tracks, means, covs):
                t.mean, t.cov, t.confidence = m, c, None

        scores = dets[:, 4].astype(np.float64)
        classes = dets[:, 5].astype(np.int64)
        eligible = np.ones(len(dets), bool)
        if p.classes is not None:
            eligible = np.array([c in p.classes for c in classes.tolist()], bool)
        high = np.flatnonzero(eligible & (scores >= p.track_thresh))
        low = np.flatnonzero(eligible & (scores >= p.low_thresh) & (scores < p.track_thresh))

        confirmed = [t for t in self.tracks if t.track_id is not None]
        tentative = [t for t in self.tracks if t.track_id is None]
        matched: List[Tuple[Track, int]] = []

        # 2. high detections <-> confirmed tracks (lost ones too)
        pairs, left_tracks, left_high = self._associate(confirmed, dets, high, p.match_thresh)
        matched += pairs
        # 3. low detections <-> confirmed tracks seen on the previous frame
        recent = [t for t in left_tracks if t.lost_for == 0.0]
        pairs, _, _ = self._associate(recent, dets, low, LOW_MATCH_THRESH)
        matched += pairs
        # 4. tentative tracks <-> the high detections left
        pairs, _, left_high = self._associate(tentative, dets, left_high, TENTATIVE_MATCH_THRESH)
        matched += pairs

        if matched:
            tracks = [t for t, _ in matched]
            rows = np.array([d for _, d in matched])
            means, covs = self.kalman.update(
                np.stack([t.mean for t in tracks]), np.stack([t.cov for t in tracks]),
                xyxy_to_xywh(dets[rows, :4]))
            for (t, d), m, c in zip(matched, means, covs):
                t.mean, t.cov = m, c
                self._seen(t, dets[d], timestamp, events)
                if t.track_id is None and t.hits >= p.min_hits:
                    self._confirm(t, events)
                if t.track_id is not None:
                    ids[d] = t.track_id

        seen = {id(t) for t, _ in matched}
        survivors: List[Track] = []
        for t in self.tracks:
            if id(t) in seen:
                survivors.append(t)
                continue
            if t.track_id is None:
                continue  # a tentative track that missed a frame is dropped (never published)
            t.lost_for += dt
            if t.lost_for > buffer_frames:
                events.append(("end", t, {"reason": "lost"}))
                continue
            survivors.append(t)

        # 5. new tentative tracks from the high detections nobody took
        fresh = [d for d in left_high if scores[d] >= p.new_track_thresh]
        if fresh:
            rows = np.array(fresh)
            means, covs = self.kalman.initiate(xyxy_to_xywh(dets[rows, :4]))
            for d, m, c in zip(fresh, means, covs):
                t = Track(m, c, dets[d, :4].astype(np.float64), float(scores[d]), int(classes[d]), timestamp)
                if p.min_hits <= 1:
                    self._confirm(t, events)
                    ids[d] = t.track_id
                survivors.append(t)
        self.tracks = survivors
        return ids, events

    def end_all(self) -> List[Track]:
        """Forget every track; the confirmed ones, which had been announced, are returned."""
        done = self.confirmed()
        self.tracks = []
        return done

    def _associate(
        self, tracks: List[Track], dets: np.ndarray, rows: np.ndarray, thresh: float
    ) -> Tuple[List[Tuple[Track, int]], List[Track], np.ndarray]:
        """Optimal IoU assignment of ``tracks`` to detection ``rows``: (pairs, tracks left,
        rows left). A pair needs ``1 - IoU <= thresh`` (and the same class when class-aware)."""
        rows = np.asarray(rows, np.int64)
        if not tracks or not len(rows):
            return [], list(tracks), rows
        boxes = np.stack([t.predicted_box() for t in tracks])
        cost = 1.0 - iou_matrix(boxes, dets[rows, :4])
        if self.params.class_aware:
            track_cls = np.array([t.class_id for t in tracks])
            cost[track_cls[:, None] != dets[rows, 5].astype(np.int64)[None, :]] = 2.0
        ti, di = linear_sum_assignment(cost)
        ok = cost[ti, di] <= thresh
        pairs = [(tracks[i], int(rows[j])) for i, j in zip(ti[ok], di[ok])]
        used_t, used_d = set(ti[ok].tolist()), set(di[ok].tolist())
        left_t = [t for i, t in enumerate(tracks) if i not in used_t]
        left_d = np.array([r for j, r in enumerate(rows.tolist()) if j not in used_d], np.int64)
        return pairs, left_t, left_d

    def _seen(self, t: Track, det: np.ndarray, timestamp: float, events: List[Event]) -> None:
        conf, cls = float(det[4]), int(det[5])
        if t.lost_for == 0.0 or t.track_id is None:
            t.hits += 1
        t.lost_for = 0.0
        t.box = det[:4].astype(np.float64)
        t.confidence = conf
        t.best_confidence = max(t.best_confidence, conf)
        t.last_seen = timestamp
        t.votes[cls] = t.votes.get(cls, 0.0) + conf
        if not self.params.class_aware:
            best = max(t.votes, key=lambda c: t.votes[c])
            if best != t.class_id:
                t.class_id = best
                if t.track_id is not None:
                    events.append(("update", t, {"changed": ["label"]}))

    def _confirm(self, t: Track, events: List[Event]) -> None:
        t.track_id = self.allocate()
        events.append(("new", t, {}))
