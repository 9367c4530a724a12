"""Multi-object tracking of one source's detections in the manner of ByteTrack.

ByteTrack's idea (Zhang et al., "ByteTrack: Multi-Object Tracking by Associating Every Detection
Box", ECCV 2022): keep the low-confidence detections instead of throwing them away, and use them
in a second round to continue tracks whose object became hard to see (partly occluded, blurred)
rather than letting those tracks die. Per frame:

1. Every track's box is predicted to this frame by a constant-velocity Kalman filter
   (:mod:`.kalman`), over the time that really passed (frame-id gaps count). A track hidden
   behind another (step 7) keeps its own motion but is held inside its occluder's predicted box.
2. High-confidence detections (``>= track_thresh``) are matched to confirmed tracks, lost ones
   included, by IoU with an optimal assignment (``scipy.optimize.linear_sum_assignment``; a
   pair needs ``1 - IoU <= match_thresh``). With ``class_aware`` a detection of another class
   than the track's pairs with it only at IoU >= 0.5 and at a higher cost (CLASS_PENALTY):
   detectors waver between similar classes on one object (a shape half out of the frame, a
   partly hidden one), and a new id each time would be an identity switch, while two objects of
   different classes crossing keep their own tracks.
   2b. Confirmed tracks lost on earlier frames and still unmatched take the high detections
   left by the squared Mahalanobis distance of the box from their prediction, under the
   Kalman filter's own uncertainty, which grows the longer a track is lost (optimal
   assignment, gated at the chi-square 95% quantile for 4 degrees of freedom, as DeepSORT
   gates; same class with ``class_aware``): an object that comes out from behind another a
   little off its predicted path no longer overlaps the prediction, the more so the smaller it
   is. Not for a track predicted mostly outside the frame (it left; whatever comes in there is
   another object), nor for a detection that duplicates one matched on this frame.
   2c. Tracks hidden behind another take the high detections left that come out around their
   occluder: the centre within the occluder's box grown by the hidden object's size, width and
   height within a factor of 2 of its (the size it had lately, not the sliver seen as it went
   behind), the same class with ``class_aware``; the nearest to where it is held first.
3. Low-confidence detections (``low_thresh`` up to ``track_thresh``) are matched to the
   confirmed tracks still unmatched that were seen on the previous frame (``1 - IoU <= 0.5``),
   other classes as in step 2.
4. Tentative tracks (seen on fewer than ``min_hits`` frames) are matched to the high detections
   left (``1 - IoU <= 0.7``), except a detection lying for 60% or more on one matched to a
   confirmed track on this frame (the same object seen twice, as step 5 says); a tentative track
   that misses a frame is dropped.
   4b. A tentative track whose detection a lost confirmed track could be (within its step 2b
   gate, its predicted box lying for 60% or more on the detection, or around its occluder for
   a hidden one), of whatever class, needs HOLD_HITS more sightings to be confirmed: after
   missing an object for a while the detector often calls it another class, or sees all of it
   where it saw a part, and the lost track takes it back when it is called its own class again.
   If that does not happen, the lost track takes the tentative one's detection (and its
   motion) once it has had those sightings, provided the two move alike (velocities within
   half the faster speed, or a twentieth of the object's size per frame period, and not
   opposite ways), and it did not leave the frame (as in step 2b): a new object that is really
   there moves its own way. Either way no new id starts and ends around an object that
   already had one (two identity switches).
5. High detections still left, of at least ``new_track_thresh``, start tentative tracks, unless
   60% or more of their box lies on a detection taken in this frame or on a confirmed track
   lost on this frame, one at most 2.5 times their size:
   that is the same object seen twice (as two classes, or a part of it), not a new one, and a
   new object coming out from behind a tracked one gets its track once it is mostly in view.
   Of two such new detections lying on each other the more confident one starts the track.
6. A confirmed track unseen for longer than ``track_buffer`` ends; a hidden one, unseen for
   longer than ``hidden_buffer`` since it was hidden.
7. A confirmed track lost within the last HIDE_WINDOW frame periods whose predicted box lies
   for half or more on the box of a confirmed track seen on this frame is hidden behind it
   (unless the two boxes are about the same, IoU >= 0.6: one object seen twice). Motion and
   overlap are all a 1-channel camera gives to go on, and an object that went behind another
   can only be behind it until it comes out: kept there, it is not lost after track_buffer
   however long the other one hides it. When the occluder's track ends, the hidden track
   becomes a plain lost one. Its motion from then on is measured again over its last
   sightings where it was seen whole (TRAIL, FULL_VIEW): going behind, it was seen as a
   shrinking box whose centre lagged behind the object, and the filter's velocity with it.

With ``class_aware`` (the default) a detection goes to a track of its class unless it clearly is
another track's object, so two objects of different classes crossing each other keep their
identities. A track's label is the
class with the most confidence summed over its detections; when that changes, an ``update``
says so.

Ids are given when a track is confirmed, through the ``allocate`` callback (the stage persists
the next id before any frame carrying it leaves, so a restarted tracker never reuses one).
This module is pure computation: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .kalman import KalmanXYWH, xywh_to_xyxy, xyxy_to_xywh

__all__ = ["ByteTracker", "Params", "Track", "ioa_matrix", "iou_matrix"]

LOW_MATCH_THRESH = 0.5  # step 3: the low boxes must overlap well to continue a track
CLASS_CHANGE_THRESH = 0.5  # steps 2, 3: another class continues a track only at IoU >= 0.5,
CLASS_PENALTY = 0.3  # and that pair costs this much more than one of the track's class
TENTATIVE_MATCH_THRESH = 0.7  # step 4: ByteTrack's value for unconfirmed tracks
DUPLICATE_IOA = 0.6  # step 5: a detection lying this much on a tracked object is that object,
DUPLICATE_AREA = 0.4  # unless it is less than this fraction of its size
# step 2b: a lost track takes a high detection whose box lies in the 95% region of the box its
# Kalman filter predicts (squared Mahalanobis distance below the chi-square quantile for 4 degrees
# of freedom, the gate DeepSORT uses); the region grows the longer the track is lost
RECOVER_GATE = 9.4877
RECOVER_INSIDE = 0.5  # ...unless less than this fraction of its predicted box is in the frame
EMERGE_SIZE = 2.0  # step 2c: width and height within this factor of the hidden object's
SIZE_MEMORY = 0.97  # the object's size: the larger of the box seen and this times the last size
HOLD_HITS = 3  # step 4b: more sightings for a new track where a lost one could be,
# after which the lost one takes it if their velocities agree: differ by at most this fraction of
# the faster one's speed, or this fraction of the object's size per frame period (slow objects)
ADOPT_SPEED_FRACTION = 0.5
ADOPT_SIZE_FRACTION = 0.05
# ...and they do not go opposite ways (both moving at least this fraction of its size per period)
ADOPT_MOVING = 0.005
# step 7: a track lost within HIDE_WINDOW frame periods whose predicted box lies for HIDDEN_IOA
# or more on a tracked object seen on the frame is hidden behind it, unless their IoU is
# SAME_BOX_IOU or more (the same object, seen twice)
HIDE_WINDOW = 6.0
HIDDEN_IOA = 0.5
SAME_BOX_IOU = 0.6
# A track's last TRAIL sightings; its motion when it goes behind another is measured over those
# where it was seen whole (width and height at least FULL_VIEW of the largest), FULL_SPAN or more
# frame periods apart
TRAIL = 12
FULL_VIEW = 0.9
FULL_SPAN = 5.0

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


def _full_view_motion(trail: Deque[Tuple[float, float, float, float, float]]) -> Optional[Tuple[np.ndarray, np.ndarray, float]]:
    """(velocity, centre, clock) of an object from its ``trail`` of sightings (clock, cx, cy,
    w, h), measured between the first and the last where it was seen whole; None if those are
    fewer than FULL_SPAN periods apart. An object going behind another is seen as a shrinking
    box whose centre lags behind it (or stands still): the Kalman filter's velocity then is
    not the object's."""
    a = np.array(trail, np.float64).reshape(-1, 5)
    if len(a) < 2:
        return None
    full = (a[:, 3] >= FULL_VIEW * a[:, 3].max()) & (a[:, 4] >= FULL_VIEW * a[:, 4].max())
    f = a[full]
    if len(f) < 2 or f[-1, 0] - f[0, 0] < FULL_SPAN:
        return None
    v = (f[-1, 1:3] - f[0, 1:3]) / (f[-1, 0] - f[0, 0])
    return v, f[-1, 1:3], float(f[-1, 0])


