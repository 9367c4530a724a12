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
   2b. Confirmed tracks lost on earlier frames and still unmatched take the high detections
   left by the squared Mahalanobis distance of the box from their prediction, under the
   Kalman filter's own uncertainty, which grows the longer a track is lost (optimal
   assignment, gated at the chi-square 95% quantile for 4 degrees of freedom, as DeepSORT
   gates; same class with ``class_aware``): an object that comes out from behind another a
   little off its predicted path no longer overlaps the prediction, the more so the smaller it
   is. Not for a track predicted mostly outside the frame (it left; whatever comes in there is
   another object), nor for a detection that duplicates one matched on this frame.
3. Low-confidence detections (``low_thresh`` up to ``track_thresh``) are matched to the
   confirmed tracks still unmatched that were seen on the previous frame (``1 - IoU <= 0.5``).
4. With ``class_aware``, steps 2 and 3 only pair a detection with a track of its class; then
   the confirmed tracks still unmatched may take a detection of another class that overlaps
   them well (``IoU >= 0.5``): detectors waver between similar classes on one object (a shape
   half out of the frame, a partly hidden one), and a new id each time would be an identity
   switch.
5. Tentative tracks (seen on fewer than ``min_hits`` frames) are matched to the high detections
   left (``1 - IoU <= 0.7``); a tentative track that misses a frame is dropped.
6. High detections still left, of at least ``new_track_thresh``, start tentative tracks, unless
   60% or more of their box lies on a detection taken in this frame or on a confirmed track
   lost on this frame, one at most 2.5 times their size:
   that is the same object seen twice (as two classes, or a part of it), not a new one, and a
   new object coming out from behind a tracked one gets its track once it is mostly in view.
7. A confirmed track unseen for longer than ``track_buffer`` ends.

With ``class_aware`` (the default) a detection goes to a track of its class first, so two
objects of different classes crossing each other keep their identities. A track's label is the
class with the most confidence summed over its detections; when that changes, an ``update``
says so.

Ids are given when a track is confirmed, through the ``allocate`` callback (the stage persists
the next id before any frame carrying it leaves, so a restarted tracker never reuses one).
This module is pure computation: no I/O, no clock of its own.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .kalman import KalmanXYWH, xywh_to_xyxy, xyxy_to_xywh

__all__ = ["ByteTracker", "Params", "Track", "ioa_matrix", "iou_matrix"]

LOW_MATCH_THRESH = 0.5  # step 3: the low boxes must overlap well to continue a track
CLASS_CHANGE_THRESH = 0.5  # step 4: another class continues a track only at IoU >= 0.5
TENTATIVE_MATCH_THRESH = 0.7  # step 5: ByteTrack's value for unconfirmed tracks
DUPLICATE_IOA = 0.6  # step 6: a detection lying this much on a tracked object is that object,
DUPLICATE_AREA = 0.4  # unless it is less than this fraction of its size
# step 2b: a lost track takes a high detection whose box lies in the 95% region of the box its
# Kalman filter predicts (squared Mahalanobis distance below the chi-square quantile for 4 degrees
# of freedom, the gate DeepSORT uses); the region grows the longer the track is lost
RECOVER_GATE = 9.4877
RECOVER_INSIDE = 0.5  # ...unless less than this fraction of its predicted box is in the frame


def _overlap(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection (n, m), area of a (n,), area of b (m,)) of x1 y1 x2 y2 boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    # x and y apart, on (n, m) planes: a tenth of the work of (n, m, 2) stacks for 50 x 50 boxes
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
    area_a = np.maximum(a[:, 2] - a[:, 0], 0.0) * np.maximum(a[:, 3] - a[:, 1], 0.0)
    area_b = np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)
    return inter, area_a, area_b


def _area(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)


