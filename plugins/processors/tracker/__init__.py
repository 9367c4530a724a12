"""The ``tracker`` stage: ByteTrack-style multi-object tracking per source, after ``nms``.

Each source's detections go through its own :class:`.bytetrack.ByteTracker` (high- then
low-confidence association, constant-velocity Kalman prediction over the time that really passed,
optimal IoU assignment from scipy, class-aware by default). The stage adds to each frame:

- ``Frame.track_ids``: the track id of each detection row (None while not part of a confirmed
  track), published as ``track_id`` in every detection of ``edgepipe.detections/v2``;
- ``Frame.events``: the lifecycle of each track as event messages (``new`` when it is confirmed,
  ``update`` when its label or its best snapshot changed, ``end`` with a reason), for the
  ``events/<source>`` topic (:func:`edgepipe.messages.event_message`);
- ``Frame.meta["tracks"]``: columns (``track_id``, ``class_id``, ``first_seen``,
  ``best_confidence``, ``snapshot`` by id) describing the tracks seen on the frame, and
  ``Frame.meta["tracker"]["run"]``, which a ``zones`` stage downstream uses for its events.

Ids are per source, 1, 2, 3, ..., never reused while the daemon runs, also when this stage's
worker is restarted: the next id and the open tracks are kept in the runtime directory
(:mod:`.state`); a restarted tracker continues the ids and ends the tracks that were open with
``reason: "restarted"`` on the next frame of their source.

With ``snapshots`` the stage writes each track's best-confidence crop (and the whole frame with
its box) as JPEG files (:mod:`.snapshots`); it then asks for the original picture the way a
drawing sink does (``needs_original``), and names the files in the events.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections import deque
from typing import Any, ClassVar, Deque, Dict, List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgepipe.messages import Frame, event_message
from edgepipe.stage import Processor, Stage, StageConfig, StageContext, StageError

from .._common import check_class_names

__all__ = ["SnapshotConfig", "TrackerConfig", "TrackerStage"]

_SECONDS = re.compile(r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*s\s*$")
STATE_INTERVAL_S = 1.0  # the state file is rewritten this often (changes in between: its journal)
JOURNAL_MAX = 1000  # ...or once its journal has this many lines (a source whose clock stands still)
PERIOD_WINDOW = 30  # frames over which the frame period is estimated (median)


class SnapshotConfig(BaseModel):
    """Where and how the best snapshot of each track is kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: str = Field(..., min_length=1, description="Directory of the JPEG files (created if missing; the tracker owns it).")
    max_bytes: int = Field(
        100 * 2**20, ge=2**20, description="Most bytes of JPEG files kept in dir; the oldest go first."
    )
    full_frame: bool = Field(True, description="Also keep the whole frame with the box drawn, not only the crop.")
    jpeg_quality: int = Field(90, ge=10, le=100, description="JPEG quality.")
    margin: float = Field(0.15, ge=0, le=2, description="Crop margin around the box, as a fraction of its size.")
    min_gain: float = Field(
        0.05, ge=0, le=1, description="A new snapshot replaces the track's one when its confidence is this much higher."
    )
    min_interval: float = Field(
        1.0, ge=0, le=3600, description="Seconds between two snapshots of the same track (bounds the JPEG work)."
    )


