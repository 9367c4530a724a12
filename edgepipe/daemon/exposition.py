"""The daemon's one HTTP endpoint: ``/metrics`` (Prometheus text, through a custom collector over
the supervisor's per-stage totals and per-worker process samples) and ``/healthz`` (JSON).

Every family carries ``stage`` (or ``worker``); the core families are in
:data:`edgepipe.metrics.METRIC_NAMES`, then each stage's declared series follow with their own
help text and labels. Worker resident memory and CPU time come from ``/proc``.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from edgepipe.metrics import METRIC_NAMES, Histogram, StageMetrics

__all__ = [
    "MetricsServer",
    "PipelineCollector",
    "PipelineView",
    "WorkerView",
    "iter_samples",
    "read_process_stats",
    "split_listen",
]


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

