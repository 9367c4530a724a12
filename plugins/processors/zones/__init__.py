"""The ``zones`` stage: named polygons and lines per source; events when tracked objects enter,
leave, cross or loiter; live counts as Prometheus series.

It runs after a ``tracker`` (validation refuses it without one) and follows each confirmed track
by one point of its box (``anchor``: the middle of the bottom edge, where an object stands, or
the centre). Per frame, for every track seen on it:

- **zones**: the point inside a zone's polygon for ``inertia`` sightings in a row makes an
  ``enter`` event; outside as long makes a ``leave`` event with ``duration``, the seconds it was
  inside. A track that ends while inside leaves with it (``duration`` up to its last sighting).
  Staying inside longer than the zone's ``loiter`` seconds makes one ``loiter`` event.
- **lines**: the point moving from one side of a line to the other, through the line itself
  (not around one of its ends) and farther than ``line_margin`` pixels from it on both sides, makes
  a ``cross`` event naming the direction: the line's first ``directions`` name when it crosses
  from the left to the right of the line drawn from its first point to its second (as seen on the
  picture), the second name the other way.

Events are :func:`edgepipe.messages.event_message` documents carrying the track's state (from
the tracker's ``meta["tracks"]``) and the zones it is in. A change of a track's zones is also
announced in its lifecycle: the tracker's ``new`` event of the same frame gets the zones, or an
``update`` with ``changed: ["zones"]`` is added (merged into the tracker's own ``update`` when
there is one). The tracker's ``end`` events get the zones the track was in when it was last seen.

Counts, per source: ``edgepipe_zone_objects`` (tracks in each zone now),
``edgepipe_zone_entries_total``, ``edgepipe_zone_crossings_total`` (per line and direction, since
the daemon started) and ``edgepipe_zone_loiter_total``.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Dict, List, Optional, Set, Tuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import Literal

from edgepipe.config import NAME_PATTERN
from edgepipe.messages import Frame, event_message
from edgepipe.stage import Processor, Stage, StageConfig, StageContext

from .._common import check_class_names
from .geometry import inside, passes_through, polygon_problem, side

__all__ = ["LineConfig", "ZoneConfig", "ZonesConfig", "ZonesStage"]

Units = Optional[Literal["fraction", "pixels"]]


def _pairs(points: List[List[float]]) -> None:
    for i, p in enumerate(points):
        if len(p) != 2:
            raise ValueError(f"point {i} must be [x, y], got {p!r}")


def _check_points(points: List[List[float]], units: Units) -> None:
    for i, p in enumerate(points):
        if units == "fraction" and not all(0.0 <= v <= 1.0 for v in p):
            raise ValueError(f"point {i} {p!r} lies outside the frame: fractions of the frame must be within [0, 1]")
        if units == "pixels" and not all(v >= 0 for v in p):
            raise ValueError(f"point {i} {p!r} lies outside the frame: pixel coordinates cannot be negative")


class _Place(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    units: Units = Field(
        None, description="'fraction' (of the frame's width and height) or 'pixels' (original frame); null: the stage's units."
    )
    sources: Optional[List[str]] = Field(
        None, min_length=1, description="Sources whose frames it applies to (null: every source)."
    )
    classes: Optional[List[str]] = Field(
        None, min_length=1, description="Class names it counts (null: every class); checked against the detector's names."
    )


class ZoneConfig(_Place):
    """A named area."""

    polygon: List[List[float]] = Field(
        ..., min_length=3, max_length=256, description="Corners [[x, y], ...] in order; a simple polygon (edges do not cross)."
    )
    loiter: Optional[float] = Field(
        None, gt=0, le=86400, description="Seconds inside after which one 'loiter' event is raised (null: never)."
    )

    @field_validator("polygon")
    @classmethod
    def _simple(cls, value: List[List[float]]) -> List[List[float]]:
        _pairs(value)
        problem = polygon_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class LineConfig(_Place):
    """A named line (a segment) to count crossings of."""

    points: List[List[float]] = Field(
        ..., min_length=2, max_length=2, description="[[x1, y1], [x2, y2]]: its two ends."
    )
    directions: List[str] = Field(
        ["in", "out"], min_length=2, max_length=2,
        description="Names of the two directions: crossing from the left to the right of the "
        "line drawn from its first point to its second (as seen on the picture), and back.",
    )

    @field_validator("points")
    @classmethod
    def _length(cls, value: List[List[float]]) -> List[List[float]]:
        _pairs(value)
        if value[0] == value[1]:
            raise ValueError(f"the line has zero length (both ends are {value[0]!r})")
        return value

    @field_validator("directions")
    @classmethod
    def _distinct(cls, value: List[str]) -> List[str]:
        if value[0] == value[1] or not all(v.strip() for v in value):
            raise ValueError(f"two different, non-empty names expected, got {value!r}")
        return value


class ZonesConfig(StageConfig):
    zones: Dict[str, ZoneConfig] = Field(default_factory=dict, description="Zone name -> polygon and filters.")
    lines: Dict[str, LineConfig] = Field(default_factory=dict, description="Line name -> ends, direction names and filters.")
    units: Literal["fraction", "pixels"] = Field(
        "fraction", description="Default units of every zone's and line's coordinates: 'fraction' of the frame or 'pixels'."
    )
    anchor: Literal["bottom", "center"] = Field(
        "bottom", description="The point of a box that is in a zone or crosses a line: the middle of its bottom edge, or its centre."
    )
    inertia: int = Field(
        2, ge=1, le=100,
        description="Sightings in a row inside (outside) a zone before it counts as entered (left); 1 reacts at once, more ignores jitter at the edge.",
    )
    line_margin: float = Field(
        2.0, ge=0, le=1000, description="Pixels a point must be away from a line to be on one of its sides (jitter on the line is no crossing)."
    )

    @model_validator(mode="after")
    def _named(self) -> ZonesConfig:
        import re

        if not self.zones and not self.lines:
            raise ValueError("zones: define at least one zone or line")
        for kind, table in (("zones", self.zones), ("lines", self.lines)):
            for name, place in table.items():
                if not re.match(NAME_PATTERN, name):
                    raise ValueError(f"{kind}.{name}: a name is 1-63 letters, digits, '_' or '-', starting with a letter or digit")
                pts = place.polygon if isinstance(place, ZoneConfig) else place.points
                try:
                    _check_points(pts, place.units or self.units)
                except ValueError as exc:
                    field = "polygon" if isinstance(place, ZoneConfig) else "points"
                    raise ValueError(f"{kind}.{name}.{field}: {exc}") from None
        return self


class _Geometry:
    """A zone or line resolved to one source's pixels."""

    def __init__(self, name: str, place: _Place, points: np.ndarray, class_ids: Optional[Set[int]]):
        self.name = name
        self.place = place
        self.points = points
        self.class_ids = class_ids  # None: every class
        self.drawn = np.round(points, 1).tolist()  # what the overlay carries, every frame


