"""A sink slower than its source: ``zmq_push`` forwarding to a reader here that takes its time.

- ``latest`` (a live source): latency stays bounded (frame age at delivery stays near one
  reader period instead of growing) and every frame the source read is either delivered or
  counted as dropped (skipped or queue_full); nothing is silently lost.
- ``block`` (a finite source): nothing is lost, duplicated or reordered; while the reader stops
  the source stops too (backpressure), so the frames in flight stay within the links' high-water
  marks and the workers' memory stays flat.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Iterator

import pytest
from helpers.daemon import Daemon

from .util import FrameSink

DROPS = ("skipped", "queue_full", "error", "stale")


@pytest.fixture
def endpoint() -> Iterator[str]:
    short = tempfile.mkdtemp(prefix="ep-", dir="/tmp")
    yield f"ipc://{short}/frames"
    os.rmdir(short)


def _config(endpoint: str, **scene) -> dict:
    return {
        "name": "slow",
        "stages": {
            "scene": {"type": "synthetic", "seed": 1, **scene},
            "fwd": {"type": "zmq_push", "inputs": ["scene"], "connect": endpoint, "hwm": 1, "send_timeout": 60},
        },
        # Counters reach the supervisor with the heartbeats: frequent ones keep them close to now.
        "runtime": {"heartbeat_interval": 0.1},
    }


def totals(d: Daemon) -> dict:
    """From one scrape: frames the source read and frames dropped anywhere, by reason."""
    out = {"read": 0.0, "dropped": 0.0}
    for name, labels, value in d.samples():
        if name == "edgepipe_source_frames_read_total" and labels.get("stage") == "scene":
            out["read"] = value
        elif name == "edgepipe_stage_frames_dropped_total":
            out["dropped"] += value
            out[labels["reason"]] = out.get(labels["reason"], 0.0) + value
    return out


def test_latest_keeps_frame_age_bounded_and_counts_every_drop(tmp_path: Path, endpoint: str):
    sink = FrameSink(endpoint, hwm=1, delay=0.1, close_on_end=True)  # reads 10 frames/s; the camera makes 50
    try:
        with Daemon(_config(endpoint, width=320, height=240, fps=50), tmp_path) as d:
            d.wait_ready(120)
            d.wait_until(lambda: len(sink.ids()) >= 5, 60, "first frames")
            t0 = time.time()
            time.sleep(6.0)
            frames = [f for f in sink.frames if f[0] > t0]
            # Delivered frames are fresh, and not getting older: no queue builds up anywhere.
            ages = [f[0] - f[2] for f in frames]
            assert len(frames) >= 30 and max(ages) < 1.0, ages
            early = mean(f[0] - f[2] for f in frames if f[0] < t0 + 2.0)
            late = mean(f[0] - f[2] for f in frames if f[0] > t0 + 4.0)
            assert late < early + 0.2, (early, late)
            age = d.sample("edgepipe_sink_frame_age_seconds_sum", stage="fwd") / d.sample(
                "edgepipe_sink_frame_age_seconds_count", stage="fwd")
            assert age < 0.5, age

            # Every frame read is delivered, dropped and counted, or in flight: a handful, give or
            # take what the counters lag behind (one 0.1 s heartbeat, 5 frames, per worker).
            got = totals(d)
            delivered = len(sink.ids())
            assert got["dropped"] > 100, got  # 5x too fast for ~7 s: most frames are dropped
            assert abs(got["read"] - delivered - got["dropped"]) <= 15, (got, delivered)
            assert d.stop() == 0
        ids = sink.ids()
        assert ids == sorted(ids) and len(set(ids)) == len(ids)  # per source, ids only increase
    finally:
        sink.close()


def test_block_loses_nothing_and_holds_memory_while_the_reader_stalls(tmp_path: Path, endpoint: str):
    n = 200
    sink = FrameSink(endpoint, hwm=1, close_on_end=True)
    sink.pause()

    def stalled_state(d: Daemon) -> dict:
        """With the reader stopped: the source is held back (reads nothing more), so the frames
        in flight are what the links hold; and each worker's resident memory. On a busy machine
        the links take a while to fill: wait until the source has read nothing for 1.5 s (the
        bound only catches a source that never stops)."""
        first = totals(d)
        deadline = time.monotonic() + 120
        while True:
            time.sleep(1.5)
            then = totals(d)
            if then["read"] == first["read"]:
                break
            assert time.monotonic() < deadline, f"the source kept reading while the sink was stalled: {then}"
            first = then
        assert then["read"] - len(sink.ids()) <= 16, (then, len(sink.ids()))
        assert then["dropped"] == 0, then
        return {w: d.sample("edgepipe_worker_resident_memory_bytes", worker=w) for w in ("scene", "fwd")}

    try:
        # 640x480 frames (300 KB each): queued without bound, the stalled frames would add tens
        # of megabytes to the workers.
        with Daemon(_config(endpoint, width=640, height=480, fps=None, count=n), tmp_path) as d:
            d.wait_ready(120)
            before = stalled_state(d)
            sink.resume()
            d.wait_until(lambda: len(sink.ids()) >= n // 2, 60, "half the frames")
            sink.pause()
            after = stalled_state(d)
            for worker, rss in after.items():
                assert rss - before[worker] < 16 << 20, (worker, before[worker], rss)
            sink.resume()
            assert d.wait(120) == 0, d.log
            d.assert_no_leftovers()
        assert sink.wait_end(), "no end marker after the daemon finished"
        assert sink.ids() == list(range(n))  # every frame, once, in order
    finally:
        sink.close()
