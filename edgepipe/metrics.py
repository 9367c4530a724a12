"""Per-stage measurements: plain counters in the workers, one Prometheus endpoint in the supervisor.

A worker keeps a :class:`StageMetrics` per stage: plain Python counters, gauges and histograms
with no HTTP server and no prometheus_client import. The worker loop counts what it sees around
every call (frames received/sent, drops, errors, processing time, busy time, progress): those
are the core series, the same for every stage (:data:`METRIC_NAMES`). Everything specific to a
stage (reconnects of a camera, inference time of a detector, messages a sink delivered, a line
crossing count) is a series the stage declares itself through :meth:`StageMetrics.counter`,
:meth:`StageMetrics.gauge` and :meth:`StageMetrics.histogram`: core code names none of them.

Every heartbeat carries :meth:`StageMetrics.snapshot` (plain data, msgpack-able, the declared
series with their help text and labels included) to the supervisor, which folds the snapshots of
dead worker incarnations into a base so counters stay monotonic across restarts
(:class:`StageTotals`), and serves everything from one HTTP endpoint (:class:`MetricsServer`:
``/metrics`` in the Prometheus text format through a custom collector, ``/healthz`` as JSON). Each
series carries the label ``stage`` (the stage's config name). Names are a contract (dashboards and
alert rules use them): the core ones are in :data:`METRIC_NAMES`, a plugin's in its README.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import platform
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = [
    "AGE_BUCKETS",
    "BATCH_BUCKETS",
    "DROP_REASONS",
    "ERROR_TYPES",
    "METRIC_NAMES",
    "PROCESSING_BUCKETS",
    "Counter",
    "CounterVec",
    "Gauge",
    "Histogram",
    "MetricsError",
    "MetricsServer",
    "PipelineCollector",
    "PipelineView",
    "Series",
    "StageMetrics",
    "StageTotals",
    "WorkerView",
    "check_series",
    "read_process_stats",
]

log = logging.getLogger(__name__)

PROCESSING_BUCKETS: Tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS: Tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
AGE_BUCKETS: Tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DROP_REASONS: Tuple[str, ...] = ("skipped", "queue_full", "error", "stale")
ERROR_TYPES: Tuple[str, ...] = ("decode", "process", "source")

# The core families: counted by the runtime for every stage (or every source, every worker),
# whatever its plugin. Dashboards and alerts are written against these names and against the
# series each first-party plugin declares (listed in its README); renaming one is a breaking
# change. A plugin may not declare a name of this table.
METRIC_NAMES: Dict[str, str] = {
    "edgepipe_stage_frames_received_total": "Frames this stage received from its inputs.",
    "edgepipe_stage_frames_sent_total": "Frames this stage passed downstream.",
    "edgepipe_stage_frames_dropped_total": "Frames dropped, by reason (skipped by the 'latest' "
    "policy, queue_full at a full link, error in processing, stale).",
    "edgepipe_stage_errors_total": "Errors, by type (decode of a malformed message, process, source).",
    "edgepipe_stage_processing_seconds": "Time spent in one process()/read() call.",
    "edgepipe_stage_busy_seconds_total": "Time spent working; its rate is the stage's utilization.",
    "edgepipe_stage_last_progress_timestamp_seconds": "Unix time of the stage's last progress.",
    "edgepipe_stage_up": "1 while the stage's worker runs and is ready.",
    "edgepipe_stage_healthy": "0 while the stage reports that it cannot do its job (see /healthz for why).",
    "edgepipe_source_frames_read_total": "Frames a source read from its device/stream/file.",
    "edgepipe_source_last_frame_timestamp_seconds": "Capture time of the newest frame read.",
    "edgepipe_source_frames_per_second": "Frames read per second, recently.",
    "edgepipe_worker_resident_memory_bytes": "Resident memory of the worker process.",
    "edgepipe_worker_cpu_seconds_total": "CPU time (user + system) of the worker process.",
    "edgepipe_worker_restarts_total": "Times the supervisor restarted this worker.",
    "edgepipe_worker_up": "1 while the worker process runs and is ready.",
    "edgepipe_build_info": "edgepipe and Python versions (always 1).",
}

# Label names the runtime or Prometheus gives meaning to: a plugin's series may not use them.
RESERVED_LABELS = frozenset({"stage", "worker", "instance", "job", "le", "quantile"})
_SERIES_NAME = re.compile(r"^edgepipe_[a-z]([a-z0-9_]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KINDS = ("counter", "gauge", "histogram")


class MetricsError(ValueError):
    """A series a stage cannot declare (bad name or labels, a clash); one line naming both."""


class Counter:
    """A monotonic count. ``inc(amount)`` with amount >= 0; ``value`` reads it."""

    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"counter increment must be >= 0, got {amount!r}")
        with self._lock:
            self.value += amount


class Gauge:
    """A value that goes up and down: ``set(v)``, ``inc(a)``, ``dec(a)``; ``value`` reads it."""

    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value -= amount


class CounterVec:
    """Counters keyed by one label whose values are known up front (so every series exists at 0).

    ``labels("stale").inc()``; an unknown label value is a ValueError naming the known ones.
    """

    def __init__(self, label: str, values: Sequence[str]) -> None:
        self.label = label
        self.children: Dict[str, Counter] = {v: Counter() for v in values}

    def labels(self, value: str) -> Counter:
        try:
            return self.children[value]
        except KeyError:
            raise ValueError(
                f"{self.label} {value!r} is not one of {', '.join(self.children)}"
            ) from None


class Histogram:
    """Observations counted into fixed buckets (upper bounds), plus their sum and count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets: Tuple[float, ...] = tuple(float(b) for b in buckets)
        self.counts: List[int] = [0] * (len(self.buckets) + 1)  # last: above every bound (+Inf)
        self.sum = 0.0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        i = 0
        for i, bound in enumerate(self.buckets):  # noqa: B007 - i is used after the loop
            if value <= bound:
                break
        else:
            i = len(self.buckets)
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def cumulative(self) -> List[int]:
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out