class TrackerConfig(StageConfig):
    track_thresh: float = Field(
        0.5, gt=0, le=1,
        description="Detections at or above this confidence are 'high': they continue tracks first and can start new ones.",
    )
    low_thresh: float = Field(
        0.1, ge=0, le=1,
        description="Detections from this up to track_thresh are 'low': they only continue tracks seen on the previous frame (ByteTrack's second association).",
    )
    new_track_thresh: Optional[float] = Field(
        None, gt=0, le=1,
        description="Least confidence of a detection that starts a track (null: track_thresh + 0.1, capped at 1).",
    )
    match_thresh: float = Field(
        0.8, gt=0, le=1,
        description="Largest 1 - IoU between a track's predicted box and a high detection for them to match.",
    )
    track_buffer: Union[int, str] = Field(
        30,
        description="How long a lost track (not seen) is kept for re-association before it ends: "
        "frames (an integer, counted as frame periods, so skipped frames count) or seconds ('2.5s').",
    )
    hidden_buffer: Optional[Union[int, str]] = Field(
        None,
        description="How long a lost track hidden behind another tracked object (its box lay on that object's "
        "when it was lost) is kept: it follows that object and is looked for where it comes out. Frames or "
        "seconds like track_buffer (null: 10 times track_buffer).",
    )
    min_hits: int = Field(
        2, ge=1, le=100,
        description="Frames in a row a new track must be seen on before it is confirmed (gets an id and a 'new' event).",
    )
    class_aware: bool = Field(
        True, description="Match detections only to tracks of the same class (false: any class; the label is then the class seen most)."
    )
    classes: Optional[List[str]] = Field(
        None, min_length=1, description="Track only these class names (null: all); checked against the detector's names."
    )
    clock: str = Field(
        "frame_id",
        pattern="^(frame_id|timestamp)$",
        description="What measures the time between frames for the motion model: 'frame_id' (gaps in "
        "the ids, right for sources whose frames are evenly spaced) or 'timestamp' (capture times, "
        "for cameras that drop frames before they are numbered).",
    )
    snapshots: Optional[SnapshotConfig] = Field(
        None, description="Keep each track's best-confidence picture as JPEG files (null: no snapshots)."
    )

    @field_validator("track_buffer", "hidden_buffer")
    @classmethod
    def _buffer(cls, value: Optional[Union[int, str]]) -> Optional[Union[int, str]]:
        if value is None:
            return value
        if isinstance(value, bool):
            raise ValueError("expected frames (an integer) or seconds ('2.5s')")
        if isinstance(value, int):
            if not 0 <= value <= 100000:
                raise ValueError("frames must be 0..100000")
            return value
        m = _SECONDS.match(value)
        if not m or not 0 <= float(m.group(1)) <= 86400:
            raise ValueError("expected frames (an integer) or seconds like '2.5s' (0 to 86400)")
        return value

    @model_validator(mode="after")
    def _thresholds(self) -> TrackerConfig:
        if self.low_thresh > self.track_thresh:
            raise ValueError(f"low_thresh: must not exceed track_thresh ({self.low_thresh} > {self.track_thresh})")
        if self.new_track_thresh is not None and self.new_track_thresh < self.track_thresh:
            raise ValueError(
                f"new_track_thresh: must be at least track_thresh ({self.new_track_thresh} < {self.track_thresh})"
            )
        return self

    def buffer(self, hidden: bool = False) -> Tuple[Optional[float], Optional[float]]:
        """(frames, seconds) of ``track_buffer`` (of ``hidden_buffer`` with ``hidden``, 10 times
        track_buffer when that is null): exactly one of them set."""
        value = self.hidden_buffer if hidden else self.track_buffer
        if value is None:
            frames, seconds = self.buffer()
            return (None if frames is None else 10.0 * frames), (None if seconds is None else 10.0 * seconds)
        if isinstance(value, int):
            return float(value), None
        m = _SECONDS.match(value)
        assert m is not None
        return None, float(m.group(1))


