"""The ``file`` source driven directly (start/read/stop) on real video files written with OpenCV
(MJPG in AVI, one flat gray level per frame, so every frame read back is known): every frame in
order, looping at the file's rate, and a missing or undecodable file named in one error."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from edgepipe_plugins.sources.file import FileConfig, FileSource
from helpers.sources import read_all, write_video

from edgepipe.stage import StageContext, StageError


def test_file_source_reads_every_frame_in_order_then_ends(tmp_path: Path):
    levels = [20 + 25 * k for k in range(8)]
    video = tmp_path / "clip.avi"
    write_video(video, levels)
    src = FileSource(FileConfig(path=str(video)), StageContext("clip"))
    assert not src.live
    src.check()
    src.start()
    frames = read_all(src)
    src.stop()
    assert [f.frame_id for f in frames] == list(range(8))
    assert [f.source for f in frames] == ["clip"] * 8
    assert [f.image.shape for f in frames] == [(64, 96, 3)] * 8
    got = [float(f.image.mean()) for f in frames]
    assert np.allclose(got, levels, atol=3), got
    assert frames[0].width == 96 and frames[0].height == 64
    ts = [f.timestamp for f in frames]
    assert ts == sorted(ts)


def test_file_source_loops_and_paces_in_realtime(tmp_path: Path):
    levels = [30, 130, 230]
    video = tmp_path / "loop.avi"
    write_video(video, levels, fps=25.0)
    src = FileSource(FileConfig(path=str(video), loop=True, realtime=True), StageContext("loop"))
    assert src.live
    src.start()
    t0 = time.monotonic()
    frames = read_all(src, limit=8)
    elapsed = time.monotonic() - t0
    src.stop()
    assert [f.frame_id for f in frames] == list(range(8))
    assert np.allclose([f.image.mean() for f in frames], (levels * 3)[:8], atol=3)
    assert elapsed >= 7 / 25 - 0.02, f"8 frames at the file's 25 fps took only {elapsed:.3f} s"


def test_file_source_check_names_a_missing_file(tmp_path: Path):
    src = FileSource(FileConfig(path=str(tmp_path / "nope.mp4")), StageContext("f"))
    with pytest.raises(StageError, match="nope.mp4.*does not exist"):
        src.check()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    with pytest.raises(StageError, match="cannot decode video file"):
        FileSource(FileConfig(path=str(garbage)), StageContext("f")).start()