Child = Union[Counter, Gauge, Histogram]


class Series:
    """One metric family a stage declared: kind, name, help text, label names, and one child
    (:class:`Counter`, :class:`Gauge` or :class:`Histogram`) per tuple of label values.

    Without labels the series is its own only child: ``series.inc()``, ``.set(v)``,
    ``.observe(v)``, ``.value``, ``.count`` work on it directly. With labels,
    ``series.labels("door", "in")`` (or ``labels(zone="door", direction="in")``) returns the child,
    created at 0 on first use; call it at start for the label values that should exist before
    anything happened. ``remove(*values)`` and ``clear()`` drop children (a gauge describing what
    no longer exists). Safe to use from the stage's own threads."""

    def __init__(
        self, kind: str, name: str, help: str, labels: Sequence[str] = (),  # noqa: A002
        buckets: Optional[Sequence[float]] = None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.help = help
        self.label_names: Tuple[str, ...] = tuple(labels)
        self.buckets: Optional[Tuple[float, ...]] = tuple(float(b) for b in buckets) if buckets else None
        self.children: Dict[Tuple[str, ...], Child] = {}
        self._lock = threading.Lock()
        if not self.label_names:
            self.labels()

    def spec(self) -> Dict[str, Any]:
        """What the declaration says (no values): compared across stages by :func:`check_series`."""
        return {
            "kind": self.kind, "name": self.name, "help": self.help,
            "labels": list(self.label_names), "buckets": list(self.buckets) if self.buckets else None,
        }

    def _new(self) -> Child:
        if self.kind == "counter":
            return Counter()
        if self.kind == "gauge":
            return Gauge()
        assert self.buckets is not None
        return Histogram(self.buckets)

    def labels(self, *values: Any, **named: Any) -> Any:
        """The child for these label values (positional in declaration order, or by name)."""
        if named:
            if values or set(named) != set(self.label_names):
                raise ValueError(
                    f"series {self.name!r} has labels {list(self.label_names)}, got {sorted(named)}"
                )
            values = tuple(named[n] for n in self.label_names)
        if len(values) != len(self.label_names):
            raise ValueError(
                f"series {self.name!r} has labels {list(self.label_names)}, got {len(values)} value(s)"
            )
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            with self._lock:
                child = self.children.setdefault(key, self._new())
        return child

    def remove(self, *values: Any) -> None:
        with self._lock:
            self.children.pop(tuple(str(v) for v in values), None)

    def clear(self) -> None:
        with self._lock:
            self.children.clear()

    # An unlabeled series is used directly.
    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)  # type: ignore[union-attr]

    def dec(self, amount: float = 1.0) -> None:
        self._only().dec(amount)  # type: ignore[union-attr]

    def set(self, value: float) -> None:
        self._only().set(value)  # type: ignore[union-attr]

    def observe(self, value: float) -> None:
        self._only().observe(value)  # type: ignore[union-attr]

    @property
    def value(self) -> float:
        return self._only().value  # type: ignore[union-attr]

    @property
    def count(self) -> int:
        return self._only().count  # type: ignore[union-attr]

    @property
    def sum(self) -> float:
        return self._only().sum  # type: ignore[union-attr]

    def _only(self) -> Child:
        if self.label_names:
            raise ValueError(f"series {self.name!r} has labels {list(self.label_names)}: use .labels(...)")
        return self.children[()]

    def samples(self) -> List[List[Any]]:
        """``[[label values, value]]`` (histograms: ``[counts, sum]``), plain data."""
        with self._lock:
            items = list(self.children.items())
        out: List[List[Any]] = []
        for key, child in items:
            if isinstance(child, Histogram):
                out.append([list(key), [list(child.counts), child.sum]])
            else:
                out.append([list(key), child.value])
        return out

    def load(self, samples: Sequence[Any]) -> None:
        """Set the children from :meth:`samples` output (malformed data raises ValueError)."""
        for key, value in samples:
            child = self.labels(*key)
            if isinstance(child, Histogram):
                counts, total = value
                if len(counts) != len(child.counts):
                    raise ValueError(
                        f"histogram {self.name!r} has {len(counts)} buckets, expected {len(child.counts)}"
                    )
                child.counts = [int(c) for c in counts]
                child.sum = float(total)
            else:
                child.value = float(value)

    def plus(self, later: Optional[Series] = None) -> Series:
        """A new series: counters and histograms summed per label values; a gauge takes
        ``later``'s children when ``later`` has the series (gauges describe the present)."""
        out = Series(self.kind, self.name, self.help, self.label_names, self.buckets)
        out.children = {}
        if later is not None and self.kind == "gauge":
            for key, child in later.children.items():
                out.labels(*key).set(child.value)  # type: ignore[union-attr]
            return out
        parts = [self] if later is None else [self, later]
        for series in parts:
            for key, child in series.children.items():
                c = out.labels(*key)
                if isinstance(c, Histogram):
                    assert isinstance(child, Histogram)
                    c.counts = [x + y for x, y in zip(c.counts, child.counts)]
                    c.sum += child.sum
                else:
                    c.value += child.value  # type: ignore[union-attr]
        return out