class _TrackState:
    """What the zones stage knows of one track: its zones, its sides of the lines, and its
    latest state from the tracker (for the events it raises)."""

    __slots__ = ("zones", "streak", "loitered", "sides", "seen_at", "restored", "class_id", "first_seen",
                 "best_confidence", "confidence", "bbox", "snapshot")

    def __init__(self) -> None:
        self.zones: Dict[str, float] = {}  # zone -> timestamp it was entered
        self.streak: Dict[str, Tuple[int, float]] = {}  # zone -> (sightings, since) against membership
        self.loitered: Set[str] = set()
        self.sides: Dict[str, Tuple[int, List[float]]] = {}  # line -> (side, point [x, y] seen there)
        self.seen_at = 0.0  # timestamp of the latest frame it was seen on
        self.restored = False  # first seen by a restarted zones stage: take its zones silently
        self.class_id = 0
        self.first_seen = 0.0
        self.best_confidence = 0.0
        self.confidence: Optional[float] = None
        self.bbox: List[float] = [0.0, 0.0, 0.0, 0.0]
        self.snapshot: Optional[Dict[str, Any]] = None

    def summary(self, track_id: int, names: List[str], now: float) -> Dict[str, Any]:
        c = self.class_id
        return {
            "track_id": track_id,
            "label": names[c] if 0 <= c < len(names) else str(c),
            "class_id": c,
            "first_seen": self.first_seen,
            "last_seen": self.seen_at,
            "best_confidence": self.best_confidence,
            "confidence": self.confidence if self.seen_at == now else None,
            "bbox": self.bbox,
            "snapshot": self.snapshot,
        }


