"""Metrics plumbing without a daemon: the stage-side API, snapshots, totals across worker
restarts, the collector's exposition (checked by promtool) and the HTTP endpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request

import msgpack
import pytest

from edgepipe.metrics import (
    BATCH_BUCKETS,
    MetricsError,
    MetricsServer,
    PipelineView,
    StageMetrics,
    StageTotals,
    WorkerView,
    check_series,
    iter_samples,
    read_process_stats,
)


def detector_metrics(stage: str = "det") -> StageMetrics:
    """The series a detector stage declares, as the yolov5 plugin does."""
    m = StageMetrics(stage, "processor")
    m.histogram("edgepipe_detector_batch_size", "Frames per inference batch.", BATCH_BUCKETS)
    m.gauge("edgepipe_detector_info", "The detector.", labels=("device", "precision", "backend", "model"))
    m.gauge("edgepipe_gpu_memory_allocated_bytes", "GPU memory.", labels=("device",))
    return m


def test_stage_api_and_snapshot_roundtrip():
    m = detector_metrics()
    m.received.inc(3)
    m.dropped.labels("stale").inc()
    m.errors.labels("process").inc(2)
    m.processing_seconds.observe(0.003)
    m.processing_seconds.observe(7.0)  # above every bucket: +Inf only
    m.get("edgepipe_detector_batch_size").observe(3)
    m.get("edgepipe_detector_info").labels(device="cuda:0", precision="fp16", backend="torch", model="yolov5s").set(1)
    m.get("edgepipe_gpu_memory_allocated_bytes").labels("cuda:0").set(1234)
    m.report_problem("cannot reach  the broker\n(refused)")
    snap = msgpack.unpackb(msgpack.packb(m.snapshot()))  # what a heartbeat carries
    back = StageMetrics.from_snapshot(snap)
    assert back.snapshot() == m.snapshot()
    assert back.processing_seconds.cumulative()[-1] == 2 and back.processing_seconds.counts[-1] == 1
    assert back.get("edgepipe_detector_batch_size").children[()].counts[2] == 1  # 3 falls in the le=4 bucket
    assert back.get("edgepipe_gpu_memory_allocated_bytes").labels("cuda:0").value == 1234.0
    assert back.problem == "cannot reach the broker (refused)"  # one line
    with pytest.raises(ValueError, match="reason 'late' is not one of skipped, queue_full, error, stale"):
        m.dropped.labels("late")
    with pytest.raises(ValueError, match=r"has labels \['device', 'precision', 'backend', 'model'\], got \['gpu'\]"):
        m.get("edgepipe_detector_info").labels(gpu="x")
    with pytest.raises(ValueError):
        m.received.inc(-1)
    with pytest.raises(KeyError, match="declared no series 'edgepipe_nope'"):
        m.get("edgepipe_nope")


@pytest.mark.parametrize(
    "declare, message",
    [
        (lambda m: m.counter("frames_total", "x"), "series 'frames_total': a series name is 'edgepipe_'"),
        (lambda m: m.counter("edgepipe_Frames_total", "x"), "a series name is 'edgepipe_'"),
        (lambda m: m.counter("edgepipe_frames", "x"), "a counter's name ends in '_total'"),
        (lambda m: m.gauge("edgepipe_frames_total", "x"), "only a counter's name ends in '_total'"),
        (lambda m: m.gauge("edgepipe_stage_up", "x"), "the runtime exports this core series itself"),
        (lambda m: m.gauge("edgepipe_thing_count", "x"), "taken by Prometheus' own samples"),
        (lambda m: m.gauge("edgepipe_x", "x", labels=("stage",)), "label 'stage' is reserved"),
        (lambda m: m.gauge("edgepipe_x", "x", labels=("Zone",)), "label 'Zone' is not lower-case"),
        (lambda m: m.gauge("edgepipe_x", "x", labels=("a", "a")), "a label is named twice"),
        (lambda m: m.histogram("edgepipe_x_seconds", "x", (1, 0.5)), "bucket bounds, increasing"),
        (lambda m: m.gauge("edgepipe_x", "  "), "a series needs a help text"),
    ],
)
def test_a_badly_declared_series_is_refused_naming_stage_and_series(declare, message):
    m = StageMetrics("zones", "processor")
    with pytest.raises(MetricsError, match=re.escape(message)) as exc:
        declare(m)
    assert str(exc.value).startswith("stage 'zones': series ") and "\n" not in str(exc.value)


def test_declaring_again_returns_the_series_and_a_different_redeclaration_is_refused():
    m = StageMetrics("pub", "sink")
    first = m.counter("edgepipe_sink_messages_published_total", "Messages.")
    assert m.counter("edgepipe_sink_messages_published_total", "Messages.") is first
    with pytest.raises(MetricsError, match="declared twice differently \\(a counter and a counter with labels topic\\)"):
        m.counter("edgepipe_sink_messages_published_total", "Messages.", labels=("topic",))


def test_check_series_refuses_clashes_between_stages_only():
    counter = {"kind": "counter", "name": "edgepipe_sink_messages_published_total", "help": "A.", "labels": [], "buckets": None}
    same_other_help = dict(counter, help="Messages delivered, said differently.")
    as_gauge = dict(counter, kind="gauge", name="edgepipe_queue_depth")
    labelled = dict(counter, labels=["topic"])
    assert check_series({"jsonl": [counter], "pub": [same_other_help], "q": [as_gauge]}) == []
    errors = check_series({"jsonl": [counter], "mqtt": [labelled]})
    assert errors == [
        "stage 'mqtt': series 'edgepipe_sink_messages_published_total' clashes with stage 'jsonl''s: "
        "a counter with labels topic here, a counter there"
    ]


def test_totals_stay_monotonic_across_worker_restarts():
    t = StageTotals("cam", "source")
    first = StageMetrics("cam", "source")
    first.frames_read.inc(100)
    first.counter("edgepipe_source_reconnects_total", "Reconnects.").inc(3)
    first.gauge("edgepipe_camera_open", "1 while open.").set(1)
    first.last_progress.set(50.0)
    first.report_problem("lost the camera")
    t.update(first.snapshot())
    t.worker_exited()  # the worker died: a new incarnation counts from zero
    assert t.current().frames_read.value == 100
    assert t.current().get("edgepipe_source_reconnects_total").value == 3
    assert t.current().get("edgepipe_camera_open").value == 1  # the last state known
    assert t.current().last_progress.value == 50.0  # the gauge keeps its last value
    assert t.current().problem is None  # a dead incarnation's problem is not the next one's
    second = StageMetrics("cam", "source")
    second.frames_read.inc(5)
    second.counter("edgepipe_source_reconnects_total", "Reconnects.").inc(1)
    second.gauge("edgepipe_camera_open", "1 while open.").set(0)
    second.last_progress.set(60.0)
    t.update(second.snapshot())
    cur = t.current()
    assert cur.frames_read.value == 105 and cur.last_progress.value == 60.0
    assert cur.get("edgepipe_source_reconnects_total").value == 4
    assert cur.get("edgepipe_camera_open").value == 0  # gauges describe the present


def test_process_stats_from_proc():
    rss, cpu = read_process_stats(os.getpid())
    assert rss > 10e6 and cpu > 0
    assert read_process_stats(2**22 + 1) is None


def _serve(view, health=lambda: (True, {"status": "ok"}), auth=None):
    server = MetricsServer("127.0.0.1:0", view, health, auth)
    server.start()
    return server


def _get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_exposition_families_by_kind_pass_promtool():
    src, det, sink = StageMetrics("cam", "source"), detector_metrics(), StageMetrics("pub", "sink")
    sink.counter("edgepipe_sink_messages_published_total", "Messages a sink delivered.").inc(2)
    sink.report_problem("broker unreachable")
    w = WorkerView("det")
    w.restarts = 2
    view = PipelineView([(src, True), (det, True), (sink, False)], [w], "9.9.9")
    server = _serve(lambda: view)
    try:
        code, text = _get(f"http://{server.address}/metrics")
    finally:
        server.close()
    assert code == 200
    samples = list(iter_samples(text))
    names = {n for n, _, _ in samples}
    assert "edgepipe_source_frames_read_total" in names and "edgepipe_sink_messages_published_total" in names
    assert "edgepipe_detector_batch_size_bucket" in names
    assert "edgepipe_detector_info" not in names  # no info set yet
    assert "edgepipe_gpu_memory_allocated_bytes" not in names  # CUDA only
    by = {(n, tuple(sorted(lab.items()))): v for n, lab, v in samples}
    assert by[("edgepipe_stage_up", (("stage", "pub"),))] == 0.0
    assert by[("edgepipe_sink_messages_published_total", (("stage", "pub"),))] == 2.0  # declared, labelled by stage
    assert by[("edgepipe_stage_healthy", (("stage", "pub"),))] == 0.0
    assert by[("edgepipe_stage_healthy", (("stage", "cam"),))] == 1.0
    assert by[("edgepipe_worker_restarts_total", (("worker", "det"),))] == 2.0
    assert by[("edgepipe_build_info", (("python", __import__("platform").python_version()), ("version", "9.9.9")))] == 1.0
    sources = {lab["stage"] for n, lab, _ in samples if n == "edgepipe_source_frames_read_total"}
    assert sources == {"cam"}
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_healthz_codes_and_basic_auth():
    state = {"ok": True}
    server = _serve(
        lambda: PipelineView([], [], "0"),
        lambda: (state["ok"], {"status": "ok" if state["ok"] else "stalled", "stalled": [] if state["ok"] else ["cam"]}),
        auth="ops:s3cret",
    )
    base = f"http://{server.address}"
    good = {"Authorization": "Basic b3BzOnMzY3JldA=="}
    try:
        assert _get(f"{base}/healthz")[0] == 401
        assert _get(f"{base}/metrics", {"Authorization": "Basic b3BzOndyb25n"})[0] == 401
        code, body = _get(f"{base}/healthz", good)
        assert code == 200 and json.loads(body)["status"] == "ok"
        state["ok"] = False
        code, body = _get(f"{base}/healthz", good)
        assert code == 503 and json.loads(body)["stalled"] == ["cam"]
        assert _get(f"{base}/nope", good)[0] == 404
    finally:
        server.close()


def test_listen_address_errors():
    with pytest.raises(ValueError, match="listen address 'localhost' is not HOST:PORT"):
        MetricsServer("localhost", lambda: PipelineView([], [], "0"), lambda: (True, {}))
