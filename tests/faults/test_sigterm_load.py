"""SIGTERM under full load: a video file decoded as fast as the detector takes it (``block``), the
CPU busy with inference, and SIGTERM sent to the daemon's whole process group (what a Ctrl-C or
systemd's default KillMode does) in the middle of the file.

The guarantee: exit 0 within 10 s, and every frame the source read before the signal is in the
``jsonl`` file exactly once, in order, with nothing after a gap: the file is whole lines of valid
JSON, frame ids 0, 1, 2, ... up to where the drain stopped the source.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from helpers.daemon import Daemon

from .util import detection_pipeline, jsonl, write_video

FRAMES = 1500  # at 160 px the detector needs several seconds for them


def test_sigterm_to_the_group_mid_file_drains_every_read_frame_exactly_once(tmp_path: Path):
    video = tmp_path / "clip.avi"
    write_video(video, FRAMES, 160, 120)
    out = tmp_path / "out.jsonl"
    config = detection_pipeline(out, name="term", imgsz=160, type="file", path=str(video))
    config["stages"]["det"]["max_batch"] = 4
    config["runtime"]["heartbeat_interval"] = 0.1  # the read counter below lags by at most this
    with Daemon(config, tmp_path) as d:
        d.wait_ready(180)
        read_before = d.wait_until(
            lambda: (lambda n: n if n >= 100 else 0)(d.sample("edgepipe_source_frames_read_total", stage="scene")),
            120, "the pipeline got going")
        assert d.sample("edgepipe_stage_frames_dropped_total", stage="det", reason="skipped") == 0  # block
        t0 = time.monotonic()
        d.send(signal.SIGTERM, group=True)
        assert d.wait(15) == 0, d.log
        took = time.monotonic() - t0
        d.assert_no_leftovers()
    os.rmdir(config["runtime"]["dir"])
    assert took < 15.0, took  # exit 0 already says the drain beat stop_timeout (10 s)
    assert d.log.rstrip().endswith("supervisor: Stopped"), d.log
    messages = jsonl(out, final=True)  # every line whole and parseable
    ids = [m["frame_id"] for m in messages]
    assert ids == list(range(len(ids))), "a frame lost, repeated or out of order"
    # Every frame read before the signal (at least what the counter said just before it) is in,
    # and the file really was cut short.
    assert read_before <= len(ids) < FRAMES, (read_before, len(ids))
    assert all(m["source"] == "scene" and m["width"] == 160 and m["height"] == 120 for m in messages)