def _duplicates(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(n,) bool: which ``boxes`` lie for DUPLICATE_IOA or more on one of ``others`` of at most
    1 / DUPLICATE_AREA their size (the same object seen twice, as two classes or a part of it;
    a small object in front of a big one is an object)."""
    ratio = _area(boxes)[:, None] / np.maximum(_area(others)[None, :], 1e-12)
    return ((ioa_matrix(boxes, others) >= DUPLICATE_IOA) & (ratio >= DUPLICATE_AREA)).any(axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4), x1 y1 x2 y2 -> (n, m)."""
    inter, area_a, area_b = _overlap(a, b)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def ioa_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The fraction of each box of ``a`` that lies on each box of ``b`` -> (n, m)."""
    inter, area_a, _ = _overlap(a, b)
    return np.where(area_a[:, None] > 0, inter / np.maximum(area_a[:, None], 1e-12), 0.0)


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
    """One tracked object. ``track_id`` is None while it is tentative. Its Kalman state is a
    row of the tracker's ``means`` and ``covs``."""

    __slots__ = (
        "best_confidence", "box", "class_id", "confidence", "first_seen", "hits",
        "last_seen", "lost_for", "track_id", "votes",
    )

    def __init__(self, box: np.ndarray, confidence: float, class_id: int, timestamp: float) -> None:
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


Event = Tuple[str, Track, Dict[str, object]]


class _Now:
    """One frame's view for the associations: the tracks' predicted states (``means`` (n, 8),
    ``covs`` (n, 3, 4)), their boxes (n, 4) and classes (n,), the detections' boxes (m, 4) and
    classes (m,), and the IoU of every track with every detection (n, m), computed once."""

    __slots__ = ("boxes", "covs", "det_boxes", "det_cls", "iou", "means", "track_cls", "tracks")

    def __init__(self, tracks: List[Track], means: np.ndarray, covs: np.ndarray, dets: np.ndarray) -> None:
        self.tracks = tracks
        self.means, self.covs = means, covs
        self.boxes = xywh_to_xyxy(means) if len(means) else np.zeros((0, 4))
        self.track_cls = np.array([t.class_id for t in tracks], np.int64)
        self.det_boxes = dets[:, :4].astype(np.float64)
        self.det_cls = dets[:, 5].astype(np.int64)
        self.iou = iou_matrix(self.boxes, self.det_boxes)

    def associate(
        self, candidates: np.ndarray, rows: np.ndarray, thresh: float, same_class: bool
    ) -> Tuple[List[Tuple[int, int]], np.ndarray, np.ndarray]:
        """Optimal IoU assignment of the tracks ``candidates`` (indices) to detection ``rows``:
        (pairs (track index, row), tracks left, rows left), both in their given order. A pair
        needs ``1 - IoU <= thresh`` (and the same class with ``same_class``)."""
        if not len(candidates) or not len(rows):
            return [], candidates, rows
        cost = 1.0 - self.iou[np.ix_(candidates, rows)]
        if same_class:
            cost[self.track_cls[candidates][:, None] != self.det_cls[rows][None, :]] = 2.0
        ti, di = linear_sum_assignment(cost)
        ok = cost[ti, di] <= thresh
        used_t = np.zeros(len(candidates), bool)
        used_t[ti[ok]] = True
        used_d = np.zeros(len(rows), bool)
        used_d[di[ok]] = True
        pairs = list(zip(candidates[ti[ok]].tolist(), rows[di[ok]].tolist()))
        return pairs, candidates[~used_t], rows[~used_d]


class ByteTracker:
    """The tracks of one source; :meth:`step` once per frame, in frame order."""

    def __init__(self, params: Params, allocate: Callable[[], int]) -> None:
        self.params = params
        self.allocate = allocate
        self.kalman = KalmanXYWH()
        self.tracks: List[Track] = []
        # The tracks' Kalman states, row k for tracks[k] (the filter works on all at once)
        self.means = np.zeros((0, 8))
        self.covs = np.zeros((0, 3, 4))
        self.clock: Optional[float] = None  # time of the last step, in frame periods

    def confirmed(self) -> List[Track]:
        return [t for t in self.tracks if t.track_id is not None]

    def step(
        self,
        detections: np.ndarray,
        clock: float,
        timestamp: float,
        buffer_frames: float,
        frame_size: Optional[Tuple[int, int]] = None,
    ) -> Tuple[List[Optional[int]], List[Event]]:
        """Track the (n, 6) ``x1 y1 x2 y2 conf cls`` detections of one frame at time ``clock``
        (frame periods); ``timestamp`` is its capture time, ``buffer_frames`` how many periods a
        lost track survives, ``frame_size`` the frame's (width, height) when known (a lost
        track predicted mostly outside it is not looked for, step 2b). Returns the track id of
        each detection row (None: no confirmed track) and the lifecycle events: ``("new",
        track, {})``, ``("update", track, {"changed": ["label"]})``, ``("end", track,
        {"reason": "lost"})``."""
        p = self.params
        dt = 1.0 if self.clock is None else max(0.0, clock - self.clock)
        self.clock = clock
        events: List[Event] = []
        dets = np.asarray(detections, np.float32).reshape(-1, 6)
        ids: List[Optional[int]] = [None] * len(dets)

        # 1. predict every track to now. The associations below all look at these predictions
        # (tracks are corrected only once every association is made), so the tracks' boxes,
        # classes and overlaps are taken into arrays once and each step picks rows of them.
        tracks = self.tracks
        n = len(tracks)
        if n:
            # A lost track keeps moving but stops growing or shrinking: extrapolating its size
            # for seconds makes a box that no detection fits (ByteTrack does the same).
            self.means[[t.lost_for > 0 for t in tracks], 6:8] = 0.0
            self.means, self.covs = self.kalman.predict(self.means, self.covs, dt)
            for t in tracks:
                t.confidence = None
        means, covs = self.means, self.covs
        now = _Now(tracks, means, covs, dets)

        scores = dets[:, 4].astype(np.float64)
        classes = now.det_cls
        eligible = np.ones(len(dets), bool)
        if p.classes is not None:
            eligible = np.array([c in p.classes for c in classes.tolist()], bool)
        high = np.flatnonzero(eligible & (scores >= p.track_thresh))
        low = np.flatnonzero(eligible & (scores >= p.low_thresh) & (scores < p.track_thresh))

        confirmed = np.array([k for k, t in enumerate(tracks) if t.track_id is not None], np.int64)
        tentative = np.array([k for k, t in enumerate(tracks) if t.track_id is None], np.int64)
        matched: List[Tuple[int, int]] = []  # (track index, detection row)

        # 2. high detections <-> confirmed tracks (lost ones too); 4. then across classes
        pairs, left_tracks, left_high = now.associate(confirmed, high, p.match_thresh, p.class_aware)
        matched += pairs
        if p.class_aware:
            pairs, left_tracks, left_high = now.associate(left_tracks, left_high, CLASS_CHANGE_THRESH, False)
            matched += pairs
        # 2b. lost tracks <-> the high detections left, by distance from the prediction
        pairs, left_tracks, left_high = self._recover(
            now, left_tracks, left_high, p.class_aware, [d for _, d in matched], frame_size)
        matched += pairs
        # 3. low detections <-> confirmed tracks seen on the previous frame; 4. then across classes
        recent = left_tracks[[tracks[k].lost_for == 0.0 for k in left_tracks.tolist()]]
        pairs, recent, left_low = now.associate(recent, low, LOW_MATCH_THRESH, p.class_aware)
        matched += pairs
        if p.class_aware:
            pairs, _, _ = now.associate(recent, left_low, CLASS_CHANGE_THRESH, False)
            matched += pairs
        # 5. tentative tracks <-> the high detections left
        pairs, _, left_high = now.associate(tentative, left_high, TENTATIVE_MATCH_THRESH, False)
        matched += pairs

        if matched:
            ti = np.array([k for k, _ in matched])
            rows = np.array([d for _, d in matched])
            means[ti], covs[ti] = self.kalman.update(means[ti], covs[ti], xyxy_to_xywh(dets[rows, :4]))
            confs, cls_list = scores.tolist(), classes.tolist()  # Python numbers: cheaper one by one
            for k, d in matched:
                t = tracks[k]
                self._seen(t, now.det_boxes[d], confs[d], cls_list[d], timestamp, events)
                if t.track_id is None and t.hits >= p.min_hits:
                    self._confirm(t, events)
                if t.track_id is not None:
                    ids[d] = t.track_id

        seen = np.zeros(n, bool)
        seen[[k for k, _ in matched]] = True
        survivors: List[Track] = []
        kept: List[int] = []  # their rows
        lost_now: List[int] = []  # confirmed tracks lost on this very frame
        for k, t in enumerate(tracks):
            if seen[k]:
                survivors.append(t)
                kept.append(k)
                continue
            if t.track_id is None:
                continue  # a tentative track that missed a frame is dropped (never published)
            t.lost_for += dt
            if t.lost_for > buffer_frames:
                events.append(("end", t, {"reason": "lost"}))
                continue
            if t.lost_for <= dt:
                lost_now.append(k)
            survivors.append(t)
            kept.append(k)
        means, covs = means[kept], covs[kept]

        # 6. new tentative tracks from the high detections nobody took (and nothing tracked covers)
        fresh = [d for d in left_high.tolist() if scores[d] >= p.new_track_thresh]
        if fresh and (matched or lost_now):
            # Tracks lost on this very frame still have a trustworthy predicted box; older ones
            # have drifted too far to vouch for what is there.
            known = np.concatenate([now.det_boxes[[d for _, d in matched]], now.boxes[lost_now]])
            same = _duplicates(now.det_boxes[fresh], known)
            fresh = [d for d, dup in zip(fresh, same.tolist()) if not dup]
        if fresh:
            rows = np.array(fresh)
            new_means, new_covs = self.kalman.initiate(xyxy_to_xywh(dets[rows, :4]))
            means, covs = np.concatenate([means, new_means]), np.concatenate([covs, new_covs])
            for d in fresh:
                t = Track(dets[d, :4].astype(np.float64), float(scores[d]), int(classes[d]), timestamp)
                if p.min_hits <= 1:
                    self._confirm(t, events)
                    ids[d] = t.track_id
                survivors.append(t)
        self.tracks, self.means, self.covs = survivors, means, covs
        return ids, events

    def end_all(self) -> List[Track]:
        """Forget every track; the confirmed ones, which had been announced, are returned."""
        done = self.confirmed()
        self.tracks = []
        self.means, self.covs = self.means[:0], self.covs[:0]
        return done

    def _recover(
        self, now: _Now, candidates: np.ndarray, rows: np.ndarray, same_class: bool, taken: List[int],
        frame_size: Optional[Tuple[int, int]],
    ) -> Tuple[List[Tuple[int, int]], np.ndarray, np.ndarray]:
        """Step 2b: the lost ones among the tracks ``candidates`` (indices) <-> detection
        ``rows`` by the squared Mahalanobis distance of the box from the track's prediction
        (optimal assignment, gated at RECOVER_GATE): (pairs, tracks left, rows left). IoU with
        the prediction (step 2) misses an object that comes out of hiding a little off its
        predicted path, the more so the smaller it is; the filter's own uncertainty, which grows
        while the track is lost, says how far off is still the same object. Left out: tracks
        predicted mostly outside the frame (they left it; an object coming in there is another
        one) and detections that duplicate one already matched on this frame (rows ``taken``:
        the same object seen twice)."""
        lost = candidates[[now.tracks[k].lost_for > 0 for k in candidates.tolist()]]
        if len(lost) and frame_size is not None:
            w, h = frame_size
            boxes = now.boxes[lost]
            inside = _area(np.clip(boxes, 0, [w, h, w, h])) / np.maximum(_area(boxes), 1e-12)
            lost = lost[inside >= RECOVER_INSIDE]
        near = rows
        if len(lost) and len(rows) and taken:
            near = rows[~_duplicates(now.det_boxes[rows], now.det_boxes[taken])]
        if not len(lost) or not len(near):
            return [], candidates, rows
        cost = self.kalman.gating_distance(now.means[lost], now.covs[lost], xyxy_to_xywh(now.det_boxes[near]))
        if same_class:
            cost[now.track_cls[lost][:, None] != now.det_cls[near][None, :]] = np.inf
        cost = np.where(cost <= RECOVER_GATE, cost, 1e6)  # finite: the solver needs a full assignment
        ti, di = linear_sum_assignment(cost)
        ok = cost[ti, di] <= RECOVER_GATE
        pairs = list(zip(lost[ti[ok]].tolist(), near[di[ok]].tolist()))
        return pairs, candidates[~np.isin(candidates, lost[ti[ok]])], rows[~np.isin(rows, near[di[ok]])]

    def _seen(self, t: Track, box: np.ndarray, conf: float, cls: int, timestamp: float, events: List[Event]) -> None:
        t.hits += 1
        t.lost_for = 0.0
        t.box = box
        t.confidence = conf
        t.best_confidence = max(t.best_confidence, conf)
        t.last_seen = timestamp
        t.votes[cls] = t.votes.get(cls, 0.0) + conf
        if cls == t.class_id:
            return  # more votes for the class that led (and was first among equals): it still leads
        best = max(t.votes, key=lambda c: t.votes[c])
        if best != t.class_id:
            t.class_id = best
            if t.track_id is not None:
                events.append(("update", t, {"changed": ["label"]}))

    def _confirm(self, t: Track, events: List[Event]) -> None:
        t.track_id = self.allocate()
        events.append(("new", t, {}))