def _declaration_problem(kind: str, name: str, labels: Sequence[str], buckets: Optional[Sequence[float]]) -> Optional[str]:
    """Why a declaration is not a proper Prometheus family of a plugin, or None."""
    if not isinstance(name, str) or not _SERIES_NAME.match(name):
        return "a series name is 'edgepipe_' then lower-case letters, digits and '_'"
    if name in METRIC_NAMES:
        return "the runtime exports this core series itself"
    if kind == "counter" and not name.endswith("_total"):
        return "a counter's name ends in '_total'"
    if kind != "counter" and name.endswith("_total"):
        return f"only a counter's name ends in '_total' (this is a {kind})"
    if name.endswith(("_bucket", "_count", "_sum", "_created")):
        return "names ending in _bucket, _count, _sum or _created are taken by Prometheus' own samples"
    for label in labels:
        if not isinstance(label, str) or not _LABEL_NAME.match(label):
            return f"label {label!r} is not lower-case letters, digits and '_'"
        if label in RESERVED_LABELS or label.startswith("__"):
            return f"label {label!r} is reserved ({', '.join(sorted(RESERVED_LABELS))})"
    if len(set(labels)) != len(labels):
        return "a label is named twice"
    if kind == "histogram":
        if not buckets or list(buckets) != sorted(set(float(b) for b in buckets)):
            return "a histogram needs its bucket bounds, increasing"
    return None


