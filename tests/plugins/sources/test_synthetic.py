"""The ``synthetic`` source driven directly (start/read/stop): its frames are exactly those of
``edgepipe.scenes.SceneStream`` for a seed, with truth rows on request, and a live one is paced
at its fps while a finite one ends after ``count`` frames."""

from __future__ import annotations

import time

import numpy as np
import pytest
from edgepipe_plugins.sources.synthetic import SyntheticConfig, SyntheticSource
from helpers.sources import read_all
from pydantic import ValidationError

from edgepipe.scenes import SceneStream
from edgepipe.stage import StageContext


def test_synthetic_is_deterministic_and_matches_the_scene_stream():
    cfg = SyntheticConfig(width=160, height=96, fps=None, count=6, seed=7, truth=True)
    runs = []
    for _ in range(2):
        src = SyntheticSource(cfg, StageContext("scene"))
        src.start()
        runs.append(read_all(src))
        src.stop()
    a, b = runs
    assert [f.frame_id for f in a] == list(range(6))
    assert all(f.source == "scene" and f.image.shape == (96, 160) and f.image.dtype == np.uint8 for f in a)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.image, fb.image)
        assert fa.meta["truth"] == fb.meta["truth"]
    # The frames are exactly SceneStream's, truth rows [class_id, x1, y1, x2, y2].
    stream = SceneStream(160, 96, seed=7, objects=4)
    for f in a:
        image, truth = stream.next()
        np.testing.assert_array_equal(f.image, image)
        assert f.meta["truth"] == [[int(r[0])] + r[1:] for r in truth.tolist()]
    assert not np.array_equal(a[0].image, a[1].image), "shapes should move between frames"

    other = SyntheticSource(SyntheticConfig(width=160, height=96, fps=None, count=1, seed=8), StageContext("s"))
    other.start()
    (frame,) = read_all(other)
    assert not np.array_equal(frame.image, a[0].image)
    assert "truth" not in frame.meta


def test_synthetic_live_paces_at_fps_and_finite_ends():
    live = SyntheticSource(SyntheticConfig(width=64, height=48, fps=20), StageContext("live"))
    assert live.live
    live.start()
    t0 = time.monotonic()
    frames = read_all(live, limit=7)
    elapsed = time.monotonic() - t0
    assert [f.frame_id for f in frames] == list(range(7))
    assert elapsed >= 6 / 20 - 0.02, f"7 frames at 20 fps took only {elapsed:.3f} s"
    assert all(abs(f.timestamp - time.time()) < 10 for f in frames)
    assert SyntheticSource(SyntheticConfig(count=3, fps=None), StageContext("f")).live is False
    with pytest.raises(ValidationError, match="set fps"):
        SyntheticConfig(fps=None)