def _in_frame(boxes: np.ndarray, frame_size: Optional[Tuple[int, int]]) -> np.ndarray:
    """(n,) bool: which of the boxes lie for RECOVER_INSIDE or more inside a frame of
    ``frame_size`` (all of them when it is not known)."""
    if frame_size is None:
        return np.ones(len(boxes), bool)
    w, h = frame_size
    return _area(np.clip(boxes, 0, [w, h, w, h])) / np.maximum(_area(boxes), 1e-12) >= RECOVER_INSIDE


def _without(indices: np.ndarray, drop: List[int]) -> np.ndarray:
    """``indices`` without those in ``drop``, in order (a set: np.isin costs more on a few dozen)."""
    if not drop:
        return indices
    gone = set(drop)
    return indices[[i not in gone for i in indices.tolist()]]


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
        "behind", "best_confidence", "box", "class_id", "confidence", "first_seen", "hidden_for", "hits",
        "last_seen", "lost_for", "track_id", "trail", "votes",
    )

    def __init__(self, box: np.ndarray, confidence: float, class_id: int, timestamp: float) -> None:
        self.track_id: Optional[int] = None
        self.box = box  # (4,) x1 y1 x2 y2 of its latest detection
        self.confidence: Optional[float] = confidence  # on the current frame, None when unmatched
        self.best_confidence = confidence
        self.class_id = class_id
        self.votes: Dict[int, float] = {class_id: confidence}
        self.hits = 1  # frames it was matched on, in a row while tentative
        self.lost_for = 0.0  # frame periods since it was last matched (not counting time hidden)
        self.behind: Optional[Track] = None  # the tracked object it is hidden behind, if any
        self.hidden_for = 0.0  # frame periods hidden behind it
        self.first_seen = timestamp
        self.last_seen = timestamp
        self.trail: Deque[Tuple[float, float, float, float, float]] = deque(maxlen=TRAIL)  # clock, cx, cy, w, h


