"""Finite sources restarted after their worker died: ``file`` (plain and looping), ``images``
(plain and looping) and ``synthetic``, each driven directly with ``StageContext(resume=k)``,
carry on at frame k with the same ids and pictures as an uninterrupted run. One behaviour the
supervisor relies on, checked across the sources that implement it; each source's own tests
are in tests/plugins/sources/."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from edgepipe_plugins.sources.file import FileConfig, FileSource
from edgepipe_plugins.sources.images import ImagesConfig, ImagesSource
from edgepipe_plugins.sources.synthetic import SyntheticConfig, SyntheticSource
from helpers.sources import read_all, write_video

from edgepipe.stage import StageContext


def test_restarted_finite_sources_continue_at_their_resume_id(tmp_path: Path):
    """A source restarted with resume=k (its worker died after sending frame k-1) carries on
    with frame k: the same id and the same picture as an uninterrupted run, no repeats."""
    levels = [20 + 25 * k for k in range(8)]
    video = tmp_path / "clip.avi"
    write_video(video, levels)
    src = FileSource(FileConfig(path=str(video)), StageContext("clip", resume=5))
    src.start()
    frames = read_all(src)
    src.stop()
    assert [f.frame_id for f in frames] == [5, 6, 7]
    assert np.allclose([f.image.mean() for f in frames], levels[5:], atol=3)

    looping = FileSource(FileConfig(path=str(video), loop=True), StageContext("clip", resume=8 * 1000 + 6))
    looping.start()
    frames = read_all(looping, limit=4)
    looping.stop()
    assert [f.frame_id for f in frames] == [8006, 8007, 8008, 8009]
    assert np.allclose([f.image.mean() for f in frames], [levels[6], levels[7], levels[0], levels[1]], atol=3)

    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8), i * 100, np.uint8))
    shots = ImagesSource(ImagesConfig(path=str(tmp_path / "*.png")), StageContext("s", resume=1))
    shots.start()
    assert [(f.frame_id, Path(f.meta["file"]).name) for f in read_all(shots)] == [(1, "1.png"), (2, "2.png")]
    loop = ImagesSource(ImagesConfig(path=str(tmp_path / "*.png"), loop=True), StageContext("s", resume=7))
    loop.start()
    assert [(f.frame_id, Path(f.meta["file"]).name) for f in read_all(loop, limit=3)] == [
        (7, "1.png"), (8, "2.png"), (9, "0.png")
    ]
    synthetic = SyntheticSource(SyntheticConfig(width=32, height=32, count=5), StageContext("syn", resume=3))
    synthetic.start()
    assert [f.frame_id for f in read_all(synthetic)] == [3, 4]