class StageMetrics:
    """The measurements of one stage, kept in its worker and shipped to the supervisor.

    Constructed by the runtime (``StageMetrics(name, kind)``) and handed to the stage as
    ``self.metrics``; standalone use (a plugin's unit test) is the same call. Every method is
    cheap and thread-safe (a source's grab thread may count reconnects).

    Counted by the worker loop around every call (a stage does not touch these):
      ``received``, ``sent`` (Counter), ``dropped.labels(reason)`` with reason in
      skipped|queue_full|error, ``errors.labels(type)`` with type in decode|process|source,
      ``processing_seconds`` (Histogram: one ``process()`` call, or for sources one ``read()``
      that returned a frame, without the time a paced source waits for its next frame),
      ``busy_seconds`` (Counter, the same time summed), ``last_progress`` (Gauge, unix time),
      ``detections_seen`` (detections in the frames a sink received; for the status display),
      and for sources ``frames_read``, ``last_frame_timestamp``, ``fps``.

    Declared by the stage, for what only it knows (in ``__init__`` or ``start``)::

        self.reconnects = self.metrics.counter(
            "edgepipe_source_reconnects_total", "Times the source reconnected to its camera.")
        self.crossings = self.metrics.counter(
            "edgepipe_zone_crossings_total", "Line crossings.", labels=("line", "direction"))
        self.crossings.labels("door", "in").inc()

    Declaring the same name twice in a stage returns the same :class:`Series` when the
    declarations agree. A name that is not ``edgepipe_...`` in lower case, a counter not ending
    in ``_total``, a core name (:data:`METRIC_NAMES`) or a reserved label raises
    :class:`MetricsError` naming the stage and the series (the stage then fails to start); two
    stages declaring one name as different kinds or with other labels are refused by the
    supervisor when the second one starts (:func:`check_series`). Several stages may share a
    name declared alike (every first-party sink counts ``edgepipe_sink_messages_published_total``). Every declared series carries the ``stage`` label on
    ``/metrics``, and its counters and histograms keep adding up across worker restarts.

    Health: :meth:`report_problem` (a stage that keeps running but cannot do its job: a sink
    that cannot reach its broker, a camera that is gone) and :meth:`clear_problem`; the
    :class:`edgepipe.stage.Stage` methods ``report_unhealthy``/``report_healthy`` call them.
    """

    def __init__(self, stage: str, kind: str = "processor") -> None:
        self.stage = stage
        self.kind = kind
        self.received = Counter()
        self.sent = Counter()
        self.busy_seconds = Counter()
        self.frames_read = Counter()
        self.detections_seen = Counter()
        self.dropped = CounterVec("reason", DROP_REASONS)
        self.errors = CounterVec("type", ERROR_TYPES)
        self.last_progress = Gauge()
        self.last_frame_timestamp = Gauge()
        self.fps = Gauge()
        self.processing_seconds = Histogram(PROCESSING_BUCKETS)
        self.series: Dict[str, Series] = {}
        self.problem: Optional[str] = None
        self._lock = threading.Lock()

    # -- declared series --------------------------------------------------------------------------

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Series:  # noqa: A002
        """Declare (or get back) a counter: ``name`` ends in ``_total``."""
        return self._declare("counter", name, help, labels, None)

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Series:  # noqa: A002
        """Declare (or get back) a gauge."""
        return self._declare("gauge", name, help, labels, None)

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()  # noqa: A002
    ) -> Series:
        """Declare (or get back) a histogram with these bucket upper bounds (+Inf is added)."""
        return self._declare("histogram", name, help, labels, buckets)

    def _declare(
        self, kind: str, name: str, help: str, labels: Sequence[str],  # noqa: A002
        buckets: Optional[Sequence[float]],
    ) -> Series:
        labels = tuple(labels)
        problem = _declaration_problem(kind, name, labels, buckets)
        if problem is None and not (isinstance(help, str) and help.strip()):
            problem = "a series needs a help text"
        if problem is not None:
            raise MetricsError(f"stage {self.stage!r}: series {name!r}: {problem}")
        with self._lock:
            series = self.series.get(name)
            if series is None:
                series = self.series[name] = Series(kind, name, " ".join(help.split()), labels, buckets)
                return series
        want = Series(kind, name, " ".join(help.split()), labels, buckets).spec()
        if series.spec() != want:
            raise MetricsError(
                f"stage {self.stage!r}: series {name!r} is declared twice differently "
                f"({_describe(series.spec())} and {_describe(want)})"
            )
        return series

    def get(self, name: str) -> Series:
        """A declared series by name (KeyError naming the declared ones otherwise)."""
        try:
            return self.series[name]
        except KeyError:
            raise KeyError(f"stage {self.stage!r} declared no series {name!r}; it has: "
                           f"{', '.join(sorted(self.series)) or 'none'}") from None

    # -- health -----------------------------------------------------------------------------------

    def report_problem(self, reason: str) -> None:
        self.problem = " ".join(str(reason).split()) or "unhealthy"

    def clear_problem(self) -> None:
        self.problem = None

    # -- transport --------------------------------------------------------------------------------

    def snapshot(self) -> Dict[str, Any]:
        """Plain data (msgpack/JSON-able) with every value; :meth:`from_snapshot` reverses it."""
        with self._lock:
            declared = list(self.series.values())
        return {
            "stage": self.stage,
            "kind": self.kind,
            "counters": {n: getattr(self, n).value for n in _COUNTERS},
            "vecs": {n: {k: c.value for k, c in getattr(self, n).children.items()} for n in _VECS},
            "gauges": {n: getattr(self, n).value for n in _GAUGES},
            "processing": [list(self.processing_seconds.counts), self.processing_seconds.sum],
            "series": [dict(s.spec(), samples=s.samples()) for s in declared],
            "problem": self.problem,
        }

    @classmethod
    def from_snapshot(cls, snap: Dict[str, Any]) -> StageMetrics:
        """Rebuild from :meth:`snapshot` output; malformed parts raise ValueError/KeyError/TypeError."""
        m = cls(str(snap["stage"]), str(snap["kind"]))
        for n in _COUNTERS:
            getattr(m, n).value = float(snap["counters"][n])
        for n in _VECS:
            vec = getattr(m, n)
            for k, v in snap["vecs"][n].items():
                if k in vec.children:
                    vec.children[k].value = float(v)
        for n in _GAUGES:
            getattr(m, n).value = float(snap["gauges"][n])
        counts, total = snap["processing"]
        h = m.processing_seconds
        if len(counts) != len(h.counts):
            raise ValueError(f"processing histogram has {len(counts)} buckets, expected {len(h.counts)}")
        h.counts, h.sum = [int(c) for c in counts], float(total)
        for spec in snap.get("series") or []:
            kind, name = str(spec["kind"]), str(spec["name"])
            labels, buckets = [str(x) for x in spec.get("labels") or []], spec.get("buckets")
            if kind not in _KINDS:
                raise ValueError(f"series {name!r} has unknown kind {kind!r}")
            problem = _declaration_problem(kind, name, labels, buckets)
            if problem is not None:
                raise ValueError(f"series {name!r}: {problem}")
            series = m.series[name] = Series(kind, name, str(spec["help"]), labels, buckets)
            series.children = {}
            series.load(spec.get("samples") or [])
        problem = snap.get("problem")
        m.problem = str(problem) if problem else None
        return m

    def plus(self, later: StageMetrics) -> StageMetrics:
        """Counters and histograms summed; gauges, declared gauges and the problem from ``later``."""
        out = StageMetrics(self.stage, self.kind)
        for n in _COUNTERS:
            getattr(out, n).value = getattr(self, n).value + getattr(later, n).value
        for n in _VECS:
            for k, c in getattr(out, n).children.items():
                c.value = getattr(self, n).children[k].value + getattr(later, n).children[k].value
        for n in _GAUGES:
            getattr(out, n).value = getattr(later, n).value or getattr(self, n).value
        a, b, h = self.processing_seconds, later.processing_seconds, out.processing_seconds
        h.counts, h.sum = [x + y for x, y in zip(a.counts, b.counts)], a.sum + b.sum
        for name in list(self.series) + [n for n in later.series if n not in self.series]:
            mine, theirs = self.series.get(name), later.series.get(name)
            if mine is not None and theirs is not None and mine.spec() == theirs.spec():
                out.series[name] = mine.plus(theirs)
            else:  # one side only, or redeclared differently by a new incarnation: the later wins
                keep = theirs if theirs is not None else mine
                assert keep is not None
                out.series[name] = keep.plus()
        out.problem = later.problem
        return out


