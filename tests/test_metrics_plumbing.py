"""Metrics plumbing without a daemon: the stage-side API, snapshots, totals across worker
restarts, the collector's exposition (checked by promtool) and the HTTP endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

import msgpack
import pytest

from edgepipe.metrics import (
    MetricsServer,
    PipelineView,
    StageMetrics,
    StageTotals,
    WorkerView,
    iter_samples,
    read_process_stats,
)


def test_stage_api_and_snapshot_roundtrip():
    m = StageMetrics("det", "processor", detector=True)
    m.received.inc(3)
    m.dropped.labels("stale").inc()
    m.errors.labels("process").inc(2)
    m.processing_seconds.observe(0.003)
    m.processing_seconds.observe(7.0)  # above every bucket: +Inf only
    m.batch_size.observe(3)
    m.set_info(device="cuda:0", precision="fp16", backend="torch", model="yolov5s")
    m.gpu_memory.set(1234)
    snap = msgpack.unpackb(msgpack.packb(m.snapshot()))  # what a heartbeat carries
    back = StageMetrics.from_snapshot(snap)
    assert back.snapshot() == m.snapshot()
    assert back.processing_seconds.cumulative()[-1] == 2 and back.processing_seconds.counts[-1] == 1
    assert back.batch_size.counts[2] == 1  # 3 falls in the le=4 bucket
    assert back.gpu_memory.values == {"cuda:0": 1234.0}  # device taken from set_info
    with pytest.raises(ValueError, match="reason 'late' is not one of skipped, queue_full, error, stale"):
        m.dropped.labels("late")
    with pytest.raises(ValueError, match=r"unknown info label\(s\) \['gpu'\]"):
        m.set_info(gpu="x")
    with pytest.raises(ValueError):
        m.received.inc(-1)


def test_totals_stay_monotonic_across_worker_restarts():
    t = StageTotals("cam", "source")
    first = StageMetrics("cam", "source")
    first.frames_read.inc(100)
    first.frame_age.observe(0.02)
    first.last_progress.set(50.0)
    t.update(first.snapshot())
    t.worker_exited()  # the worker died: a new incarnation counts from zero
    assert t.current().frames_read.value == 100
    assert t.current().last_progress.value == 50.0  # the gauge keeps its last value
    second = StageMetrics("cam", "source")
    second.frames_read.inc(5)
    second.frame_age.observe(0.02)
    second.last_progress.set(60.0)
    t.update(second.snapshot())
    cur = t.current()
    assert cur.frames_read.value == 105 and cur.frame_age.count == 2 and cur.last_progress.value == 60.0


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
    src, det, sink = StageMetrics("cam", "source"), StageMetrics("det", "processor", detector=True), StageMetrics("pub", "sink")
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
