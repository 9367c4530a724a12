"""Per-stage measurements: plain counters in the workers, one Prometheus endpoint in the supervisor.

A worker keeps a :class:`StageMetrics` per stage: plain Python counters, gauges and histograms
with no HTTP server and no prometheus_client import. The worker loop counts what it sees around
every call (frames received/sent, drops, errors, processing time, busy time, progress); a stage
records what only it knows through ``self.metrics`` (reconnects, batch sizes, inference time,
frame age at publish, ...). Every heartbeat carries :meth:`StageMetrics.snapshot` (plain data,
msgpack-able) to the supervisor, which folds the snapshots of dead worker incarnations into a base
so counters stay monotonic across restarts (:class:`StageTotals`), and serves everything from one
HTTP endpoint (:class:`MetricsServer`: ``/metrics`` in the Prometheus text format through a
custom collector, ``/healthz`` as JSON). Metric names are a contract (dashboards and alert rules
use them): see :data:`METRIC_NAMES`.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "AGE_BUCKETS",
    "BATCH_BUCKETS",
    "DROP_REASONS",
    "ERROR_TYPES",
    "METRIC_NAMES",
    "PROCESSING_BUCKETS",
    "Counter",
    "CounterVec",
    "DeviceGauge",
    "Gauge",
    "Histogram",
    "MetricsServer",
    "PipelineCollector",
    "PipelineView",
    "StageMetrics",
    "StageTotals",
    "WorkerView",
    "read_process_stats",
]

log = logging.getLogger(__name__)

PROCESSING_BUCKETS: Tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS: Tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
AGE_BUCKETS: Tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DROP_REASONS: Tuple[str, ...] = ("skipped", "queue_full", "error", "stale")
ERROR_TYPES: Tuple[str, ...] = ("decode", "process", "source")

# Every family the supervisor exports, with its help text. Dashboards and alerts are written
# against these names; renaming one is a breaking change.
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
    "edgepipe_source_frames_read_total": "Frames a source read from its device/stream/file.",
    "edgepipe_source_reconnects_total": "Times a source reconnected to its device or stream.",
    "edgepipe_source_last_frame_timestamp_seconds": "Capture time of the newest frame read.",
    "edgepipe_source_frames_per_second": "Frames read per second, recently.",
    "edgepipe_detector_batch_size": "Frames per inference batch.",
    "edgepipe_detector_inference_seconds": "Time spent in one forward pass.",
    "edgepipe_detector_info": "The detector's device, precision, backend and model (always 1).",
    "edgepipe_gpu_memory_allocated_bytes": "GPU memory the stage's process has allocated.",
    "edgepipe_sink_frame_age_seconds": "Capture-to-publish age of a frame as a sink delivers it.",
    "edgepipe_sink_messages_published_total": "Messages a sink delivered.",
    "edgepipe_sink_detections_total": "Detections a sink delivered.",
    "edgepipe_security_rejected_clients_total": "CURVE handshakes refused because the client's "
    "key is not in the allow-list (stages holding a CURVE server).",
    "edgepipe_worker_resident_memory_bytes": "Resident memory of the worker process.",
    "edgepipe_worker_cpu_seconds_total": "CPU time (user + system) of the worker process.",
    "edgepipe_worker_restarts_total": "Times the supervisor restarted this worker.",
    "edgepipe_worker_up": "1 while the worker process runs and is ready.",
    "edgepipe_build_info": "edgepipe and Python versions (always 1).",
}


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


class DeviceGauge:
    """Gauges keyed by device, existing only once set (GPU memory exists only on CUDA).

    ``set(nbytes)`` uses the device given to :meth:`StageMetrics.set_info` (else ``"cuda"``);
    ``set(nbytes, device="cuda:1")`` names it.
    """

    def __init__(self, owner: StageMetrics) -> None:
        self._owner = owner
        self.values: Dict[str, float] = {}

    def set(self, value: float, device: Optional[str] = None) -> None:
        if device is None:
            device = (self._owner.info or {}).get("device") or "cuda"
        self.values[str(device)] = float(value)


_COUNTERS = (
    "received", "sent", "busy_seconds", "frames_read", "reconnects", "published", "detections",
    "rejected_clients",
)
_GAUGES = ("last_progress", "last_frame_timestamp", "fps")
_HISTOGRAMS = {
    "processing_seconds": PROCESSING_BUCKETS,
    "batch_size": BATCH_BUCKETS,
    "inference_seconds": PROCESSING_BUCKETS,
    "frame_age": AGE_BUCKETS,
}
_VECS = {"dropped": ("reason", DROP_REASONS), "errors": ("type", ERROR_TYPES)}


class StageMetrics:
    """The measurements of one stage, kept in its worker and shipped to the supervisor.

    Constructed by the runtime (``StageMetrics(name, kind, detector=...)``) and handed to the
    stage as ``self.metrics``; standalone use (a plugin's unit test) is the same call. Every
    method is cheap and thread-safe (a source's grab thread may count reconnects).

    Counted by the worker loop around every call (a stage does not touch these):
      ``received``, ``sent`` (Counter), ``dropped.labels(reason)`` with reason in
      skipped|queue_full|error, ``errors.labels(type)`` with type in decode|process|source,
      ``processing_seconds`` (Histogram: one ``process()`` call, or for sources one ``read()``
      that returned a frame, which includes waiting on the device), ``busy_seconds`` (Counter,
      the same time summed), ``last_progress`` (Gauge, unix time), and for sources
      ``frames_read``, ``last_frame_timestamp``, ``fps``.

    Recorded by the stage itself, where it applies:
      - sources: ``metrics.reconnects.inc()`` after each reconnect to a camera/stream;
      - detectors: ``metrics.batch_size.observe(len(frames))``,
        ``metrics.inference_seconds.observe(seconds)`` per forward pass,
        ``metrics.set_info(device="cuda:0", precision="fp16", backend="torch", model="yolov5s")``
        once after loading, ``metrics.gpu_memory.set(nbytes)`` on CUDA only;
      - sinks: ``metrics.frame_age.observe(time.time() - frame.timestamp)`` and
        ``metrics.published.inc()`` per message delivered, ``metrics.detections.inc(n)``;
      - any stage dropping frames on purpose: ``metrics.dropped.labels("stale").inc()``;
      - a stage holding a CURVE server socket: ``metrics.curve_server = True`` once it is set
        up, and ``metrics.rejected_clients.inc()`` per refused handshake (the ZAP
        authenticator's thread does this through :func:`edgepipe.security.secure_server`).

    Exported as the ``edgepipe_stage_*`` families for every stage, ``edgepipe_source_*`` for
    sources, ``edgepipe_sink_*`` for sinks, ``edgepipe_detector_*`` for detectors (stages whose
    class ``produces`` "candidates", or any stage that records batch sizes/inference time/info),
    ``edgepipe_security_rejected_clients_total`` for stages with a CURVE server.
    """

    def __init__(self, stage: str, kind: str = "processor", detector: bool = False) -> None:
        self.stage = stage
        self.kind = kind
        self.detector = detector
        self.received = Counter()
        self.sent = Counter()
        self.busy_seconds = Counter()
        self.frames_read = Counter()
        self.reconnects = Counter()
        self.published = Counter()
        self.detections = Counter()
        self.rejected_clients = Counter()
        self.curve_server = False
        self.dropped = CounterVec("reason", DROP_REASONS)
        self.errors = CounterVec("type", ERROR_TYPES)
        self.last_progress = Gauge()
        self.last_frame_timestamp = Gauge()
        self.fps = Gauge()
        self.processing_seconds = Histogram(PROCESSING_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.inference_seconds = Histogram(PROCESSING_BUCKETS)
        self.frame_age = Histogram(AGE_BUCKETS)
        self.gpu_memory = DeviceGauge(self)
        self.info: Optional[Dict[str, str]] = None

    def set_info(self, **labels: Any) -> None:
        """Describe the detector: device, precision, backend, model (missing ones read "")."""
        keys = ("device", "precision", "backend", "model")
        unknown = set(labels) - set(keys)
        if unknown:
            raise ValueError(f"unknown info label(s) {sorted(unknown)}; known: {', '.join(keys)}")
        self.info = {k: str(labels.get(k, "")) for k in keys}

    @property
    def is_detector(self) -> bool:
        return bool(
            self.detector or self.info or self.batch_size.count or self.inference_seconds.count
        )

    def snapshot(self) -> Dict[str, Any]:
        """Plain data (msgpack/JSON-able) with every value; :meth:`from_snapshot` reverses it."""
        return {
            "stage": self.stage,
            "kind": self.kind,
            "detector": self.detector,
            "counters": {n: getattr(self, n).value for n in _COUNTERS},
            "vecs": {
                n: {k: c.value for k, c in getattr(self, n).children.items()} for n in _VECS
            },
            "gauges": {n: getattr(self, n).value for n in _GAUGES},
            "histograms": {
                n: [list(getattr(self, n).counts), getattr(self, n).sum] for n in _HISTOGRAMS
            },
            "gpu_memory": dict(self.gpu_memory.values),
            "info": dict(self.info) if self.info else None,
            "curve_server": self.curve_server,
        }

    @classmethod
    def from_snapshot(cls, snap: Dict[str, Any]) -> StageMetrics:
        """Rebuild from :meth:`snapshot` output; malformed parts raise ValueError/KeyError/TypeError."""
        m = cls(str(snap["stage"]), str(snap["kind"]), bool(snap.get("detector")))
        for n in _COUNTERS:
            getattr(m, n).value = float(snap["counters"][n])
        for n in _VECS:
            vec = getattr(m, n)
            for k, v in snap["vecs"][n].items():
                if k in vec.children:
                    vec.children[k].value = float(v)
        for n in _GAUGES:
            getattr(m, n).value = float(snap["gauges"][n])
        for n in _HISTOGRAMS:
            counts, total = snap["histograms"][n]
            h = getattr(m, n)
            if len(counts) != len(h.counts):
                raise ValueError(f"histogram {n!r} has {len(counts)} buckets, expected {len(h.counts)}")
            h.counts = [int(c) for c in counts]
            h.sum = float(total)
        m.gpu_memory.values = {str(k): float(v) for k, v in (snap.get("gpu_memory") or {}).items()}
        info = snap.get("info")
        m.info = {str(k): str(v) for k, v in info.items()} if info else None
        m.curve_server = bool(snap.get("curve_server"))
        return m

    def plus(self, later: StageMetrics) -> StageMetrics:
        """Counters and histograms summed; gauges, GPU memory and info from ``later``."""
        out = StageMetrics(self.stage, self.kind, self.detector or later.detector)
        for n in _COUNTERS:
            getattr(out, n).value = getattr(self, n).value + getattr(later, n).value
        for n in _VECS:
            for k, c in getattr(out, n).children.items():
                c.value = getattr(self, n).children[k].value + getattr(later, n).children[k].value
        for n in _GAUGES:
            getattr(out, n).value = getattr(later, n).value or getattr(self, n).value
        for n in _HISTOGRAMS:
            a, b, h = getattr(self, n), getattr(later, n), getattr(out, n)
            h.counts = [x + y for x, y in zip(a.counts, b.counts)]
            h.sum = a.sum + b.sum
        out.gpu_memory.values = dict(later.gpu_memory.values)
        out.info = later.info or self.info
        out.curve_server = self.curve_server or later.curve_server
        return out


class StageTotals:
    """The supervisor's view of one stage across worker incarnations (counters never go back).

    ``update(snapshot)`` replaces the live incarnation's numbers; ``worker_exited()`` folds them
    into the base so the next incarnation's counts add on top; ``current()`` is the sum.
    """

    def __init__(self, stage: str, kind: str, detector: bool = False) -> None:
        self.base = StageMetrics(stage, kind, detector)
        self.live = StageMetrics(stage, kind, detector)

    def update(self, snapshot: Dict[str, Any]) -> None:
        self.live = StageMetrics.from_snapshot(snapshot)
        self.live.detector = self.live.detector or self.base.detector

    def worker_exited(self) -> None:
        self.base = self.base.plus(self.live)
        self.live = StageMetrics(self.base.stage, self.base.kind, self.base.detector)
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
    """prometheus_client custom collector over a callable returning the current PipelineView."""

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

        view = self._view()
        fams: Dict[str, Any] = {}

        def fam(name: str, typ: Any, labels: Sequence[str]) -> Any:
            if name not in fams:
                fams[name] = typ(name, METRIC_NAMES[name], labels=list(labels))
            return fams[name]

        def hist(name: str, labels: List[str], h: Histogram) -> None:
            cum = h.cumulative()
            buckets = [(_fmt(b), float(c)) for b, c in zip(h.buckets, cum)]
            buckets.append(("+Inf", float(cum[-1])))
            fam(name, HistogramMetricFamily, ["stage"]).add_metric(labels, buckets, h.sum)

        for m, up in view.stages:
            s = [m.stage]
            fam("edgepipe_stage_frames_received_total", CounterMetricFamily, ["stage"]).add_metric(s, m.received.value)
            fam("edgepipe_stage_frames_sent_total", CounterMetricFamily, ["stage"]).add_metric(s, m.sent.value)
            for reason, c in m.dropped.children.items():
                fam("edgepipe_stage_frames_dropped_total", CounterMetricFamily, ["stage", "reason"]).add_metric([m.stage, reason], c.value)
            for typ, c in m.errors.children.items():
                fam("edgepipe_stage_errors_total", CounterMetricFamily, ["stage", "type"]).add_metric([m.stage, typ], c.value)
            hist("edgepipe_stage_processing_seconds", s, m.processing_seconds)
            fam("edgepipe_stage_busy_seconds_total", CounterMetricFamily, ["stage"]).add_metric(s, m.busy_seconds.value)
            fam("edgepipe_stage_last_progress_timestamp_seconds", GaugeMetricFamily, ["stage"]).add_metric(s, m.last_progress.value)
            fam("edgepipe_stage_up", GaugeMetricFamily, ["stage"]).add_metric(s, 1.0 if up else 0.0)
            if m.kind == "source":
                fam("edgepipe_source_frames_read_total", CounterMetricFamily, ["stage"]).add_metric(s, m.frames_read.value)
                fam("edgepipe_source_reconnects_total", CounterMetricFamily, ["stage"]).add_metric(s, m.reconnects.value)
                fam("edgepipe_source_last_frame_timestamp_seconds", GaugeMetricFamily, ["stage"]).add_metric(s, m.last_frame_timestamp.value)
                fam("edgepipe_source_frames_per_second", GaugeMetricFamily, ["stage"]).add_metric(s, m.fps.value)
            if m.is_detector:
                hist("edgepipe_detector_batch_size", s, m.batch_size)
                hist("edgepipe_detector_inference_seconds", s, m.inference_seconds)
                if m.info:
                    keys = ["device", "precision", "backend", "model"]
                    fam("edgepipe_detector_info", GaugeMetricFamily, ["stage", *keys]).add_metric([m.stage, *(m.info[k] for k in keys)], 1.0)
            for device, value in m.gpu_memory.values.items():
                fam("edgepipe_gpu_memory_allocated_bytes", GaugeMetricFamily, ["stage", "device"]).add_metric([m.stage, device], value)
            if m.kind == "sink":
                hist("edgepipe_sink_frame_age_seconds", s, m.frame_age)
                fam("edgepipe_sink_messages_published_total", CounterMetricFamily, ["stage"]).add_metric(s, m.published.value)
                fam("edgepipe_sink_detections_total", CounterMetricFamily, ["stage"]).add_metric(s, m.detections.value)
            if m.curve_server:
                fam("edgepipe_security_rejected_clients_total", CounterMetricFamily, ["stage"]).add_metric(s, m.rejected_clients.value)
        for w in view.workers:
            n = [w.name]
            fam("edgepipe_worker_resident_memory_bytes", GaugeMetricFamily, ["worker"]).add_metric(n, w.rss)
            fam("edgepipe_worker_cpu_seconds_total", CounterMetricFamily, ["worker"]).add_metric(n, w.cpu_seconds)
            fam("edgepipe_worker_restarts_total", CounterMetricFamily, ["worker"]).add_metric(n, float(w.restarts))
            fam("edgepipe_worker_up", GaugeMetricFamily, ["worker"]).add_metric(n, 1.0 if w.up else 0.0)
        fam("edgepipe_build_info", GaugeMetricFamily, ["version", "python"]).add_metric(
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