_COUNTERS = ("received", "sent", "busy_seconds", "frames_read", "detections_seen")
_GAUGES = ("last_progress", "last_frame_timestamp", "fps")
_VECS = {"dropped": ("reason", DROP_REASONS), "errors": ("type", ERROR_TYPES)}


def _describe(spec: Dict[str, Any]) -> str:
    labels = f" with labels {', '.join(spec['labels'])}" if spec["labels"] else ""
    return f"a {spec['kind']}{labels}"


def check_series(declared: Dict[str, Iterable[Dict[str, Any]]]) -> List[str]:
    """One line per clash between stages: the same series name declared as another kind, with
    other labels or other buckets (the help text of the first declaration is the one shown).
    ``declared`` maps stage -> its series specs (as in :meth:`Series.spec`); the first stage in
    the mapping's order to declare a name sets it."""
    first: Dict[str, Tuple[str, Dict[str, Any]]] = {}
    errors: List[str] = []
    for stage, specs in declared.items():
        for spec in specs:
            shape = {k: spec.get(k) for k in ("kind", "name", "labels", "buckets")}
            owner = first.setdefault(str(shape["name"]), (stage, shape))
            if owner[0] != stage and owner[1] != shape:
                errors.append(
                    f"stage {stage!r}: series {shape['name']!r} clashes with stage {owner[0]!r}'s: "
                    f"{_describe(shape)} here, {_describe(owner[1])} there"
                    + (" (other buckets)" if _describe(shape) == _describe(owner[1]) else "")
                )
    return errors