class _Source:
    """Per-source state: the tracker, its clock and frame period, and its snapshots."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.last: Optional[Tuple[int, float]] = None  # (frame id, timestamp) of the last frame
        self.steps: Deque[float] = deque(maxlen=PERIOD_WINDOW)  # seconds per frame period
        self.clock = 0.0  # frame periods since the first frame
        self.pending_ends: List[Dict[str, Any]] = []  # open tracks of a dead incarnation
        self.snapshots: Dict[int, Dict[str, Any]] = {}  # track id -> the snapshot named in events
        self.snapshot_at: Dict[int, float] = {}  # track id -> monotonic time of its last write
        self.names: List[str] = []  # the detector's class names, from the latest frame
        self.saved_ts: Optional[float] = None  # timestamp of its last frame when the state was written

    def period(self) -> Optional[float]:
        return statistics.median(self.steps) if self.steps else None


class TrackerStage(Processor):
    """ByteTrack-style multi-object tracking per source: track ids on detections, lifecycle events."""

    Config = TrackerConfig
    config: TrackerConfig
    accepts: ClassVar[Tuple[str, ...]] = ("detections",)
    produces: ClassVar[Optional[str]] = "detections"
    # Stages downstream that follow tracks (zones) look for this instead of a class name.
    provides_track_ids: ClassVar[bool] = True

    def __init__(self, config: TrackerConfig, context: StageContext) -> None:
        super().__init__(config, context)
        # Snapshots are cut from the original picture, which the letterbox stage then keeps.
        self.needs_original = config.snapshots is not None
        m = self.metrics
        self.m_tracks = m.gauge("edgepipe_tracker_tracks", "Confirmed tracks open now (seen or lost), per source.", labels=("source",))
        self.m_started = m.counter("edgepipe_tracker_tracks_started_total", "Tracks confirmed (ids given), per source.", labels=("source",))
        self.m_ended = m.counter("edgepipe_tracker_tracks_ended_total", "Tracks ended, per source and reason (lost, restarted).", labels=("source", "reason"))
        self.m_snapshots = m.counter("edgepipe_tracker_snapshots_total", "Snapshot pictures written (a crop and its full frame count once).")
        self.m_snapshot_errors = m.counter("edgepipe_tracker_snapshot_errors_total", "Snapshots that could not be written.")

    def check_upstream(self, upstream: Dict[str, Stage]) -> None:
        check_class_names(self.config.classes, upstream, "classes")

    def check(self) -> None:
        snap = self.config.snapshots
        if snap is None:
            return
        path = os.path.abspath(os.path.expanduser(snap.dir))
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise StageError(f"tracker snapshots.dir {snap.dir!r}: {parent!r} is not a writable directory")

    def start(self) -> None:
        from .bytetrack import Params
        from .snapshots import SnapshotWriter
        from .state import SUFFIX, TrackerState, daemon_run

        cfg = self.config
        self.run = daemon_run()
        path = None
        if self.context.runtime_dir:
            path = os.path.join(self.context.runtime_dir, self.name + SUFFIX)
        self.state = TrackerState(path, self.run)
        try:
            next_ids, open_tracks = self.state.load()
        except ValueError as exc:
            self.log.warning("Starting with fresh track ids: %s", exc)
            next_ids, open_tracks = {}, {}
        self.sources: Dict[str, _Source] = {}
        self.params = Params(
            track_thresh=cfg.track_thresh, low_thresh=cfg.low_thresh,
            new_track_thresh=cfg.new_track_thresh if cfg.new_track_thresh is not None else min(1.0, cfg.track_thresh + 0.1),
            match_thresh=cfg.match_thresh, min_hits=cfg.min_hits, class_aware=cfg.class_aware,
        )
        self._class_ids: Optional[List[int]] = None
        self._names_checked = False
        for source, tracks in open_tracks.items():
            self._source(source).pending_ends = list(tracks)
        if next_ids:
            self.log.info(
                "Restarted: track ids continue at %s; %d open track(s) end as 'restarted'",
                ", ".join(f"{s} {n}" for s, n in sorted(next_ids.items())),
                sum(len(t) for t in open_tracks.values()),
            )
        # Changes since the state file was last written, journaled before their frame leaves
        self._changes: List[Dict[str, Any]] = []
        self.writer: Optional[SnapshotWriter] = None
        if cfg.snapshots is not None:
            s = cfg.snapshots
            self.writer = SnapshotWriter(s.dir, s.max_bytes, s.jpeg_quality, s.full_frame, s.margin)
            try:
                self.writer.open()
            except OSError as exc:
                self.report_unhealthy(f"snapshot dir {s.dir!r} is not usable: {exc.strerror or exc}")
        self._save(force=True)

    # -- per frame ---------------------------------------------------------------------------

    def _source(self, name: str) -> _Source:
        src = self.sources.get(name)
        if src is None:
            from .bytetrack import ByteTracker

            src = self.sources[name] = _Source(
                ByteTracker(self.params, lambda name=name: self.state.allocate(name))  # type: ignore[misc]
            )
        return src

    def _check_names(self, frame: Frame) -> None:
        """Class names of ``classes`` against the frame's (when validation could not know them)."""
        self._names_checked = True
        wanted = self.config.classes
        if wanted is None:
            return
        names = frame.names or []
        unknown = [n for n in wanted if n not in names]
        if unknown:
            self.report_unhealthy(
                f"classes: unknown class {unknown[0]!r}; the detector's classes are {', '.join(names) or 'unnamed'}"
            )
        self.params.classes = {names.index(n) for n in wanted if n in names}

    def process(self, frames: List[Frame]) -> List[Frame]:
        for frame in frames:
            if frame.detections is None:
                raise ValueError(f"frame {frame.source}/{frame.frame_id} carries no detections (is nms upstream?)")
            if not self._names_checked:
                self._check_names(frame)
            self._track(frame)
        self._save(due=any(self._stale(self.sources[f.source], f.timestamp) for f in frames))
        return frames

    @staticmethod
    def _stale(src: _Source, timestamp: float) -> bool:
        """True when the state file's view of this source is STATE_INTERVAL_S behind in the
        source's own time (or its clock jumped back): at 10 fps a rewrite every 10 frames,
        however fast the frames come (a file read faster than real time)."""
        return src.saved_ts is None or abs(timestamp - src.saved_ts) >= STATE_INTERVAL_S

    def _advance(self, src: _Source, frame: Frame) -> float:
        """The frame's time on the motion model's clock, in frame periods (see ``clock``)."""
        if src.last is not None:
            last_id, last_ts = src.last
            gap = frame.frame_id - last_id
            if gap > 0 and frame.timestamp > last_ts:
                src.steps.append((frame.timestamp - last_ts) / gap)
            if self.config.clock == "timestamp":
                period = src.period()
                src.clock += (frame.timestamp - last_ts) / period if period else max(gap, 0)
            else:
                src.clock += max(gap, 0)
        src.last = (frame.frame_id, frame.timestamp)
        return src.clock

    def _buffer_frames(self, src: _Source, hidden: bool = False) -> float:
        frames, seconds = self.config.buffer(hidden)
        if frames is not None:
            return frames
        assert seconds is not None
        period = src.period()
        return seconds / period if period else seconds * 10.0  # 10 fps until the period is known

    def _track(self, frame: Frame) -> None:
        src = self._source(frame.source)
        clock = self._advance(src, frame)
        ids, lifecycle = src.tracker.step(frame.detections, clock, frame.timestamp, self._buffer_frames(src),
                                         (frame.width, frame.height) if frame.width and frame.height else None,
                                         self._buffer_frames(src, hidden=True))
        frame.track_ids = ids
        names = src.names = frame.names or []
        events = list(frame.events)
        for summary in src.pending_ends:  # tracks a dead incarnation of this stage left open
            events.append(event_message("end", frame, summary, self.run, reason="restarted"))
            self.m_ended.labels(frame.source, "restarted").inc()
        if src.pending_ends:
            self._changes.append({"end": {frame.source: [s.get("track_id") for s in src.pending_ends]}})
        src.pending_ends = []
        new_ids = {t.track_id for kind, t, _ in lifecycle if kind == "new"}
        if self.writer is not None and frame.detections is not None and len(frame.detections):
            self._snapshots(src, frame, names, new_ids, events)
        for kind, track, fields in lifecycle:
            summary = self._summary(src, track, names)
            if kind == "new":
                self.m_started.labels(frame.source).inc()
                self._changes.append({"new": {frame.source: summary}})
            elif kind == "end":
                self.m_ended.labels(frame.source, "lost").inc()
                self._changes.append({"end": {frame.source: [track.track_id]}})
            events.append(event_message(kind, frame, summary, self.run, **fields))
            if kind == "end":
                src.snapshots.pop(track.track_id, None)
                src.snapshot_at.pop(track.track_id, None)
        frame.events = events
        frame.meta["tracker"] = {"run": self.run, "stage": self.name}
        # What a zones stage needs to describe the tracks seen here, as columns (cheap to build
        # and to send for 50 tracks): their state beyond the detection row carrying their id.
        track_id: List[int] = []
        class_id: List[int] = []
        first_seen: List[float] = []
        best_confidence: List[float] = []
        open_tracks = 0
        for t in src.tracker.tracks:  # one pass: this runs for every track of every frame
            if t.track_id is None:
                continue
            open_tracks += 1
            if t.confidence is not None:
                track_id.append(t.track_id)
                class_id.append(t.class_id)
                first_seen.append(t.first_seen)
                best_confidence.append(t.best_confidence)
        frame.meta["tracks"] = {
            "track_id": track_id,
            "class_id": class_id,
            "first_seen": first_seen,
            "best_confidence": best_confidence,
            "snapshot": {str(i): src.snapshots[i] for i in track_id if i in src.snapshots},
        }
        self.m_tracks.labels(frame.source).set(open_tracks)

    def _summary(self, src: _Source, track: Any, names: List[str]) -> Dict[str, Any]:
        c = int(track.class_id)
        snap = src.snapshots.get(track.track_id)
        if snap is not None and self.writer is not None and not self.writer.exists(snap["crop"]):
            snap = None  # removed by the size cap meanwhile
        return {
            "track_id": track.track_id,
            "label": names[c] if 0 <= c < len(names) else str(c),
            "class_id": c,
            "first_seen": track.first_seen,
            "last_seen": track.last_seen,
            "best_confidence": round(float(track.best_confidence), 5),
            "confidence": None if track.confidence is None else round(float(track.confidence), 5),
            "bbox": [round(float(v), 2) for v in track.box],
            "snapshot": snap,
        }

    def _snapshots(self, src: _Source, frame: Frame, names: List[str], new_ids: set,
                   events: List[Dict[str, Any]]) -> None:
        """Write the snapshot of each confirmed track seen on this frame whose confidence is
        clearly its best so far; an ``update`` event names a replaced one."""
        assert self.writer is not None and self.config.snapshots is not None
        cfg = self.config.snapshots
        picture = frame.original if frame.original is not None else (frame.image if frame.ratio is None else None)
        if picture is None:
            self.report_unhealthy(
                "snapshots need the original picture: put a letterbox stage (keep_original) before the detector"
            )
            return
        now = time.monotonic()
        for t in src.tracker.confirmed():
            if t.confidence is None:
                continue
            old = src.snapshots.get(t.track_id)
            if old is not None and (t.confidence < old["confidence"] + cfg.min_gain
                                    or now - src.snapshot_at.get(t.track_id, 0.0) < cfg.min_interval):
                continue
            c = int(t.class_id)
            label = names[c] if 0 <= c < len(names) else str(c)
            try:
                files = self.writer.write(f"{frame.source}-{self.run}-{t.track_id}", picture, t.box,
                                          f"{label} #{t.track_id} {t.confidence:.2f}", c)
            except (OSError, ValueError) as exc:
                self.m_snapshot_errors.inc()
                self.report_unhealthy(f"cannot write snapshots to {cfg.dir!r}: {getattr(exc, 'strerror', None) or exc}")
                return
            self.report_healthy()
            self.m_snapshots.inc()
            src.snapshots[t.track_id] = dict(files, confidence=round(float(t.confidence), 5), frame_id=frame.frame_id)
            src.snapshot_at[t.track_id] = now
            if old is not None and t.track_id not in new_ids:
                events.append(event_message("update", frame, self._summary(src, t, names), self.run,
                                            changed=["snapshot"]))

    def _save(self, force: bool = False, due: bool = False) -> None:
        """Persist next ids and open tracks before the frames leave: the whole state when
        ``due`` (STATE_INTERVAL_S of a source's time passed) or the journal is full, the changes
        since (new and ended tracks, a new one's id saying the next) in the journal (see
        :mod:`.state`)."""
        if self.state.path is None:
            self._changes = []
            return
        try:
            if force or due or self.state.journaled + len(self._changes) > JOURNAL_MAX:
                open_tracks = {}
                for name, src in self.sources.items():
                    rows = [self._summary(src, t, src.names) for t in src.tracker.confirmed()]
                    open_tracks[name] = rows + src.pending_ends
                    src.saved_ts = src.last[1] if src.last is not None else None
                self.state.save(open_tracks)
            elif self._changes:
                self.state.append(self._changes)
        except OSError as exc:
            # Without the file a restart could reuse ids: refuse to publish any.
            raise StageError(f"tracker state {self.state.path!r} cannot be written: {exc.strerror or exc}") from None
        self._changes = []

    def stop(self) -> None:
        state = getattr(self, "state", None)  # None when start() never ran
        if state is not None:
            state.close()
