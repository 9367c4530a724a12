"""Soak: the synthetic detection pipeline at full speed for 10 minutes (``make soak``; not part of
``make test``). ``EDGEPIPE_SOAK_SECONDS`` changes the duration (for trying the test itself).

The source is finite-sized but effectively endless (``count`` far beyond what 10 minutes
produce, no ``fps``), so every link blocks: the pipeline runs exactly as fast as its slowest
stage and loses nothing. Asserted over the run:

- memory: after a warm-up, no process's resident memory (supervisor and every worker) ends the
  run more than 5% above its level at the start of the measured window;
- file descriptors: no process holds more at the end than it did at the start;
- nothing lost, nothing repeated: after SIGTERM, the ``jsonl`` file holds frame ids
  0, 1, 2, ... without a gap, every line whole JSON, and no worker ever restarted.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import pytest
from helpers.daemon import Daemon

SECONDS = float(os.environ.get("EDGEPIPE_SOAK_SECONDS", "600"))
WARMUP = min(60.0, SECONDS / 5)  # model warm-up, allocator and socket buffers settling
SAMPLE_EVERY = 5.0


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for pid {pid}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.soak
def test_soak_full_speed_memory_fds_and_contiguous_ids(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    rundir = tempfile.mkdtemp(prefix="ep-", dir="/tmp")
    config = {
        "name": "soak",
        "stages": {
            "scene": {"type": "synthetic", "width": 320, "height": 240, "fps": None, "count": 10**9,
                      "objects": 6},
            "prep": {"type": "letterbox", "inputs": ["scene"], "imgsz": 160},
            "det": {"type": "yolov5", "inputs": ["prep"], "cfg": "yolov5n", "imgsz": 160, "device": "cpu",
                    "conf_thres": 0.05, "max_batch": 4},
            "post": {"type": "nms", "inputs": ["det"], "conf_thres": 0.05},
            "out": {"type": "jsonl", "inputs": ["post"], "path": str(out)},
        },
        "runtime": {"dir": rundir, "status_interval": 30},
    }
    rss: Dict[str, List[int]] = {}
    fds: Dict[str, List[int]] = {}
    with Daemon(config, tmp_path) as d:
        d.wait_ready(300)
        pids = dict(d.worker_pids(), supervisor=d.pid)
        assert len(pids) == 6, pids
        time.sleep(WARMUP)
        end = time.monotonic() + SECONDS - WARMUP
        while True:
            for name, pid in pids.items():
                rss.setdefault(name, []).append(_status(pid, "VmRSS"))
                fds.setdefault(name, []).append(_fds(pid))
            if time.monotonic() >= end:
                break
            time.sleep(min(SAMPLE_EVERY, max(0.0, end - time.monotonic())))
        assert dict(d.worker_pids(), supervisor=d.pid) == pids, "a worker was restarted"
        read = d.sample("edgepipe_source_frames_read_total", stage="scene")
        restarts = [d.sample("edgepipe_worker_restarts_total", worker=w) for w in pids if w != "supervisor"]
        assert d.stop(timeout=60) == 0, d.log
    os.rmdir(rundir)

    assert restarts == [0.0] * 5
    report = []
    for name in pids:
        # Start and end of the window: the mean of the first and of the last three samples.
        first, last = sum(rss[name][:3]) / 3, sum(rss[name][-3:]) / 3
        report.append(f"{name}: {first / 2**20:.1f} -> {last / 2**20:.1f} MiB, fds {fds[name][0]} -> {fds[name][-1]}")
        assert last <= first * 1.05, report[-1]
        assert max(fds[name][-3:]) <= fds[name][0], report[-1]
    print("\n".join(report))

    ids = []
    with open(out) as f:
        for line in f:
            assert line.endswith("\n")
            ids.append(json.loads(line)["frame_id"])
    assert ids == list(range(len(ids))), "frame ids not contiguous"
    assert len(ids) >= read > 1000, (len(ids), read)
