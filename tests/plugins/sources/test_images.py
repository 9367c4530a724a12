"""The ``images`` source driven directly (start/read/stop) on real image files in a temporary
folder: sorted by name, gray kept 1-channel and colour as BGR, unreadable files skipped with a gap
in the frame ids, glob patterns, looping, and an empty folder refused by the pre-flight."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from edgepipe_plugins.sources.images import ImagesConfig, ImagesSource
from helpers.sources import read_all

from edgepipe.stage import StageContext, StageError


def test_images_source_sorted_with_file_names(tmp_path: Path):
    names = ["b.png", "a.png", "c.jpg", "a10.png"]
    for i, name in enumerate(names):
        if name.endswith(".jpg"):
            cv2.imwrite(str(tmp_path / name), np.full((20, 30, 3), 40 * i, np.uint8))
        else:
            cv2.imwrite(str(tmp_path / name), np.full((20, 30), 40 * i, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png")

    src = ImagesSource(ImagesConfig(path=str(tmp_path)), StageContext("shots"))
    assert not src.live
    src.check()
    src.start()
    frames = read_all(src)
    expected = ["a.png", "a10.png", "b.png", "c.jpg"]  # sorted; broken.png skipped, txt ignored
    assert [Path(f.meta["file"]).name for f in frames] == expected
    assert [f.frame_id for f in frames] == [0, 1, 2, 4]  # an id is the file's place: broken.png's is a gap
    by_name = {Path(f.meta["file"]).name: f for f in frames}
    assert by_name["a.png"].image.shape == (20, 30)  # gray stays 1-channel
    assert by_name["c.jpg"].image.shape == (20, 30, 3)  # colour comes as BGR
    assert by_name["b.png"].image.mean() == 0 and by_name["a10.png"].image.mean() == 120

    glob_src = ImagesSource(ImagesConfig(path=str(tmp_path / "a*.png")), StageContext("g"))
    glob_src.start()
    assert [Path(f.meta["file"]).name for f in read_all(glob_src)] == ["a.png", "a10.png"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StageError, match="no image files found"):
        ImagesSource(ImagesConfig(path=str(empty)), StageContext("e")).check()


def test_images_source_loops(tmp_path: Path):
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8), i * 100, np.uint8))
    src = ImagesSource(ImagesConfig(path=str(tmp_path), loop=True), StageContext("l"))
    src.start()
    frames = read_all(src, limit=5)
    assert [f.frame_id for f in frames] == [0, 1, 2, 3, 4]
    assert [Path(f.meta["file"]).name for f in frames] == ["0.png", "1.png", "0.png", "1.png", "0.png"]