class ZonesStage(Processor):
    """Zones and lines per source: enter, leave, cross and loiter events of tracks; live counts."""

    Config = ZonesConfig
    config: ZonesConfig
    accepts: ClassVar[Tuple[str, ...]] = ("detections",)
    produces: ClassVar[Optional[str]] = "detections"

    def __init__(self, config: ZonesConfig, context: StageContext) -> None:
        super().__init__(config, context)
        m = self.metrics
        self.m_objects = m.gauge("edgepipe_zone_objects", "Tracked objects in the zone now.", labels=("source", "zone"))
        self.m_entries = m.counter("edgepipe_zone_entries_total", "Tracked objects that entered the zone.", labels=("source", "zone"))
        self.m_crossings = m.counter(
            "edgepipe_zone_crossings_total", "Tracked objects that crossed the line, per direction.",
            labels=("source", "line", "direction"))
        self.m_loiter = m.counter(
            "edgepipe_zone_loiter_total", "Tracked objects that stayed in the zone past its loiter time.",
            labels=("source", "zone"))

    # -- validation ------------------------------------------------------------------------

    def check_upstream(self, upstream: Dict[str, Stage]) -> None:
        if not any(getattr(s, "provides_track_ids", False) for s in upstream.values()):
            raise ValueError(
                "a zones stage needs a tracker upstream (its events follow tracked objects): "
                "put a 'tracker' stage between nms and this one"
            )
        sources = {n: s for n, s in upstream.items() if s.kind == "source"}
        for kind, table in (("zones", self.config.zones), ("lines", self.config.lines)):
            for name, place in table.items():
                check_class_names(place.classes, upstream, f"{kind}.{name}.classes")
                for src in place.sources or []:
                    if src not in sources:
                        raise ValueError(
                            f"{kind}.{name}.sources: {src!r} is not a source upstream of this stage "
                            f"(upstream sources: {', '.join(sources) or 'none'})"
                        )
                if (place.units or self.config.units) != "pixels":
                    continue
                field = "polygon" if isinstance(place, ZoneConfig) else "points"
                for src in place.sources or list(sources):
                    size = getattr(sources[src], "frame_size", lambda: None)()
                    if size is None:
                        continue  # checked on the first frame of that source
                    problem = _outside_frame(_points(place), size[0], size[1])
                    if problem:
                        raise ValueError(f"{kind}.{name}.{field}: {problem} of source {src!r}")

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = time.time()
        # source -> (width, height, zones, lines) resolved to that source's pixels
        self._resolved: Dict[str, Tuple[int, int, List[_Geometry], List[_Geometry]]] = {}
        self._tracks: Dict[str, Dict[int, _TrackState]] = {}
        self._counts: Dict[Tuple[str, str], int] = {}  # (source, zone) -> tracks inside now
        self._totals: Dict[Tuple[str, str, str], int] = {}  # (source, place, what) -> events since start

    def _resolve(self, frame: Frame) -> Tuple[List[_Geometry], List[_Geometry]]:
        got = self._resolved.get(frame.source)
        if got is not None and got[:2] == (frame.width, frame.height):
            return got[2], got[3]
        names = frame.names or []
        zones: List[_Geometry] = []
        lines: List[_Geometry] = []
        for kind, table, out in (("zones", self.config.zones, zones), ("lines", self.config.lines, lines)):
            for name, place in table.items():
                if place.sources is not None and frame.source not in place.sources:
                    continue
                pts = np.asarray(_points(place), np.float64)
                units = place.units or self.config.units
                if units == "fraction":
                    pts = pts * np.array([frame.width, frame.height], np.float64)
                else:
                    problem = _outside_frame(_points(place), frame.width, frame.height)
                    if problem:
                        field = "polygon" if kind == "zones" else "points"
                        self.report_unhealthy(f"{kind}.{name}.{field}: {problem} of source {frame.source!r}; ignored there")
                        continue
                ids = None
                if place.classes is not None:
                    unknown = [c for c in place.classes if c not in names]
                    if unknown:
                        self.report_unhealthy(
                            f"{kind}.{name}.classes: unknown class {unknown[0]!r}; the detector's classes are {', '.join(names) or 'unnamed'}"
                        )
                    ids = {names.index(c) for c in place.classes if c in names}
                out.append(_Geometry(name, place, pts, ids))
        for z in zones:
            self.m_objects.labels(frame.source, z.name).set(self._counts.get((frame.source, z.name), 0))
            self.m_entries.labels(frame.source, z.name)
            if z.place.loiter is not None:  # type: ignore[attr-defined]
                self.m_loiter.labels(frame.source, z.name)
        for line in lines:
            for direction in line.place.directions:  # type: ignore[attr-defined]
                self.m_crossings.labels(frame.source, line.name, direction)
        self._resolved[frame.source] = (frame.width, frame.height, zones, lines)
        return zones, lines

    def process(self, frames: List[Frame]) -> List[Frame]:
        for frame in frames:
            self._frame(frame)
        return frames

    def _frame(self, frame: Frame) -> None:
        tracker = frame.meta.get("tracker")
        if not isinstance(tracker, dict) or frame.track_ids is None:
            raise ValueError(f"frame {frame.source}/{frame.frame_id} carries no tracks (is a tracker upstream?)")
        run = str(tracker.get("run"))
        zones, lines = self._resolve(frame)
        tracks = self._tracks.setdefault(frame.source, {})
        found = frame.meta.get("tracks")
        table: Dict[str, Any] = found if isinstance(found, dict) else {}
        info = {tid: k for k, tid in enumerate(table.get("track_id", []))}
        snapshots = table.get("snapshot") or {}
        t_class, t_first, t_best = table.get("class_id"), table.get("first_seen"), table.get("best_confidence")
        out: List[Dict[str, Any]] = []
        changed: Set[int] = set()
        dets = frame.detections if frame.detections is not None else np.zeros((0, 6), np.float32)
        rows = [i for i, tid in enumerate(frame.track_ids) if tid is not None]
        if rows:
            seen = dets[rows].astype(np.float64)
            x = (seen[:, 0] + seen[:, 2]) / 2
            y = seen[:, 3] if self.config.anchor == "bottom" else (seen[:, 1] + seen[:, 3]) / 2
            points = np.stack([x, y], axis=1)
            inside_by_zone = [inside(points, z.points).tolist() for z in zones]
            side_by_line = [side(points, line.points[0], line.points[1], self.config.line_margin).tolist()
                            for line in lines]
            point_list = points.tolist()
            boxes = np.round(seen[:, :4], 2).tolist()
            confidences = np.round(seen[:, 4], 5).tolist()
            classes = seen[:, 5].astype(np.int64).tolist()
            for k, i in enumerate(rows):
                tid = frame.track_ids[i]
                assert tid is not None
                cls = classes[k]
                st = tracks.get(tid)
                j = info.get(tid)
                if st is None:
                    st = tracks[tid] = _TrackState()
                    # Seen by the tracker before this worker started: a restart of this stage,
                    # not an arrival; its zones are taken as they are, without events.
                    first = t_first[j] if j is not None else frame.timestamp  # type: ignore[index]
                    st.restored = first < self.started_at - 1.0
                if j is not None:
                    st.class_id = t_class[j]  # type: ignore[index]
                    st.first_seen = t_first[j]  # type: ignore[index]
                    st.best_confidence = t_best[j]  # type: ignore[index]
                    st.snapshot = snapshots.get(str(tid)) if snapshots else None
                st.confidence = confidences[k]
                st.bbox = boxes[k]
                st.seen_at = frame.timestamp
                for z, flags in zip(zones, inside_by_zone):
                    if z.class_ids is not None and cls not in z.class_ids:
                        continue
                    if flags[k] == (z.name in st.zones):  # no change: the common case, inline
                        if st.streak:
                            st.streak.pop(z.name, None)
                    elif self._zone_step(frame, run, st, tid, z, flags[k], out):
                        changed.add(tid)
                for line, sides in zip(lines, side_by_line):
                    now = sides[k]
                    if now == 0 or (line.class_ids is not None and cls not in line.class_ids):
                        continue
                    before = st.sides.get(line.name)
                    st.sides[line.name] = (now, point_list[k])
                    if before is not None and before[0] != now:
                        self._line_step(frame, run, st, tid, line, now, before[1], point_list[k], out)
                st.restored = False
        # Loitering: every track inside a zone, seen on this frame or not (hidden, not gone).
        loiter = {z.name: z.place.loiter for z in zones if z.place.loiter is not None}  # type: ignore[attr-defined]
        if loiter:
            for tid, st in tracks.items():
                for zone, since in st.zones.items():
                    limit = loiter.get(zone)
                    if limit is not None and zone not in st.loitered and frame.timestamp - since >= limit:
                        st.loitered.add(zone)
                        self.m_loiter.labels(frame.source, zone).inc()
                        out.append(self._event("loiter", frame, run, st, tid, zone=zone,
                                               duration=round(frame.timestamp - since, 3)))
        # The tracker's lifecycle events: zones filled in, ended tracks leave their zones.
        events: List[Dict[str, Any]] = []
        for ev in frame.events:
            raw_id = ev.get("track_id")
            etid = raw_id if isinstance(raw_id, int) else -1
            st = tracks.get(etid)
            if st is not None and ev.get("type") == "end":
                ended_in = sorted(st.zones)
                for zone, since in sorted(st.zones.items()):
                    st.zones = {z: t for z, t in st.zones.items() if z != zone}
                    self._count(frame.source, zone, -1)
                    last = float(ev.get("last_seen") or frame.timestamp)
                    events.append(self._event("leave", frame, run, st, etid, zone=zone,
                                              duration=round(max(0.0, last - since), 3)))
                ev["zones"] = ended_in
                del tracks[etid]
                changed.discard(etid)
            elif st is not None and ev.get("type") in ("new", "update"):
                ev["zones"] = sorted(st.zones)
                if etid in changed:
                    changed.discard(etid)
                    if ev["type"] == "update":
                        ev["changed"] = sorted(set(ev.get("changed") or []) | {"zones"})
            events.append(ev)
        events += out
        for tid in sorted(changed):
            events.append(self._event("update", frame, run, tracks[tid], tid, changed=["zones"]))
        frame.events = events
        frame.meta["zones"] = self._overlay(frame.source, zones, lines)

    def _overlay(self, source: str, zones: List[_Geometry], lines: List[_Geometry]) -> Dict[str, Any]:
        """What a picture of this source shows (the preview page draws it): each zone and line
        in original-frame pixels with its live counts."""
        return {
            "zones": [
                {"name": z.name, "points": z.drawn,
                 "objects": self._counts.get((source, z.name), 0),
                 "entries": self._totals.get((source, z.name, "enter"), 0)}
                for z in zones
            ],
            "lines": [
                {"name": line.name, "points": line.drawn,
                 "directions": list(line.place.directions),  # type: ignore[attr-defined]
                 "crossings": [self._totals.get((source, line.name, d), 0)
                               for d in line.place.directions]}  # type: ignore[attr-defined]
                for line in lines
            ],
        }

    def _total(self, source: str, place: str, what: str) -> None:
        key = (source, place, what)
        self._totals[key] = self._totals.get(key, 0) + 1

    def _event(self, kind: str, frame: Frame, run: str, st: _TrackState, tid: int, **fields: Any) -> Dict[str, Any]:
        summary = st.summary(tid, frame.names or [], frame.timestamp)
        return event_message(kind, frame, summary, run, zones=list(st.zones), **fields)

    def _count(self, source: str, zone: str, delta: int) -> None:
        key = (source, zone)
        self._counts[key] = self._counts.get(key, 0) + delta
        self.m_objects.labels(source, zone).set(self._counts[key])

    def _zone_step(self, frame: Frame, run: str, st: _TrackState, tid: int, z: _Geometry, now_inside: bool,
                   out: List[Dict[str, Any]]) -> bool:
        """Follow one track in one zone whose membership ``now_inside`` contradicts (the caller
        handles the agreeing case); True when its membership changed."""
        if st.restored:
            st.zones[z.name] = frame.timestamp
            self._count(frame.source, z.name, +1)
            return False
        count, since = st.streak.get(z.name, (0, frame.timestamp))
        count += 1
        if count < self.config.inertia:
            st.streak[z.name] = (count, since)
            return False
        st.streak.pop(z.name, None)
        if now_inside:
            st.zones[z.name] = since
            self._count(frame.source, z.name, +1)
            self.m_entries.labels(frame.source, z.name).inc()
            self._total(frame.source, z.name, "enter")
            out.append(self._event("enter", frame, run, st, tid, zone=z.name))
        else:
            entered = st.zones.pop(z.name)
            st.loitered.discard(z.name)
            self._count(frame.source, z.name, -1)
            out.append(self._event("leave", frame, run, st, tid, zone=z.name, duration=round(max(0.0, since - entered), 3)))
        return True

    def _line_step(self, frame: Frame, run: str, st: _TrackState, tid: int, line: _Geometry, now: int,
                   before: List[float], point: List[float], out: List[Dict[str, Any]]) -> None:
        """One track seen on side ``now`` (+1 or -1) of a line, on the other side ``before``:
        a crossing when its step went through the line (the caller keeps the sides)."""
        if not passes_through(before, point, line.points[0], line.points[1]):
            return  # went around an end of the line
        directions = line.place.directions  # type: ignore[attr-defined]
        direction = directions[0] if now > 0 else directions[1]
        self.m_crossings.labels(frame.source, line.name, direction).inc()
        self._total(frame.source, line.name, direction)
        out.append(self._event("cross", frame, run, st, tid, line=line.name, direction=direction))


def _points(place: _Place) -> List[List[float]]:
    return place.polygon if isinstance(place, ZoneConfig) else place.points  # type: ignore[attr-defined]


def _outside_frame(points: List[List[float]], width: int, height: int) -> Optional[str]:
    for p in points:
        if p[0] > width or p[1] > height:
            return f"point {p!r} lies outside the {width}x{height} frame"
    return None
