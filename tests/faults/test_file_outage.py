"""A video file that disappears under a running daemon (the ``file`` source, frames forwarded by
``zmq_push`` to a PULL socket here).

- Read once (``block``): the source keeps the file it opened, so deleting it mid-run loses
  nothing: every frame arrives exactly once, in order, and the daemon finishes with exit 0.
- Looping: the next pass needs the file again. Each failed reopen is a crash of the source's
  worker with one clear line naming the missing file, retried per the restart policy (backoff,
  counted in edgepipe_worker_restarts_total); a file put back in time lets the pipeline resume
  with the next frame ids; a file gone for good makes the daemon give up with exit 1 and the
  reason after ``runtime.restart_limit`` crashes.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from helpers.daemon import Daemon

from .util import FrameSink, write_video


def _config(video: Path, endpoint: str, **source) -> dict:
    return {
        "name": "fileout",
        "stages": {
            "clip": {"type": "file", "path": str(video), **source},
            "fwd": {"type": "zmq_push", "inputs": ["clip"], "connect": endpoint, "hwm": 1, "send_timeout": 60},
        },
        "runtime": {"restart_limit": 4, "restart_window": 120},
    }


def test_a_file_deleted_while_read_is_still_read_to_the_end_exactly_once(tmp_path: Path):
    video = tmp_path / "clip.avi"
    write_video(video, 60)
    short = tempfile.mkdtemp(prefix="ep-", dir="/tmp")
    endpoint = f"ipc://{short}/frames"
    # Closes on the end marker like a zmq source with stop_on_eos: the sender stays connected
    # until then, so a reader that is behind still gets every frame.
    sink = FrameSink(endpoint, hwm=1, close_on_end=True)
    sink.pause()  # block: the pipeline waits for us, so the deletion lands mid-file
    try:
        with Daemon(_config(video, endpoint), tmp_path) as d:
            d.wait_ready(120)
            d.wait_until(lambda: (d.sample("edgepipe_source_frames_read_total", stage="clip") or 0) >= 3, 60,
                         "the first frames read")
            video.unlink()
            read = d.sample("edgepipe_source_frames_read_total", stage="clip")
            assert read < 30, "the pipeline did not wait for the paused reader"
            sink.resume()
            assert d.wait(60) == 0, d.log
            d.assert_no_leftovers()
        assert sink.wait_end(), f"no end marker after the daemon finished; frames read: {sink.ids()}\n{d.log}"
        assert sink.ids() == list(range(60))
    finally:
        sink.close()
        os.rmdir(short)


def test_a_looping_file_that_disappears_is_retried_per_policy_then_given_up(tmp_path: Path):
    video = tmp_path / "clip.avi"
    write_video(video, 10)
    kept = tmp_path / "kept.avi"
    short = tempfile.mkdtemp(prefix="ep-", dir="/tmp")
    endpoint = f"ipc://{short}/frames"
    sink = FrameSink(endpoint, close_on_end=True)
    try:
        config = _config(video, endpoint, loop=True, realtime=True, fps=20)
        with Daemon(config, tmp_path) as d:
            d.wait_ready(120)
            d.wait_until(lambda: len(sink.ids()) >= 15, 60, "the clip looped once")

            # Gone: the reopen at the end of the pass fails; one line names the file.
            start = len(d.lines)
            os.rename(video, kept)
            died = d.wait_for_line(r"Worker 'clip' died \((.*)\); restarting in 0.5 s", 30, start)
            assert died.group(1) == f"video file '{video}' does not exist", died.group(0)
            last = max(sink.ids())

            # Back before the restart limit: the worker comes up again and frames resume, with ids
            # that carry on (the restarted source resumes at its next id).
            os.rename(kept, video)
            d.wait_for_line(r"Worker 'clip' is up again", 60, start)
            back = time.time()
            d.wait_until(lambda: len(sink.since(back)) >= 10, 60, "frames after the file came back")
            ids = [f[1] for f in sink.since(back)]
            assert ids == sorted(ids) and ids[0] > last, (last, ids[:5])
            restarts = d.sample("edgepipe_worker_restarts_total", worker="clip")
            assert restarts >= 1

            # Gone for good: retried with growing backoff until the limit, then exit 1 with the reason.
            start = len(d.lines)
            video.unlink()
            assert d.wait(90) == 1, d.log
            d.assert_no_leftovers()
        later = [line for line in d.lines[start:] if "Worker 'clip' died" in line]
        assert later and all(f"video file '{video}' does not exist" in line for line in later), later
        give_up = [line for line in d.lines[start:] if "Giving up" in line]
        assert len(give_up) == 1 and (
            f"Giving up: worker 'clip' (stages clip) failed 4 times within 120 s; last: video file '{video}' does not exist"
        ) in give_up[0], d.log
    finally:
        sink.close()
        os.rmdir(short)
