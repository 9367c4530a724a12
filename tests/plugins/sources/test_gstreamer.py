"""The ``gstreamer`` source driven directly (check/start/read/stop) on real GStreamer pipelines
(``videotestsrc`` from Debian's packages). This machine's OpenCV wheel has no GStreamer, so these
runs go through the gst-launch-1.0 subprocess backend; a missing gst-launch-1.0 is a failure, not
a skip."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from edgepipe_plugins.sources.gstreamer import (
    GStreamerConfig,
    GStreamerSource,
    fdsink_pipeline,
    opencv_has_gstreamer,
    raw_caps,
)
from pydantic import ValidationError

from edgepipe.stage import EndOfStream, StageContext, StageError


@pytest.fixture(autouse=True)
def _gst_tools():
    for tool in ("gst-launch-1.0", "gst-inspect-1.0"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: install gstreamer1.0-tools (make deps)")


def run_source(cfg: GStreamerConfig, limit: int = 1000):
    src = GStreamerSource(cfg, StageContext("gst"))
    src.check()
    src.start()
    frames, ended = [], False
    deadline = time.monotonic() + 30
    try:
        while len(frames) < limit and time.monotonic() < deadline:
            try:
                frame = src.read()
            except EndOfStream:
                ended = True
                break
            if frame is not None:
                frames.append(frame)
    finally:
        proc = src._proc
        src.stop()
    return frames, ended, proc


def test_videotestsrc_gray_exact_count_then_end():
    # width 50: GStreamer pads GRAY8 rows to 52 bytes; the source must strip the padding.
    pipeline = (
        "videotestsrc num-buffers=7 pattern=gradient ! "
        "video/x-raw,format=GRAY8,width=50,height=30 ! appsink"
    )
    frames, ended, proc = run_source(GStreamerConfig(pipeline=pipeline, backend="gst-launch", live=False))
    assert ended, "the pipeline ended but the source did not raise EndOfStream"
    assert [f.frame_id for f in frames] == list(range(7))
    assert all(f.image.shape == (30, 50) and f.image.dtype == np.uint8 for f in frames)
    # 'gradient' is a vertical ramp: every row constant, rows increasing from top to bottom.
    img = frames[0].image
    assert (img == img[:, :1]).all(), "row padding leaked into the image"
    assert img[-1, 0] > img[0, 0]
    assert proc.returncode == 0


def test_videotestsrc_bgr_with_size_and_format_from_the_config():
    # The caps name no size or format: the options add videoconvert/videoscale and a capsfilter.
    # (No drop=true here: that would let the leaky queue drop frames of this non-live source.)
    pipeline = "videotestsrc num-buffers=3 pattern=red ! appsink"
    cfg = GStreamerConfig(pipeline=pipeline, backend="gst-launch", width=33, height=21, format="BGR", live=False)
    frames, ended, _ = run_source(cfg)
    assert ended and len(frames) == 3
    img = frames[0].image
    assert img.shape == (21, 33, 3)
    b, g, r = (int(v) for v in img.reshape(-1, 3).mean(axis=0))
    assert r > 200 and g < 40 and b < 40, (b, g, r)


def test_live_pipeline_is_killed_on_stop():
    pipeline = "videotestsrc is-live=true ! video/x-raw,format=GRAY8,width=64,height=48,framerate=30/1 ! appsink drop=true max-buffers=1"
    frames, ended, proc = run_source(GStreamerConfig(pipeline=pipeline, backend="gst-launch"), limit=5)
    assert not ended and [f.frame_id for f in frames] == list(range(5))
    assert proc.returncode is not None, "gst-launch-1.0 still running after stop()"
    ts = [f.timestamp for f in frames]
    assert ts == sorted(ts) and ts[-1] - ts[0] > 0.05  # paced by the live source at 30 fps


def test_pipeline_errors_are_one_line():
    with pytest.raises(ValidationError, match="must end in '! appsink"):
        GStreamerConfig(pipeline="videotestsrc ! fakesink")
    src = GStreamerSource(GStreamerConfig(pipeline="videotestsrc ! appsink", backend="gst-launch"), StageContext("g"))
    with pytest.raises(StageError, match="caps do not state format, width, height"):
        src.check()
    jetson = "nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720 ! nvvidconv ! video/x-raw,format=GRAY8 ! appsink"
    src = GStreamerSource(GStreamerConfig(pipeline=jetson, backend="gst-launch", width=1280, height=720), StageContext("csi"))
    with pytest.raises(StageError, match="element 'nvarguscamerasrc' is not installed"):
        src.check()
    bad = GStreamerSource(
        GStreamerConfig(pipeline="videotestsrc num-buffers=2 ! video/x-raw,format=GRAY8,width=8,height=8 ! nosuchelement ! appsink", backend="gst-launch"),
        StageContext("bad"),
    )
    with pytest.raises(StageError, match="nosuchelement"):
        bad.check()
    if not opencv_has_gstreamer():
        with pytest.raises(StageError, match="OpenCV built with GStreamer"):
            GStreamerSource(GStreamerConfig(pipeline="videotestsrc ! appsink", backend="opencv"), StageContext("o")).check()


def test_caps_parsing():
    assert raw_caps("src ! video/x-raw, format=(string)GRAY8, width=(int)640, height=(int)480 ! appsink") == {
        "format": "GRAY8", "width": 640, "height": 480,
    }
    # NVMM caps are not raw frames we could read; only the last system-memory caps count.
    assert raw_caps("a ! video/x-raw(memory:NVMM),width=1920,height=1080 ! b ! video/x-raw,format=GRAY8 ! appsink") == {"format": "GRAY8"}
    text, (w, h, fmt) = fdsink_pipeline(
        "v ! video/x-raw,format=GRAY8,width=64,height=48 ! appsink drop=true max-buffers=2", None, None, None
    )
    assert (w, h, fmt) == (64, 48, "GRAY8")
    assert text.endswith("queue leaky=downstream max-size-buffers=2 max-size-bytes=0 max-size-time=0 ! fdsink fd=1 sync=false")