class StageTotals:
    """The supervisor's view of one stage across worker incarnations (counters never go back).

    ``update(snapshot)`` replaces the live incarnation's numbers; ``worker_exited()`` folds them
    into the base so the next incarnation's counts add on top; ``current()`` is the sum.
    """

    def __init__(self, stage: str, kind: str) -> None:
        self.base = StageMetrics(stage, kind)
        self.live = StageMetrics(stage, kind)

    def update(self, snapshot: Dict[str, Any]) -> None:
        self.live = StageMetrics.from_snapshot(snapshot)

    def worker_exited(self) -> None:
        self.base = self.base.plus(self.live)
        self.base.problem = None  # a dead incarnation's problem is not the next one's
        self.live = StageMetrics(self.base.stage, self.base.kind)
        self.live.last_progress.value = self.base.last_progress.value

    def current(self) -> StageMetrics:
        return self.base.plus(self.live)


class WorkerView:
    """One worker as exported: its pid (None while down), restarts, up, and the CPU seconds
    of its dead incarnations (so ``edgepipe_worker_cpu_seconds_total`` stays monotonic)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: Optional[int] = None
        self.up = False
        self.restarts = 0
        self.cpu_base = 0.0
        self.cpu_last = 0.0
        self.rss = 0.0

    def sample(self) -> None:
        """Read RSS and CPU time from /proc (a vanished process keeps its last numbers)."""
        if self.pid is None:
            return
        stats = read_process_stats(self.pid)
        if stats is not None:
            self.rss, self.cpu_last = stats

    def exited(self) -> None:
        self.cpu_base += self.cpu_last
        self.cpu_last = 0.0
        self.rss = 0.0
        self.pid = None
        self.up = False

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_base + self.cpu_last


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_process_stats(pid: int) -> Optional[Tuple[float, float]]:
    """(resident bytes, CPU seconds user+system) of a process from /proc, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read().split()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        utime, stime = int(fields[11]), int(fields[12])
        rss_pages = int(statm[1])
    except (IndexError, ValueError):
        return None
    return float(rss_pages * _PAGE_SIZE), (utime + stime) / _CLK_TCK