Event = Tuple[str, Track, Dict[str, object]]


class _Now:
    """One frame's view for the associations: the tracks' predicted states (``means`` (n, 8),
    ``covs`` (n, 3, 4)), their boxes (n, 4) and classes (n,), the detections' boxes (m, 4) and
    classes (m,), and the IoU of every track with every detection (n, m), computed once; ``sizes``
    (n, 2), the width and height each track's object had lately (see ByteTracker.sizes)."""

    __slots__ = ("boxes", "covs", "det_boxes", "det_cls", "iou", "means", "occluder", "sizes", "track_cls", "tracks")

    def __init__(self, tracks: List[Track], means: np.ndarray, covs: np.ndarray, sizes: np.ndarray,
                 occluder: np.ndarray, dets: np.ndarray) -> None:
        self.tracks = tracks
        self.occluder = occluder  # (n,) the row of the track each one is hidden behind, -1 if none
        self.means, self.covs, self.sizes = means, covs, sizes
        self.boxes = xywh_to_xyxy(means) if len(means) else np.zeros((0, 4))
        self.track_cls = np.array([t.class_id for t in tracks], np.int64)
        self.det_boxes = dets[:, :4].astype(np.float64)
        self.det_cls = dets[:, 5].astype(np.int64)
        self.iou = iou_matrix(self.boxes, self.det_boxes)

    def associate(
        self, candidates: np.ndarray, rows: np.ndarray, thresh: float, class_aware: bool
    ) -> Tuple[List[Tuple[int, int]], np.ndarray, np.ndarray]:
        """Optimal IoU assignment of the tracks ``candidates`` (indices) to detection ``rows``:
        (pairs (track index, row), tracks left, rows left), both in their given order. A pair
        needs ``1 - IoU <= thresh``; with ``class_aware``, a track and a detection of another
        class pair only at IoU >= CLASS_CHANGE_THRESH and at a cost CLASS_PENALTY higher (so
        two objects of different classes crossing keep their tracks, and a track still goes to
        the detection that clearly is its object when the detector calls it another class)."""
        if not len(candidates) or not len(rows):
            return [], candidates, rows
        iou = self.iou[np.ix_(candidates, rows)]
        if class_aware:
            differ = self.track_cls[candidates][:, None] != self.det_cls[rows][None, :]
            allowed = np.where(differ, iou >= CLASS_CHANGE_THRESH, iou >= 1.0 - thresh)
            cost = np.where(allowed, 1.0 - iou + CLASS_PENALTY * differ, 3.0)
        else:
            allowed = iou >= 1.0 - thresh
            cost = np.where(allowed, 1.0 - iou, 3.0)
        ti, di = linear_sum_assignment(cost)
        ok = allowed[ti, di]
        used_t = np.zeros(len(candidates), bool)
        used_t[ti[ok]] = True
        used_d = np.zeros(len(rows), bool)
        used_d[di[ok]] = True
        pairs = list(zip(candidates[ti[ok]].tolist(), rows[di[ok]].tolist()))
        return pairs, candidates[~used_t], rows[~used_d]

    def distinct(self, rows: np.ndarray, taken: List[int]) -> np.ndarray:
        """The detection ``rows`` that do not duplicate one of the rows ``taken`` (see
        :func:`_duplicates`)."""
        if not len(rows) or not taken:
            return rows
        return rows[~_duplicates(self.det_boxes[rows], self.det_boxes[taken])]


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
        # Width and height of each track's whole object as seen lately: the larger of what is
        # seen now and SIZE_MEMORY times what was (an object going behind another shrinks to its
        # visible part in the detections; this remembers how big it is)
        self.sizes = np.zeros((0, 2))
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
        hidden_frames: Optional[float] = None,
    ) -> Tuple[List[Optional[int]], List[Event]]:
        """Track the (n, 6) ``x1 y1 x2 y2 conf cls`` detections of one frame at time ``clock``
        (frame periods); ``timestamp`` is its capture time, ``buffer_frames`` how many periods a
        lost track survives, ``frame_size`` the frame's (width, height) when known (a lost
        track predicted mostly outside it is not looked for, step 2b). Returns the track id of
        each detection row (None: no confirmed track) and the lifecycle events: ``("new",
        track, {})``, ``("update", track, {"changed": ["label"]})``, ``("end", track,
        {"reason": "lost"})``."""
        p = self.params
        if hidden_frames is None:
            hidden_frames = 10.0 * buffer_frames
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
        occluder = self._follow_occluders()
        means, covs = self.means, self.covs
        sizes = self.sizes
        now = _Now(tracks, means, covs, sizes, occluder, dets)

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

        # 2. high detections <-> confirmed tracks (lost ones too), other classes only if clearly theirs
        pairs, left_tracks, left_high = now.associate(confirmed, high, p.match_thresh, p.class_aware)
        matched += pairs
        # 2b. lost tracks <-> the high detections left, by distance from the prediction; 2c. tracks
        # hidden behind another <-> those left around it. Neither takes a detection that duplicates
        # one matched on this frame (the same object seen twice).
        if len(left_high) and len(left_tracks):
            near = now.distinct(left_high, [d for _, d in matched])
            pairs, left_tracks = self._recover(now, left_tracks, near, p.class_aware, frame_size)
            if pairs:
                matched += pairs
                near = now.distinct(_without(near, [d for _, d in pairs]), [d for _, d in pairs])
            more, left_tracks = self._emerge(now, left_tracks, near, p.class_aware)
            matched += more
            pairs += more
            if pairs:
                left_high = _without(left_high, [d for _, d in pairs])
        # 3. low detections <-> confirmed tracks seen on the previous frame
        recent = left_tracks[[tracks[k].lost_for == 0.0 for k in left_tracks.tolist()]]
        pairs, _, _ = now.associate(recent, low, LOW_MATCH_THRESH, p.class_aware)
        matched += pairs
        unmatched = _without(left_tracks, [k for k, _ in pairs])  # the confirmed tracks left
        # 4. tentative tracks <-> the high detections left, unless that detection is an object
        # tracked on this frame seen twice; 4b. held back near a lost track, or taken by it
        pending, _, left_high = now.associate(tentative, left_high, TENTATIVE_MATCH_THRESH, False)
        if pending and matched:
            twice = _duplicates(now.det_boxes[[d for _, d in pending]], now.det_boxes[[d for _, d in matched]])
            pending = [pair for pair, dup in zip(pending, twice.tolist()) if not dup]
        held: set = set()
        if pending and len(unmatched):
            held, adopted = self._held(now, pending, unmatched, frame_size)
            for k, lost in adopted.items():
                # The lost track goes on from the tentative one's state, which has followed the
                # object lately (its own prediction is older), and counts its class votes.
                means[lost], covs[lost] = means[k], covs[k]
                sizes[lost] = np.maximum(sizes[lost], sizes[k])
                for c, v in tracks[k].votes.items():
                    tracks[lost].votes[c] = tracks[lost].votes.get(c, 0.0) + v
            pending = [(adopted.get(k, k), d) for k, d in pending]
        matched += pending

        if matched:
            ti = np.array([k for k, _ in matched])
            rows = np.array([d for _, d in matched])
            measured = xyxy_to_xywh(dets[rows, :4])
            means[ti], covs[ti] = self.kalman.update(means[ti], covs[ti], measured)
            sizes[ti] = np.maximum(SIZE_MEMORY * sizes[ti], measured[:, 2:4])
            confs, cls_list = scores.tolist(), classes.tolist()  # Python numbers: cheaper one by one
            for (k, d), z in zip(matched, measured.tolist()):
                t = tracks[k]
                self._seen(t, now.det_boxes[d], confs[d], cls_list[d], timestamp, events)
                t.trail.append((clock, z[0], z[1], z[2], z[3]))
                if t.track_id is None and t.hits >= p.min_hits + (HOLD_HITS if k in held else 0):
                    self._confirm(t, events)
                if t.track_id is not None:
                    ids[d] = t.track_id

        seen = np.zeros(n, bool)
        seen[[k for k, _ in matched]] = True
        survivors: List[Track] = []
        kept: List[int] = []  # their rows
        lost_now: List[int] = []  # confirmed tracks lost on this very frame
        may_hide: List[int] = []  # confirmed tracks lost lately, not hidden (step 7)
        for k, t in enumerate(tracks):
            if seen[k]:
                survivors.append(t)
                kept.append(k)
                continue
            if t.track_id is None:
                continue  # a tentative track that missed a frame is dropped (never published)
            if t.behind is not None:
                t.hidden_for += dt
                if t.hidden_for > hidden_frames:
                    events.append(("end", t, {"reason": "lost"}))
                    continue
            else:
                t.lost_for += dt
                if t.lost_for > buffer_frames:
                    events.append(("end", t, {"reason": "lost"}))
                    continue
                if t.lost_for <= dt:
                    lost_now.append(k)
                if t.lost_for <= HIDE_WINDOW:
                    may_hide.append(k)
            survivors.append(t)
            kept.append(k)
        means, covs, sizes = means[kept], covs[kept], sizes[kept]
        # 5. new tentative tracks from the high detections nobody took (and nothing tracked covers)
        fresh = [d for d in left_high.tolist() if scores[d] >= p.new_track_thresh]
        if fresh and (matched or lost_now):
            # Tracks lost on this very frame still have a trustworthy predicted box; older ones
            # have drifted too far to vouch for what is there.
            known = np.concatenate([now.det_boxes[[d for _, d in matched]], now.boxes[lost_now]])
            same = _duplicates(now.det_boxes[fresh], known)
            fresh = [d for d, dup in zip(fresh, same.tolist()) if not dup]
        if len(fresh) > 1:
            # Two of them may be one new object (seen as two classes, or a part of it): the more
            # confident one starts a track, the other is its duplicate.
            kept_fresh: List[int] = []
            for d in sorted(fresh, key=lambda d: -scores[d]):
                if not kept_fresh or not _duplicates(now.det_boxes[[d]], now.det_boxes[kept_fresh])[0]:
                    kept_fresh.append(d)
            fresh = sorted(kept_fresh)
        if fresh:
            rows = np.array(fresh)
            new_means, new_covs = self.kalman.initiate(xyxy_to_xywh(dets[rows, :4]))
            means, covs = np.concatenate([means, new_means]), np.concatenate([covs, new_covs])
            sizes = np.concatenate([sizes, new_means[:, 2:4]])
            for d in fresh:
                t = Track(dets[d, :4].astype(np.float64), float(scores[d]), int(classes[d]), timestamp)
                if p.min_hits <= 1:
                    self._confirm(t, events)
                    ids[d] = t.track_id
                survivors.append(t)
        # 7. a track lost under a tracked object seen on this frame is hidden behind it
        if may_hide:
            self._hide(now, matched, may_hide)
        self.tracks, self.means, self.covs, self.sizes = survivors, means, covs, sizes
        return ids, events

    def end_all(self) -> List[Track]:
        """Forget every track; the confirmed ones, which had been announced, are returned."""
        done = self.confirmed()
        self.tracks = []
        self.means, self.covs, self.sizes = self.means[:0], self.covs[:0], self.sizes[:0]
        return done

    def _recover(
        self, now: _Now, candidates: np.ndarray, near: np.ndarray, same_class: bool,
        frame_size: Optional[Tuple[int, int]],
    ) -> Tuple[List[Tuple[int, int]], np.ndarray]:
        """Step 2b: the lost ones among the tracks ``candidates`` (indices) <-> detection rows
        ``near`` by the squared Mahalanobis distance of the box from the track's prediction
        (optimal assignment, gated at RECOVER_GATE): (pairs, tracks left). IoU with
        the prediction (step 2) misses an object that comes out of hiding a little off its
        predicted path, the more so the smaller it is; the filter's own uncertainty, which grows
        while the track is lost, says how far off is still the same object. Left out: tracks
        predicted mostly outside the frame (they left it; an object coming in there is another
        one), and tracks hidden behind another (step 2c)."""
        lost = candidates[np.array([now.tracks[k].lost_for > 0 for k in candidates.tolist()], bool)
                          & (now.occluder[candidates] < 0)]
        if len(lost):
            lost = lost[_in_frame(now.boxes[lost], frame_size)]
        if not len(lost) or not len(near):
            return [], candidates
        cost = self.kalman.gating_distance(now.means[lost], now.covs[lost], xyxy_to_xywh(now.det_boxes[near]))
        if same_class:
            cost[now.track_cls[lost][:, None] != now.det_cls[near][None, :]] = np.inf
        cost = np.where(cost <= RECOVER_GATE, cost, 1e6)  # finite: the solver needs a full assignment
        ti, di = linear_sum_assignment(cost)
        ok = cost[ti, di] <= RECOVER_GATE
        pairs = list(zip(lost[ti[ok]].tolist(), near[di[ok]].tolist()))
        return pairs, _without(candidates, lost[ti[ok]].tolist())

    def _follow_occluders(self) -> np.ndarray:
        """Step 1 for hidden tracks: each keeps its own motion but cannot be anywhere but behind
        its occluder while unseen, so its predicted centre is held inside the occluder's
        predicted box, and its uncertainty is that of a new track (it does not grow while it is
        hidden). A track hidden on the last frame first gets the motion it had while it was seen
        whole (:func:`_full_view_motion`), from where it was last seen so. A track whose occluder
        ended is a plain lost track again. Returns the row of each track's occluder (-1: none)."""
        tracks = self.tracks
        occluder = np.full(len(tracks), -1, np.int64)
        for k, t in enumerate(tracks):
            if t.behind is not None:
                try:
                    occluder[k] = tracks.index(t.behind)  # by identity: tracks have no __eq__
                except ValueError:
                    t.behind = None
        ks = np.flatnonzero(occluder >= 0)
        for k in ks.tolist():
            t = tracks[k]
            if t.hidden_for == 0.0:  # hidden on the last frame
                motion = _full_view_motion(t.trail)
                if motion is not None and self.clock is not None:
                    v, c, when = motion
                    self.means[k, 4:6] = v
                    self.means[k, 0:2] = c + v * (self.clock - when)
        if len(ks):
            occ = self.means[occluder[ks], :4]
            half = occ[:, 2:4] / 2
            centre = self.means[ks, 0:2]
            self.means[ks, 0:2] = np.minimum(np.maximum(centre, occ[:, 0:2] - half), occ[:, 0:2] + half)
            self.covs[ks] = self.kalman.initial_covs(self.means[ks])
        return occluder

    @staticmethod
    def _around(now: _Now, hidden: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Which detection ``rows`` could be the hidden tracks ``hidden`` coming out from behind
        their occluders ((h, m) bool: the centre within the occluder's predicted box grown by the
        track's size, width and height within EMERGE_SIZE of its), and a cost for each pair: the
        distance from the track's held prediction in units of the occluder's size plus the
        track's, and the size difference."""
        occ = now.boxes[now.occluder[hidden]]  # (h, 4)
        size = np.maximum(now.sizes[hidden], 1.0)[:, None, :]  # (h, 1, 2)
        z = xyxy_to_xywh(now.det_boxes[rows])[None, :, :]  # (1, m, 4)
        inside = ((z[..., 0:2] >= occ[:, None, 0:2] - size) & (z[..., 0:2] <= occ[:, None, 2:4] + size)).all(-1)
        ratio = np.maximum(z[..., 2:4], 1.0) / size
        ok = inside & ((ratio >= 1.0 / EMERGE_SIZE) & (ratio <= EMERGE_SIZE)).all(-1)
        d = (z[..., 0:2] - now.means[hidden][:, None, 0:2]) / ((occ[:, None, 2:4] - occ[:, None, 0:2]) + size)
        return ok, (d * d).sum(-1) + (np.log(ratio) ** 2).sum(-1)

    def _emerge(
        self, now: _Now, candidates: np.ndarray, near: np.ndarray, same_class: bool,
    ) -> Tuple[List[Tuple[int, int]], np.ndarray]:
        """Step 2c: the hidden ones among the tracks ``candidates`` <-> detection rows ``near`` that
        come out around their occluder: the detection's centre within the occluder's predicted
        box grown by the hidden track's size, its width and height within EMERGE_SIZE of the
        track's (and its class, with ``same_class``); optimal assignment by the distance from
        the track's held prediction, in units of the occluder's size plus the track's."""
        hidden = candidates[now.occluder[candidates] >= 0]
        if not len(hidden) or not len(near):
            return [], candidates
        ok, cost = self._around(now, hidden, near)
        if same_class:
            ok &= now.track_cls[hidden][:, None] == now.det_cls[near][None, :]
        if not ok.any():
            return [], candidates
        cost = np.where(ok, cost, 1e6)
        ti, di = linear_sum_assignment(cost)
        good = cost[ti, di] < 1e6
        pairs = list(zip(hidden[ti[good]].tolist(), near[di[good]].tolist()))
        return pairs, _without(candidates, hidden[ti[good]].tolist())

    def _held(
        self, now: _Now, pending: List[Tuple[int, int]], unmatched: np.ndarray, frame_size: Optional[Tuple[int, int]],
    ) -> Tuple[set, Dict[int, int]]:
        """Step 4b: the tentative tracks matched in step 4 (``pending``) whose detection one of
        the confirmed tracks ``unmatched`` could be, whatever the class: one lost on an earlier
        frame (the detection within its recovery gate, or its predicted box lying for
        DUPLICATE_IOA or more on the detection: it was following a part of that object), or one
        hidden (the detection around its occluder). Such a tentative track needs HOLD_HITS more
        sightings to be confirmed. When it has them, the nearest of those tracks whose
        velocity agrees with it takes its detection instead (ADOPT_SPEED_FRACTION,
        ADOPT_SIZE_FRACTION, ADOPT_MOVING): after missing an object for a while the detector
        often sees it anew as another class or as a bigger box, and a new id there would be an
        identity switch; a new object that is really there moves its own way. Lost tracks
        predicted mostly outside the frame are left out (they left it). Returns (the tentative
        tracks held, {tentative track: the confirmed track that takes its detection})."""
        rows = np.array([d for _, d in pending], np.int64)
        cost = np.full((len(unmatched), len(pending)), np.inf)  # inf: cannot be its object
        hidden = now.occluder[unmatched] >= 0
        # lost, and not a track that left the frame: what comes in there is another object
        lost = np.array([now.tracks[k].lost_for > 0 for k in unmatched.tolist()], bool) & ~hidden
        lost &= _in_frame(now.boxes[unmatched], frame_size)
        if lost.any():
            ks = unmatched[lost]
            gate = self.kalman.gating_distance(now.means[ks], now.covs[ks], xyxy_to_xywh(now.det_boxes[rows]))
            part = ioa_matrix(now.boxes[ks], now.det_boxes[rows])
            cost[lost] = np.minimum(np.where(gate <= RECOVER_GATE, gate / RECOVER_GATE, np.inf),
                                    np.where(part >= DUPLICATE_IOA, 1.0 - part, np.inf))
        if hidden.any():
            ok, around = self._around(now, unmatched[hidden], rows)
            cost[hidden] = np.where(ok, around, np.inf)
        near = np.isfinite(cost).any(axis=0)
        held = {k for (k, _), n in zip(pending, near.tolist()) if n}
        adopted: Dict[int, int] = {}
        ready = self.params.min_hits + HOLD_HITS - 1  # sightings before this one
        velocity = now.means[unmatched, 4:6]
        speed = np.hypot(velocity[:, 0], velocity[:, 1])
        side = now.sizes[unmatched].max(axis=1)
        for j in np.argsort(cost.min(axis=0), kind="stable").tolist():
            k = pending[j][0]
            if not near[j] or now.tracks[k].hits < ready:
                continue
            v = now.means[k, 4:6]
            v_speed = float(np.hypot(v[0], v[1]))
            differ = np.hypot(velocity[:, 0] - v[0], velocity[:, 1] - v[1])
            agree = differ <= np.maximum(ADOPT_SPEED_FRACTION * np.maximum(speed, v_speed), ADOPT_SIZE_FRACTION * side)
            moving = ADOPT_MOVING * side
            agree &= ~((speed >= moving) & (v_speed >= moving) & (velocity @ v <= 0))  # opposite ways
            col = np.where(agree, cost[:, j], np.inf)
            i = int(col.argmin())
            if np.isfinite(col[i]):
                adopted[k] = int(unmatched[i])
                cost[i, :] = np.inf  # one tentative track each
        return held, adopted

    def _hide(self, now: _Now, matched: List[Tuple[int, int]], lost: List[int]) -> None:
        """Step 7: a confirmed track (of ``lost``: lost for at most HIDE_WINDOW periods, not
        hidden) whose predicted box
        lies for HIDDEN_IOA or more on the box of a confirmed track seen on this frame is hidden
        behind it (the one it lies on most), unless their boxes are about the same (IoU >=
        SAME_BOX_IOU: that is one object seen twice, as two classes, not one behind another)."""
        occluders = [(k, d) for k, d in matched if now.tracks[k].track_id is not None]
        if not occluders:
            return
        inter, area_lost, area_occ = _overlap(now.boxes[lost], now.det_boxes[[d for _, d in occluders]])
        ioa = inter / np.maximum(area_lost[:, None], 1e-12)
        iou = inter / np.maximum(area_lost[:, None] + area_occ[None, :] - inter, 1e-12)
        ioa[iou >= SAME_BOX_IOU] = 0.0
        best = ioa.argmax(axis=1)
        for k, j, v in zip(lost, best.tolist(), ioa[np.arange(len(lost)), best].tolist()):
            if v >= HIDDEN_IOA:
                t = now.tracks[k]
                t.behind = now.tracks[occluders[j][0]]
                t.hidden_for = 0.0

    def _seen(self, t: Track, box: np.ndarray, conf: float, cls: int, timestamp: float, events: List[Event]) -> None:
        t.hits += 1
        t.lost_for = 0.0
        t.behind = None
        t.hidden_for = 0.0

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
