"""kill -9 of each kind of worker of the real detection pipeline, one after the other, in one
daemon: each is restarted alone after its backoff, counted in edgepipe_worker_restarts_total,
detections flow again from frames captured after the kill, /healthz is healthy again, and no
zombie or orphan process is left; SIGTERM afterwards still exits 0.

What docs/guarantees.md promises and these tests hold it to: frames in flight in the dead worker
are lost, and frame ids carry on across every restart, a source's included (it resumes), so the
hole shows and ids never go back. (A stage that crash-loops: test_file_outage.py.)
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers.daemon import Daemon

from .util import assert_workers_clean, detection_pipeline, jsonl

STAGES = ["scene", "prep", "det", "post", "out"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    config = detection_pipeline(tmp / "out.jsonl", name="kill")
    with Daemon(config, tmp) as d:
        d.out = tmp / "out.jsonl"
        d.wait_ready(180)
        d.wait_until(lambda: len(jsonl(d.out)) >= 10, 60, "first detection messages")
        yield d
    os.rmdir(config["runtime"]["dir"])


# Sink first, source last: the kinds in turn (sink, processors, detector, source).
@pytest.mark.parametrize("stage", ["out", "post", "det", "prep", "scene"])
def test_kill_9_restarts_only_that_worker_and_the_pipeline_resumes(daemon: Daemon, stage: str):
    pids = daemon.worker_pids()
    assert sorted(pids) == sorted(STAGES)
    start = len(daemon.lines)
    before = jsonl(daemon.out)
    last_id = max(m["frame_id"] for m in before)
    killed_at = time.time()
    os.kill(pids[stage], signal.SIGKILL)

    daemon.wait_for_line(rf"Worker '{stage}' died \(killed by SIGKILL\); restarting in 0.5 s", 30, start)
    daemon.wait_for_line(rf"Worker '{stage}' is up again \(stages {stage}\)", 120, start)
    assert daemon.sample("edgepipe_worker_restarts_total", worker=stage) == 1
    now = daemon.worker_pids()
    assert now[stage] != pids[stage]
    assert {k: v for k, v in now.items() if k != stage} == {k: v for k, v in pids.items() if k != stage}

    # Detections of frames captured after the kill arrive again.
    def fresh():
        return [m for m in jsonl(daemon.out)[len(before):] if m["timestamp"] > killed_at]

    new = daemon.wait_until(lambda: len(fresh()) >= 5 and fresh(), 90, f"detections after restarting {stage}")
    ids = [m["frame_id"] for m in new]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # 'latest': per source, ids only increase
    # Ids carry on across every restart, the source's included (it resumes at its next id).
    assert ids[0] > last_id, (last_id, ids)

    daemon.wait_until(lambda: daemon.healthz()[0] == 200, 60, "healthy again")
    assert_workers_clean(daemon, len(STAGES))
    for other in STAGES:
        if other != stage:
            assert daemon.sample("edgepipe_worker_restarts_total", worker=other) in (0, 1)


def test_after_the_kills_sigterm_exits_0_with_every_restart_counted(daemon: Daemon):
    assert {w: daemon.sample("edgepipe_worker_restarts_total", worker=w) for w in STAGES} == dict.fromkeys(STAGES, 1)
    assert daemon.stop(timeout=30) == 0
    assert jsonl(daemon.out, final=True)  # whole lines only