class PipelineView:
    """What one scrape exports: stages (with up flags) and workers, consistent with each other."""

    def __init__(
        self,
        stages: List[Tuple[StageMetrics, bool]],
        workers: List[WorkerView],
        version: str,
    ) -> None:
        self.stages = stages
        self.workers = workers
        self.version = version


class PipelineCollector:
    """prometheus_client custom collector over a callable returning the current PipelineView:
    the core families of every stage and worker, then each stage's declared series (the first
    stage to declare a name sets its type and labels; the supervisor refuses clashes at start,
    see :func:`check_series`, so a clash here is only skipped)."""

    def __init__(self, view: Callable[[], PipelineView]) -> None:
        self._view = view

    def describe(self) -> List[Any]:
        return []  # unchecked collector: families depend on the pipeline

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        types = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
        view = self._view()
        fams: Dict[str, Any] = {}
        shapes: Dict[str, Tuple[str, Tuple[str, ...]]] = {}

        def fam(name: str, kind: str, labels: Sequence[str], help: Optional[str] = None) -> Any:  # noqa: A002
            if name not in fams:
                fams[name] = types[kind](name, help or METRIC_NAMES[name], labels=list(labels))
                shapes[name] = (kind, tuple(labels))
            return fams[name]

        def hist(family: Any, labels: List[str], h: Histogram) -> None:
            cum = h.cumulative()
            buckets = [(_fmt(b), float(c)) for b, c in zip(h.buckets, cum)]
            buckets.append(("+Inf", float(cum[-1])))
            family.add_metric(labels, buckets, h.sum)

        for m, up in view.stages:
            s = [m.stage]
            fam("edgepipe_stage_frames_received_total", "counter", ["stage"]).add_metric(s, m.received.value)
            fam("edgepipe_stage_frames_sent_total", "counter", ["stage"]).add_metric(s, m.sent.value)
            for reason, c in m.dropped.children.items():
                fam("edgepipe_stage_frames_dropped_total", "counter", ["stage", "reason"]).add_metric([m.stage, reason], c.value)
            for typ, c in m.errors.children.items():
                fam("edgepipe_stage_errors_total", "counter", ["stage", "type"]).add_metric([m.stage, typ], c.value)
            hist(fam("edgepipe_stage_processing_seconds", "histogram", ["stage"]), s, m.processing_seconds)
            fam("edgepipe_stage_busy_seconds_total", "counter", ["stage"]).add_metric(s, m.busy_seconds.value)
            fam("edgepipe_stage_last_progress_timestamp_seconds", "gauge", ["stage"]).add_metric(s, m.last_progress.value)
            fam("edgepipe_stage_up", "gauge", ["stage"]).add_metric(s, 1.0 if up else 0.0)
            fam("edgepipe_stage_healthy", "gauge", ["stage"]).add_metric(s, 0.0 if m.problem else 1.0)
            if m.kind == "source":
                fam("edgepipe_source_frames_read_total", "counter", ["stage"]).add_metric(s, m.frames_read.value)
                fam("edgepipe_source_last_frame_timestamp_seconds", "gauge", ["stage"]).add_metric(s, m.last_frame_timestamp.value)
                fam("edgepipe_source_frames_per_second", "gauge", ["stage"]).add_metric(s, m.fps.value)
        for m, _ in view.stages:
            for series in m.series.values():
                labels = ("stage", *series.label_names)
                if shapes.get(series.name, (series.kind, labels)) != (series.kind, labels):
                    continue  # a clash the supervisor already refused
                family = fam(series.name, series.kind, labels, series.help)
                for key, child in list(series.children.items()):
                    if isinstance(child, Histogram):
                        hist(family, [m.stage, *key], child)
                    else:
                        family.add_metric([m.stage, *key], child.value)
        for w in view.workers:
            n = [w.name]
            fam("edgepipe_worker_resident_memory_bytes", "gauge", ["worker"]).add_metric(n, w.rss)
            fam("edgepipe_worker_cpu_seconds_total", "counter", ["worker"]).add_metric(n, w.cpu_seconds)
            fam("edgepipe_worker_restarts_total", "counter", ["worker"]).add_metric(n, float(w.restarts))
            fam("edgepipe_worker_up", "gauge", ["worker"]).add_metric(n, 1.0 if w.up else 0.0)
        fam("edgepipe_build_info", "gauge", ["version", "python"]).add_metric(
            [view.version, platform.python_version()], 1.0
        )
        yield from fams.values()


