"""The daemon for real: supervisor and worker processes, ipc/inproc links, signals, restarts,
reload, metrics. Stages come from the third-party test package (tests/data/thirdparty_plugin),
installed into the venv once per session, so these tests need no camera, model or GPU."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from helpers.daemon import Daemon, install_test_plugins, process_group_members, read_jsonl

from edgepipe.metrics import DROP_REASONS, ERROR_TYPES
from edgepipe.transport import HWM


@pytest.fixture(scope="module", autouse=True)
def _plugins() -> None:
    install_test_plugins()


def ids_by_source(records):
    out = collections.defaultdict(list)
    for r in records:
        out[r["source"]].append(r["frame_id"])
    return out


# -- finite pipelines: exactly once, fan-in, fan-out, grouping, batching --------------------------


def test_finite_pipeline_delivers_every_frame_exactly_once(tmp_path):
    """Two finite sources into one batching processor (fan-in), which shares a worker with one
    sink (inproc link) and feeds a second sink in its own process (fan-out, ipc link). Under the
    default 'block' policy every frame arrives once, in order, and the daemon exits 0 alone."""
    n = 150
    config = {
        "name": "finite",
        "stages": {
            "a": {"type": "counter", "count": n},
            "b": {"type": "counter", "count": n},
            "mid": {"type": "passthrough", "inputs": ["a", "b"], "worker": "g", "max_batch": 4, "max_wait_ms": 20},
            "near": {"type": "record", "inputs": ["mid"], "worker": "g", "path": str(tmp_path / "near.jsonl")},
            "far": {"type": "record", "inputs": ["mid"], "path": str(tmp_path / "far.jsonl")},
        },
    }
    with Daemon(config, tmp_path) as d:
        d.wait_ready()
        assert sorted(d.worker_pids()) == ["a", "b", "far", "g"]
        assert d.wait(60) == 0
        d.assert_no_leftovers()
    for sink in ("near", "far"):
        ids = ids_by_source(read_jsonl(tmp_path / f"{sink}.jsonl"))
        assert ids == {"a": list(range(n)), "b": list(range(n))}, sink
    near = read_jsonl(tmp_path / "near.jsonl")
    assert max(r["meta"]["batch"] for r in near) > 1  # batches formed across the two sources
    assert all(r["meta"]["batch"] <= 4 for r in near)
    assert len({r["meta"]["pid"] for r in near}) == 1 and near[0]["pid"] == near[0]["meta"]["pid"]
    summary = d.wait_for_line(r"Finished in [0-9.]+ s: (.*)").group(1)
    assert f"a {n} frames" in summary and f"mid {2 * n} frames" in summary
    assert f"far {2 * n} frames" in summary


def test_slow_block_link_applies_backpressure_without_loss(tmp_path):
    """A slow sink behind a fast finite source: the source waits instead of dropping."""
    config = {
        "name": "slow",
        "stages": {
            "src": {"type": "counter", "count": 40},
            "slow": {"type": "passthrough", "inputs": ["src"], "sleep_ms": 10},
            "out": {"type": "record", "inputs": ["slow"], "path": str(tmp_path / "out.jsonl")},
        },
    }
    with Daemon(config, tmp_path) as d:
        d.wait_ready()
        assert d.wait(60) == 0
    assert [r["frame_id"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(40))


# -- start-up failures --------------------------------------------------------------------------


def _run(tmp_path: Path, config: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "edgepipe", "run", str(path)],
        capture_output=True, text=True, timeout=timeout, start_new_session=True,
    )


def test_preflight_check_fails_before_any_worker(tmp_path):
    config = {
        "name": "pre",
        "stages": {
            "src": {"type": "counter", "fail_check": True},
            "out": {"type": "record", "inputs": ["src"], "path": str(tmp_path / "o.jsonl")},
        },
        "metrics": {"listen": "127.0.0.1:0"},
    }
    r = _run(tmp_path, config)
    assert r.returncode == 1
    assert r.stderr.strip() == "edgepipe: error: stages.src: counter 'src': no such device (fail_check is set)"
    assert not (tmp_path / "o.jsonl").exists()  # the sink never started


def test_start_failure_exits_nonzero_with_the_reason(tmp_path):
    config = {
        "name": "startfail",
        "stages": {
            "src": {"type": "counter", "fail_start": True},
            "out": {"type": "record", "inputs": ["src"], "path": str(tmp_path / "o.jsonl")},
        },
        "metrics": {"listen": "127.0.0.1:0"},
    }
    r = _run(tmp_path, config)
    assert r.returncode == 1, r.stderr
    assert "Worker 'src' failed to start: counter 'src': cannot open (fail_start is set)" in r.stderr


def test_taken_metrics_port_fails_fast(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        config = {
            "name": "port",
            "stages": {
                "src": {"type": "counter", "count": 1},
                "out": {"type": "record", "inputs": ["src"], "path": str(tmp_path / "o.jsonl")},
            },
            "metrics": {"listen": f"127.0.0.1:{port}"},
        }
        r = _run(tmp_path, config)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"edgepipe: error: metrics.listen: cannot listen on '127.0.0.1:{port}': Address already in use"
    )


def test_configured_runtime_dir_is_made_private_or_refused(tmp_path):
    """ipc sockets must live in a 0700 directory: a configured runtime.dir of ours that others may
    enter is tightened to 0700; one that others may write in, or another user's, is refused with
    one line before any worker starts, and left as it was."""
    base = Path(tempfile.mkdtemp(prefix="ep-", dir="/tmp"))  # short: ipc paths have a length limit
    try:
        loose = base / "loose"
        loose.mkdir()
        loose.chmod(0o755)
        config = {
            "name": "private",
            "stages": {
                "src": {"type": "counter", "count": 3},
                "out": {"type": "record", "inputs": ["src"], "path": str(tmp_path / "o.jsonl")},
            },
            "metrics": {"listen": "127.0.0.1:0"},
            "runtime": {"dir": str(loose)},
        }
        r = _run(tmp_path, config)
        assert r.returncode == 0, r.stderr
        assert f"Tightened runtime dir {str(loose)!r} from mode 0755 to 0700" in r.stderr
        assert stat.S_IMODE(loose.stat().st_mode) == 0o700
        assert [x["frame_id"] for x in read_jsonl(tmp_path / "o.jsonl")] == [0, 1, 2]

        shared = base / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        if os.geteuid() == 0:
            foreign = base / "foreign"
            foreign.mkdir(mode=0o700)
            os.chown(foreign, 65534, 65534)
        else:
            foreign = Path("/usr")  # root's; a non-root daemon must not take it
        uid = foreign.stat().st_uid
        for where, why in (
            (shared, "is writable by other users (mode 1777); ipc sockets need a private directory: "
                     "name one of this daemon's own (it is created 0700)"),
            (foreign, f"belongs to uid {uid}, not to this daemon's uid {os.geteuid()}; ipc sockets "
                      "need a private directory of its own"),
        ):
            before = (stat.S_IMODE(where.stat().st_mode), sorted(os.listdir(where)))
            config["runtime"]["dir"] = str(where)
            r = _run(tmp_path, config)
            assert r.returncode == 1
            assert r.stderr.strip() == f"edgepipe: error: runtime.dir: runtime dir {str(where)!r} {why}"
            assert (stat.S_IMODE(where.stat().st_mode), sorted(os.listdir(where))) == before
    finally:
        shutil.rmtree(base)


def test_crash_loop_gives_up_with_the_reason(tmp_path):
    config = {
        "name": "crashloop",
        "stages": {
            "src": {"type": "counter", "fps": 50, "fail_after": 3},
            "out": {"type": "record", "inputs": ["src"], "path": str(tmp_path / "o.jsonl")},
        },
        "metrics": {"listen": "127.0.0.1:0"},
        "runtime": {"restart_limit": 3, "restart_window": 60},
    }
    t0 = time.monotonic()
    r = _run(tmp_path, config)
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < 30
    assert r.stderr.count("Worker 'src' died (counter 'src': device lost after 3 frames); restarting in") == 2
    assert "Giving up: worker 'src' (stages src) failed 3 times within 60 s; last: counter 'src': device lost after 3 frames" in r.stderr
    # Frames flowed between crashes ('latest' link: some may be skipped, none beyond the third).
    ids = [x["frame_id"] for x in read_jsonl(tmp_path / "o.jsonl")]
    assert ids and set(ids) <= {0, 1, 2}


# -- a live daemon, shared by the tests below (they run in file order) -------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    rundir = tempfile.mkdtemp(prefix="ep-", dir="/tmp")  # short: ipc paths have a length limit
    config = {
        "name": "live",
        "stages": {
            "src": {"type": "counter", "fps": 40},
            "mid": {"type": "passthrough", "inputs": ["src"], "tag": "one"},
            "out": {"type": "record", "inputs": ["mid"], "path": str(tmp / "out.jsonl")},
            "slow": {"type": "passthrough", "inputs": ["src"], "sleep_ms": 100},
            "slowout": {"type": "record", "inputs": ["slow"], "path": str(tmp / "slow.jsonl")},
        },
        "runtime": {"dir": rundir, "hang_timeout": 3},
    }
    with Daemon(config, tmp) as d:
        d.out = tmp / "out.jsonl"
        d.rundir = rundir
        d.wait_ready()
        yield d
    os.rmdir(rundir)


def test_live_metrics_exist_from_the_start_and_pass_promtool(live):
    text = live.metrics_text()
    for stage in ("src", "mid", "out", "slow", "slowout"):
        for reason in DROP_REASONS:
            assert f'edgepipe_stage_frames_dropped_total{{reason="{reason}",stage="{stage}"}}' in text
        for typ in ERROR_TYPES:
            assert f'edgepipe_stage_errors_total{{stage="{stage}",type="{typ}"}}' in text
        assert f'edgepipe_stage_processing_seconds_bucket{{le="0.001",stage="{stage}"}}' in text
        assert f'edgepipe_worker_up{{worker="{stage}"}} 1.0' in text
    assert 'edgepipe_source_frames_read_total{stage="src"}' in text
    assert 'edgepipe_sink_frame_age_seconds_bucket{le="10.0",stage="out"}' in text
    assert "edgepipe_source_frames_read_total{stage=\"mid\"}" not in text  # sources only
    assert 'edgepipe_build_info{python=' in text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert live.wait_until(lambda: (live.sample("edgepipe_worker_resident_memory_bytes", worker="mid") or 0) > 10e6)
    code, body = live.healthz()
    assert code == 200 and body["status"] == "ok" and body["stalled"] == [], body


def test_live_counts_flow_and_fps(live):
    live.wait_until(lambda: (live.sample("edgepipe_sink_messages_published_total", stage="out") or 0) > 40)
    fps = live.wait_until(lambda: live.sample("edgepipe_source_frames_per_second", stage="src"))
    assert 25 < fps < 55
    read = live.sample("edgepipe_source_frames_read_total", stage="src")
    sent = live.sample("edgepipe_stage_frames_sent_total", stage="src")
    assert read == sent and read > 0


def test_latest_policy_skips_behind_a_slow_stage_and_keeps_latency_bounded(live):
    # 'slow' takes 100 ms per frame behind a 40 fps source: it takes the newest frame each time
    # and the older ones are skipped (or dropped at the source's full link), so what it
    # processes is fresh and its queue never grows.
    def values():
        return {(n, tuple(sorted(lab.items()))): v for n, lab, v in live.samples()}

    def get(v, name, **labels):
        return v[(name, tuple(sorted(labels.items())))]

    live.wait_until(
        lambda: get(values(), "edgepipe_stage_frames_dropped_total", stage="slow", reason="skipped") > 20,
        message="skips counted",
    )
    v = values()
    src = get(v, "edgepipe_source_frames_read_total", stage="src")
    received = get(v, "edgepipe_stage_frames_received_total", stage="slow")
    skipped = get(v, "edgepipe_stage_frames_dropped_total", stage="slow", reason="skipped")
    processed = get(v, "edgepipe_stage_processing_seconds_count", stage="slow")
    assert processed < 0.5 * src
    assert 0 <= received - skipped - processed <= 2  # at most the frame in hand is pending
    # Frame age at the slow branch's sink stays near one processing time, not growing.
    age = get(v, "edgepipe_sink_frame_age_seconds_sum", stage="slowout") / get(
        v, "edgepipe_sink_frame_age_seconds_count", stage="slowout"
    )
    assert age < 0.5


def test_malformed_messages_are_counted_not_fatal(live):
    pid = live.worker_pids()["mid"]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{live.rundir}/mid.in")
    for junk in ([b"\xc1garbage"], [b"\x81\xa1v\x01"], [b"not msgpack", b"x"]):
        push.send_multipart(junk)
    push.close(linger=2000)
    ctx.term()
    live.wait_until(lambda: live.sample("edgepipe_stage_errors_total", stage="mid", type="decode") == 3)
    assert live.sample("edgepipe_stage_frames_dropped_total", stage="mid", reason="error") == 3
    assert live.worker_pids()["mid"] == pid


def test_kill_9_worker_is_restarted_and_counters_stay_monotonic(live):
    pids = live.worker_pids()
    before = live.sample("edgepipe_stage_frames_received_total", stage="mid")
    os.kill(pids["mid"], signal.SIGKILL)
    live.wait_for_line(r"Worker 'mid' died \(killed by SIGKILL\); restarting in 0.5 s")
    live.wait_for_line(r"Worker 'mid' is up again")
    new = live.wait_until(lambda: live.worker_pids().get("mid"))
    assert new != pids["mid"]
    assert live.worker_pids()["src"] == pids["src"]  # nothing else restarted
    assert live.sample("edgepipe_worker_restarts_total", worker="mid") == 1
    # Messages resume from the new process.
    live.wait_until(lambda: any(r["meta"]["pid"] == new for r in read_jsonl(live.out)), message="frames via new mid")
    live.wait_until(
        lambda: live.sample("edgepipe_stage_frames_received_total", stage="mid") > before,
        message="received counter grows on from its value before the restart",
    )


def test_kill_9_of_a_source_continues_its_frame_ids(live):
    """The restarted source goes on from the last id it sent: subscribers never see a source's
    ids go back (DESIGN: frame_id is per source and increasing)."""
    pids = live.worker_pids()
    start = len(live.lines)
    seen = len(read_jsonl(live.out))
    os.kill(pids["src"], signal.SIGKILL)
    live.wait_for_line(r"Worker 'src' died \(killed by SIGKILL\); restarting in 0.5 s", start=start)
    live.wait_for_line(r"Worker 'src' is up again", start=start)
    live.wait_until(lambda: len(read_jsonl(live.out)) > seen + 20, message="frames from the new source")
    ids = [r["frame_id"] for r in read_jsonl(live.out)]
    assert ids == sorted(set(ids)), "frame ids must keep increasing across the source's restart"
    assert "ignores its resume id" not in live.log


def test_sighup_reconfigures_in_place_or_restarts_only_what_changed(live):
    pids = live.worker_pids()
    start = len(live.lines)
    cfg = live.config
    cfg["stages"]["mid"]["tag"] = "two"  # passthrough changes its tag in place
    live.write_config(cfg)
    live.send(signal.SIGHUP)
    live.wait_for_line(r"Reloaded .*: 4 worker\(s\) unchanged, 1 reconfiguring, 0 restarted", start=start)
    live.wait_for_line(r"Stage 'mid' reconfigured in place", start=start)
    live.wait_until(lambda: any(r["meta"]["tag"] == "two" for r in read_jsonl(live.out)), message="new tag")
    assert live.worker_pids() == pids

    start = len(live.lines)
    cfg["stages"]["mid"]["max_batch"] = 2  # batching changes the worker's plan: restart mid only
    live.write_config(cfg)
    live.send(signal.SIGHUP)
    live.wait_for_line(r"Reloaded .*: 4 worker\(s\) unchanged, 0 reconfiguring, 1 restarted", start=start)
    live.wait_until(lambda: live.worker_pids().get("mid") not in (None, pids["mid"]), message="mid restarted")
    now = live.worker_pids()
    assert {k: v for k, v in now.items() if k != "mid"} == {k: v for k, v in pids.items() if k != "mid"}

    start = len(live.lines)
    cfg["stages"]["mid"]["max_batch"] = 0  # invalid: refused, the pipeline keeps running
    live.write_config(cfg)
    live.send(signal.SIGHUP)
    live.wait_for_line(
        r"Reload refused, still running the previous config: stages.mid.max_batch: Input should be greater than or equal to 1 \(got 0\)",
        start=start,
    )
    assert live.worker_pids() == now
    n = live.sample("edgepipe_sink_messages_published_total", stage="out")
    live.wait_until(lambda: live.sample("edgepipe_sink_messages_published_total", stage="out") > n + 10)


def test_hung_worker_is_killed_and_restarted(live):
    cfg = live.config
    cfg["stages"]["mid"]["max_batch"] = 1
    cfg["stages"]["mid"]["hang_at"] = 0  # mid stops responding on its next frame
    start = len(live.lines)
    live.write_config(cfg)
    live.send(signal.SIGHUP)
    live.wait_for_line(r"Worker 'mid' sent no heartbeat for [34] s; killing it", timeout=30, start=start)
    live.wait_for_line(r"Worker 'mid' died \(no heartbeat for [34] s \(hung\)\); restarting in", start=start)
    code, body = live.healthz()
    # Put it back before it crash-loops.
    del cfg["stages"]["mid"]["hang_at"]
    live.write_config(cfg)
    live.send(signal.SIGHUP)
    live.wait_until(lambda: live.healthz()[0] == 200, timeout=30, message="healthy again")


def test_sigterm_to_the_group_drains_and_exits_0(live):
    members = process_group_members(live.pid)
    assert len(members) == 6  # supervisor and five workers
    assert live.stop(group=True) == 0
    assert "Stopping: draining in-flight frames (at most 10 s)" in live.log
    assert live.log.rstrip().endswith("supervisor: Stopped")
    assert not os.path.exists(os.path.join(live.rundir, "mid.in"))


def test_a_restarted_finite_source_continues_where_it_stopped(tmp_path):
    """kill -9 of an images source in a 'block' pipeline: the new worker goes on with the file
    after the last one sent, under the same ids, so nothing is delivered twice. Only frames the
    dead worker still held may be missing: at most one hole, where it died."""
    shots = tmp_path / "shots"
    shots.mkdir()
    n = 40
    for i in range(n):
        cv2.imwrite(str(shots / f"{i:03d}.png"), np.full((24, 32), i, np.uint8))
    out = tmp_path / "out.jsonl"
    config = {
        "name": "resume",
        "stages": {
            "shots": {"type": "images", "path": str(shots), "fps": 20},
            "out": {"type": "record", "inputs": ["shots"], "path": str(out)},
        },
    }
    with Daemon(config, tmp_path) as d:
        d.wait_ready()
        d.wait_until(lambda: len(read_jsonl(out)) >= 10, message="frames before the kill")
        os.kill(d.worker_pids()["shots"], signal.SIGKILL)
        d.wait_for_line(r"Worker 'shots' died \(killed by SIGKILL\)")
        assert d.wait(60) == 0
    resumed = int(d.wait_for_line(rf"Resuming {re.escape(repr(str(shots)))} at image (\d+) after a restart").group(1))
    records = read_jsonl(out)
    ids = [r["frame_id"] for r in records]
    before = [x for x in ids if x < resumed]
    assert ids == list(range(len(before))) + list(range(resumed, n)), ids
    # Lost: what the dead worker's link still held (its send queue and the frame in hand).
    assert resumed - len(before) <= HWM["block"] + 1, f"{resumed - len(before)} frames lost at the kill"
    assert all(r["pixel"] == r["frame_id"] for r in records)  # each id with its own picture


# -- health: counted from the start of the run, naming only the stage that holds things up ------


@pytest.fixture(scope="module")
def health(tmp_path_factory):
    """src goes dark for 6 s before its frame 40 (src -> mid -> out); a second branch's source
    takes 3 s to start (late -> lateout), so the other workers are ready 3 s before the pipeline
    runs. stall_timeout 1.5 s everywhere; the supervisor talks to a notify socket with a 1 s
    watchdog (a ping every 0.5 s while healthy)."""
    from test_systemd import NotifySocket, Recorder

    tmp = tmp_path_factory.mktemp("health")
    quick = {"stall_timeout": 1.5}
    config = {
        "name": "health",
        "stages": {
            "src": dict(quick, type="counter", fps=20, outage_at=40, outage_s=6),
            "mid": dict(quick, type="passthrough", inputs=["src"]),
            "out": dict(quick, type="record", inputs=["mid"], path=str(tmp / "out.jsonl")),
            "late": dict(quick, type="counter", fps=20, start_delay=3),
            "lateout": dict(quick, type="record", inputs=["late"], path=str(tmp / "late.jsonl")),
        },
        "runtime": {"heartbeat_interval": 1.0},
    }
    server = NotifySocket(str(tmp / "notify"))
    recorder = Recorder(server)
    d = Daemon(config, tmp)
    d.env["NOTIFY_SOCKET"] = str(tmp / "notify")
    d.env["WATCHDOG_USEC"] = "1000000"
    d.recorder = recorder
    try:
        with d:
            d.wait_ready()
            d.ready_at = time.monotonic()
            yield d
            assert d.stop() == 0
    finally:
        recorder.close()
        server.close()


def test_healthy_right_after_ready_although_most_workers_were_ready_long_before(health):
    """Four workers were ready 3 s (twice their stall_timeout) before the slow one: /healthz says
    200 from the first moment, and the first watchdog ping follows READY=1 at once."""
    while time.monotonic() < health.ready_at + 1.0:
        code, body = health.healthz()
        assert code == 200, body
    t_ready, _ = health.recorder.wait_for("READY", 0, 5, health.log)
    t_ping, _ = health.recorder.wait_for("WATCHDOG", t_ready, 5, health.log)
    assert t_ping - t_ready < 0.5


def test_a_source_outage_names_the_source_alone(health):
    """While src delivers nothing, /healthz names src alone (mid and out have nothing to do:
    idle, not stalled; the other branch runs on) and the watchdog stays silent; both recover when
    frames come back."""
    health.wait_until(lambda: health.healthz()[0] == 503, timeout=15, message="the outage reported")
    t0 = time.monotonic()
    while time.monotonic() < t0 + 2.5:
        code, body = health.healthz()
        assert code == 503 and body["stalled"] == ["src"], body
        states = {name: st["state"] for name, st in body["stages"].items()}
        assert states == {"src": "stalled", "mid": "idle", "out": "idle", "late": "ok", "lateout": "ok"}, body
        time.sleep(0.2)
    assert health.recorder.between(t0 + 0.5, t0 + 2.5, "WATCHDOG") == []
    health.wait_until(lambda: health.healthz()[0] == 200, timeout=15, message="healthy after the outage")
    t1 = time.monotonic()
    health.recorder.wait_for("WATCHDOG", t1, 5, health.log)
    health.wait_until(
        lambda: any(r["frame_id"] > 40 for r in read_jsonl(health.workdir / "out.jsonl")),
        message="frames after the outage reach the sink",
    )


# -- stopping when a stage will not drain, forced stops, output formats -------------------------


def _stuck_config(tmp_path: Path, name: str) -> dict:
    # 'mid' stops responding at frame 5; hang_timeout is long so nobody restarts it. The source is
    # finite, so its link blocks: it waits for 'mid' once the link is full.
    quick = {"stall_timeout": 1.0}
    return {
        "name": name,
        "stages": {
            # Frames big enough that the socket buffers fill after a few.
            "src": dict(quick, type="counter", fps=50, count=100000, width=320, height=240),
            "mid": dict(quick, type="passthrough", inputs=["src"], hang_at=5),
            "out": dict(quick, type="record", inputs=["mid"], path=str(tmp_path / "o.jsonl")),
        },
        "runtime": {"stop_timeout": 1.5, "hang_timeout": 300},
    }


def test_stop_timeout_kills_what_does_not_drain(tmp_path):
    with Daemon(_stuck_config(tmp_path, "stuck"), tmp_path) as d:
        d.wait_ready()
        # Only the hung stage is stalled: the source behind it is held up by backpressure, and
        # the sink after it has nothing to do.
        code, body = d.wait_until(
            lambda: (lambda h: h if h[0] == 503 and h[1]["stages"]["src"]["state"] == "blocked" else None)(
                d.healthz()
            ),
            timeout=120,
            message="mid stalled, src held up by backpressure",
        )
        assert body["stalled"] == ["mid"], body
        states = {name: st["state"] for name, st in body["stages"].items()}
        assert states == {"src": "blocked", "mid": "stalled", "out": "idle"}, body
        t0 = time.monotonic()
        # Frames were lost in the killed workers: a failed stop, so systemd records it.
        assert d.stop() == 1
        took = time.monotonic() - t0
    assert took > 1.4, took  # it waited for the drain as long as stop_timeout says (the upper
    # bound is Daemon.stop's own: it only catches a hang)
    # The hung stage, the source waiting for it to take its end marker, and the sink behind it.
    assert (
        "Drain incomplete: killed 3 worker(s) that did not drain within 1.5 s: src, mid, out; "
        "frames still in flight were lost"
    ) in d.log
    assert "supervisor: Stopped" not in d.log


def test_second_sigint_forces_exit(tmp_path):
    with Daemon(_stuck_config(tmp_path, "force"), tmp_path) as d:
        d.wait_ready()
        d.send(signal.SIGINT)
        d.wait_for_line("Stopping: draining")
        d.send(signal.SIGINT)
        assert d.wait(10) == 130
        d.assert_no_leftovers()
    assert "Second SIGINT: killing every worker now" in d.log


def test_status_in_place_on_a_terminal_and_plain_for_journald(tmp_path):
    import pty

    config = {
        "name": "tty",
        "stages": {
            "src": {"type": "counter", "count": 40, "fps": 20},
            "out": {"type": "record", "inputs": ["src"], "path": str(tmp_path / "o.jsonl")},
        },
        "metrics": {"listen": "127.0.0.1:0"},
    }
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepipe", "run", str(tmp_path / "c.yaml")],
        stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary, start_new_session=True,
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(30) == 0
    os.close(primary)
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[3F\x1b[J" in screen  # the three-line board redrawn in place
    assert "edgepipe tty: 2 stages" in screen and "fps" in screen
    assert "Finished in" in screen

    # Under journald: no timestamps, a syslog priority prefix per line.
    env = dict(os.environ, JOURNAL_STREAM="8:1234")
    r = subprocess.run(
        [sys.executable, "-m", "edgepipe", "run", str(tmp_path / "c.yaml")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert r.returncode == 0
    lines = r.stderr.splitlines()
    assert any(x.startswith("<6>supervisor: Ready: 2 stages in 2 workers") for x in lines), r.stderr
    assert any(x.startswith("<6>supervisor: Status: src ") for x in lines) or len(lines) >= 2
    assert all(x.startswith("<") for x in lines), r.stderr


def test_workers_die_with_a_killed_supervisor_and_the_next_daemon_cleans_up(tmp_path):
    config = {
        "name": "orphan",
        "stages": {
            "src": {"type": "counter", "fps": 20},
            "mid": {"type": "passthrough", "inputs": ["src"], "sleep_ms": 5},
            "out": {"type": "record", "inputs": ["mid"], "path": str(tmp_path / "o.jsonl")},
        },
    }
    runtime_base = Path(tempfile.mkdtemp(prefix="ep-x-", dir="/tmp"))
    env = {"XDG_RUNTIME_DIR": str(runtime_base)}
    with Daemon(config, tmp_path, env=env) as d:
        d.wait_ready()
        stale = runtime_base / f"edgepipe-orphan-{d.pid}"
        assert (stale / "mid.in").exists()
        os.kill(d.pid, signal.SIGKILL)
        assert d.wait(10) == -signal.SIGKILL
        d.assert_no_leftovers(grace=5)  # the workers went with it
    assert stale.is_dir()  # nobody cleaned up after a kill -9 ...
    with Daemon(config, tmp_path, env=env) as d2:
        d2.wait_ready()
        assert not stale.exists()  # ... until the next daemon of that name started
        assert (runtime_base / f"edgepipe-orphan-{d2.pid}").is_dir()
        assert d2.stop() == 0
    assert list(runtime_base.iterdir()) == []
    runtime_base.rmdir()


def test_two_daemons_side_by_side(tmp_path):
    def config(name: str, sub: str) -> dict:
        (tmp_path / sub).mkdir()
        return {
            "name": name,
            "stages": {
                "src": {"type": "counter", "fps": 20},
                "out": {"type": "record", "inputs": ["src"], "path": str(tmp_path / sub / "o.jsonl")},
            },
        }

    # Same pipeline name and stage names: only the (free) metrics ports differ.
    with Daemon(config("twin", "a"), tmp_path / "a") as a, Daemon(config("twin", "b"), tmp_path / "b") as b:
        a.wait_ready()
        b.wait_ready()
        assert a.metrics_address != b.metrics_address
        for d, sub in ((a, "a"), (b, "b")):
            d.wait_until(lambda sub=sub: len(read_jsonl(tmp_path / sub / "o.jsonl")) > 5, message=sub)
        assert a.stop() == 0 and b.stop() == 0


def test_kill_9_of_the_detector_in_a_real_chain(tmp_path):
    """synthetic -> letterbox -> yolov5 -> nms -> zmq_pub from the first-party plugins: the
    detector's worker is killed, the supervisor brings it back (model reloaded and warmed) and
    detections resume with frame ids still increasing; the source never restarts. A video sink
    beside zmq_pub draws on the full-resolution frames although the config does not ask the
    letterbox stage to keep them (the sink's needs_original does). A jsonl sink, also fed
    losslessly ('block'), starts on a file whose last line was cut by a killed writer: it is
    repaired, and after SIGTERM the subscriber has had the same messages as the file, up to the
    last one (zmq_pub lingers on its way out)."""
    import socket

    from helpers.daemon import Subscriber

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    config = {
        "name": "chain",
        "stages": {
            "cam": {"type": "synthetic", "width": 160, "height": 120, "fps": 10},
            "prep": {"type": "letterbox", "inputs": ["cam"], "imgsz": 64},
            "detector": {"type": "yolov5", "inputs": ["prep"], "weights": None, "cfg": "yolov5n",
                         "device": "cpu", "threads": 1, "imgsz": 64},
            "post": {"type": "nms", "inputs": ["detector"]},
            "pub": {"type": "zmq_pub", "inputs": ["post"], "bind": endpoint, "policy": "block"},
            "film": {"type": "video", "inputs": ["post"], "path": str(tmp_path / "film.avi"), "codec": "MJPG"},
            "log": {"type": "jsonl", "inputs": ["post"], "path": str(tmp_path / "log.jsonl"), "policy": "block"},
        },
    }
    assert "keep_original" not in config["stages"]["prep"]
    (tmp_path / "log.jsonl").write_bytes(b'{"earlier": 0}\n{"earlier": 1}\n{"earlier": 2, "cut sh')
    with Subscriber(endpoint) as sub, Daemon(config, tmp_path) as d:
        d.wait_ready()
        sub.wait_for(lambda ms: len(ms) >= 5, timeout=60)
        pids = d.worker_pids()
        os.kill(pids["detector"], signal.SIGKILL)
        d.wait_for_line(r"Worker 'detector' died \(killed by SIGKILL\); restarting in 0.5 s")
        d.wait_for_line(r"Worker 'detector' is up again", timeout=120)
        seen = len(sub.snapshot())
        msgs = sub.wait_for(lambda ms: len(ms) >= seen + 5, timeout=60)
        ids = [m["frame_id"] for _, m in msgs]
        assert ids == sorted(set(ids)), "frame ids must keep increasing across the restart"
        assert d.worker_pids()["cam"] == pids["cam"]
        assert d.sample("edgepipe_worker_restarts_total", worker="detector") == 1
        assert d.sample("edgepipe_detector_info", stage="detector", device="cpu") == 1.0
        assert d.stop() == 0
        lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert lines[:2] == [{"earlier": 0}, {"earlier": 1}]
        logged = [m["frame_id"] for m in lines[2:]]
        assert logged and logged == sorted(set(logged))
        got = [m["frame_id"] for _, m in sub.wait_for(lambda ms: ms[-1][1]["frame_id"] >= logged[-1], 5)]
        assert got == logged[logged.index(got[0]):], "the subscriber missed messages the file has"
    assert "Removed a partial last line (22 bytes)" in d.log
    video = cv2.VideoCapture(str(tmp_path / "film.avi"))
    ok, picture = video.read()
    video.release()
    assert ok and picture.shape == (120, 160, 3)  # the camera's size, not the 64 px letterbox