def _fmt(bound: float) -> str:
    """Bucket bounds as prometheus_client writes them (``le="1.0"``, ``le="0.005"``)."""
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


class MetricsServer:
    """The daemon's one HTTP endpoint: ``/metrics`` (Prometheus text) and ``/healthz`` (JSON).

    ``health()`` returns ``(healthy, body)``; ``/healthz`` answers 200 with the body when healthy
    and 503 otherwise. ``auth`` (``"user:password"``) requires HTTP basic auth on every path.
    Binding happens in the constructor so a taken port fails before any worker starts; serving
    runs in a daemon thread after :meth:`start`.
    """

    def __init__(
        self,
        listen: str,
        view: Callable[[], PipelineView],
        health: Callable[[], Tuple[bool, Dict[str, Any]]],
        auth: Optional[str] = None,
    ) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import generate_latest

        host, port = split_listen(listen)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(PipelineCollector(view))
        expected = "Basic " + base64.b64encode(auth.encode()).decode() if auth else None

        class Handler(BaseHTTPRequestHandler):
            server_version = "edgepipe"

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if expected and not hmac.compare_digest(
                    self.headers.get("Authorization", ""), expected
                ):
                    self._send(401, b"unauthorized\n", "text/plain", {"WWW-Authenticate": 'Basic realm="edgepipe"'})
                    return
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
                elif path == "/healthz":
                    ok, body = health()
                    self._send(200 if ok else 503, json.dumps(body).encode() + b"\n", "application/json")
                elif path == "/":
                    self._send(200, b"edgepipe: /metrics /healthz\n", "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str, extra: Optional[Dict[str, str]] = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # scrapes are per-interval noise, not events worth a log line

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        if ":" in host:
            Server.address_family = __import__("socket").AF_INET6
        self._httpd = Server((host, port), Handler)
        self.address = f"{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()


def split_listen(listen: str) -> Tuple[str, int]:
    """'127.0.0.1:9310' / '[::1]:9310' / ':9310' -> (host, port); ValueError with the reason."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {listen!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def iter_samples(text: str) -> Iterable[Tuple[str, Dict[str, str], float]]:
    """Parse Prometheus text exposition into (name, labels, value) (for tests and the status)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, dict(s.labels), float(s.value)

