"""The `video` sink, driven directly (start/process/stop), writes a playable, annotated file: read
back with OpenCV, the frame count, size and rate are right and each detection's box is drawn in
its class colour where it was; a real headless Chromium plays what it records (WebM by default,
and what a worker killed mid-recording left behind)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

import numpy as np
import pytest
import yaml
from edgepipe_plugins.sinks.video import VideoConfig, VideoSink
from helpers.pixels import colour_mask, edge_colour_ratio, read_video
from pydantic import ValidationError

from edgepipe.draw import color
from edgepipe.messages import Frame
from edgepipe.stage import StageContext, StageError

W, H = 320, 240
NAMES = ["circle", "square", "triangle", "cross"]


def _box(i: int) -> List[float]:
    """Frame i's detection: a 60x50 box moving right and down."""
    x, y = 30 + 12 * i, 40 + 6 * i
    return [x, y, x + 60, y + 50]


def _frames(n: int, t0: float = 1.7e9, fps: float = 10.0, source: str = "cam", cls: int = 0) -> List[Frame]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = np.full((H, W), 110, np.uint8) + rng.integers(0, 8, (H, W), dtype=np.uint8)
        det = np.array([_box(i) + [0.9, cls]], np.float32)
        out.append(
            Frame(source, i, t0 + i / fps, image=img, original=img, detections=det, names=NAMES)
        )
    return out


def _run(config: VideoConfig, frames: List[Frame]) -> VideoSink:
    sink = VideoSink(config, StageContext("video"))
    sink.check()
    sink.start()
    sink.process(frames[:3])  # a batch, then one at a time
    for f in frames[3:]:
        sink.process([f])
    sink.flush()
    sink.stop()
    return sink


def test_annotated_file_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    frames = _frames(12)
    _run(VideoConfig(path=str(path), fps=10), frames)
    images, fps = read_video(path)
    assert len(images) == 12
    assert images[0].shape == (H, W, 3)
    assert fps == pytest.approx(10, abs=0.01)
    red = color(0)
    for i, img in enumerate(images):
        box = _box(i)
        assert edge_colour_ratio(img, box, red) > 0.9, f"frame {i}: box edges not drawn in red"
        # Inside the box (away from the label tag) and far away from it, the picture stays gray.
        x1, y1, x2, y2 = (int(v) for v in box)
        assert not colour_mask(img[y1 + 6 : y2 - 6, x1 + 6 : x2 - 6]).any()
        assert not colour_mask(img[H - 30 :, : 20]).any()
        # The label tag sits on the box's top edge: a filled red block above it.
        tag = img[max(y1 - 8, 0) : y1, x1 + 2 : x1 + 30].astype(np.int32)
        assert (tag[..., 2] - tag[..., 1]).mean() > 100, f"frame {i}: no label tag"


def test_letterboxed_frames_draw_boxes_mapped_through_ratio_and_pad(tmp_path: Path) -> None:
    # A 640x480 source letterboxed to 320x320: ratio 0.5, 40 px bands top and bottom. The
    # detection is in original pixels; the sink must map it onto the letterboxed picture.
    path = tmp_path / "lb.avi"
    frames = []
    for i in range(5):
        lb = np.full((320, 320), 114, np.uint8)
        lb[40:280] = 70
        det = np.array([[100, 120, 300, 360, 0.8, 1]], np.float32)
        frames.append(
            Frame("cam", i, 10.0 + i / 5, image=lb, width=640, height=480, ratio=(0.5, 0.5),
                  pad=(0.0, 40.0), detections=det, names=NAMES)
        )
    _run(VideoConfig(path=str(path), codec="MJPG", fps=5), frames)
    images, _ = read_video(path)
    assert len(images) == 5 and images[0].shape == (320, 320, 3)
    for img in images:
        assert edge_colour_ratio(img, [50, 100, 150, 220], color(1)) > 0.9
        # Where the box would be without the mapping, nothing is drawn.
        assert not colour_mask(img[240:300, 200:300]).any()


def test_rate_comes_from_the_source(tmp_path: Path) -> None:
    # No fps option: the rate follows the source's capture times (15 fps) ...
    path = tmp_path / "est.mp4"
    _run(VideoConfig(path=str(path)), _frames(14, fps=15.0))
    images, fps = read_video(path)
    assert len(images) == 14 and fps == pytest.approx(15, abs=0.05)
    # ... or the rate a source announces in frame.meta, even for a stream shorter than the probe.
    path = tmp_path / "meta.mp4"
    frames = _frames(3, fps=50.0)
    for f in frames:
        f.meta["fps"] = 12.5
    _run(VideoConfig(path=str(path)), frames)
    images, fps = read_video(path)
    assert len(images) == 3 and fps == pytest.approx(12.5, abs=0.05)
    # A stream shorter than the probe still lands complete in the file when the sink stops.
    path = tmp_path / "short.mp4"
    _run(VideoConfig(path=str(path)), _frames(4, fps=20.0))
    images, fps = read_video(path)
    assert len(images) == 4 and fps == pytest.approx(20, abs=0.05)


def test_size_is_fixed_by_the_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "size.mp4"
    frames = _frames(4)
    big = np.full((480, 640), 110, np.uint8)
    frames.append(Frame("cam", 4, frames[-1].timestamp + 0.1, image=big, original=big,
                        detections=np.array([[0, 0, 100, 100, 0.5, 0]], np.float32), names=NAMES))
    _run(VideoConfig(path=str(path), fps=10), frames)
    images, _ = read_video(path)
    assert len(images) == 5 and all(img.shape == (H, W, 3) for img in images)


def test_one_file_per_source(tmp_path: Path) -> None:
    frames = _frames(6, source="a", cls=0) + _frames(4, source="b", cls=2)
    frames.sort(key=lambda f: f.timestamp)
    _run(VideoConfig(path=str(tmp_path / "rec-{source}.mp4"), fps=10), frames)
    a, _ = read_video(tmp_path / "rec-a.mp4")
    b, _ = read_video(tmp_path / "rec-b.mp4")
    assert (len(a), len(b)) == (6, 4)
    assert edge_colour_ratio(b[3], _box(3), color(2)) > 0.9
    # Without {source}, the first source is recorded and the other is left out.
    _run(VideoConfig(path=str(tmp_path / "one.mp4"), fps=10), frames)
    one, _ = read_video(tmp_path / "one.mp4")
    assert len(one) == 6


def test_codec_fallback_to_mjpg_avi(tmp_path: Path) -> None:
    # An encoder OpenCV lacks (as mp4v is on OpenCV builds without FFmpeg): MJPG in an .avi.
    path = tmp_path / "clip.mp4"
    _run(VideoConfig(path=str(path), codec="ZZZZ", fps=10), _frames(5))
    assert not path.exists()
    images, _ = read_video(tmp_path / "clip.avi")
    assert len(images) == 5
    assert edge_colour_ratio(images[2], _box(2), color(0)) > 0.9


def test_check_refuses_unwritable_paths(tmp_path: Path) -> None:
    def check(path: str) -> str:
        with pytest.raises(StageError) as err:
            VideoSink(VideoConfig(path=path), StageContext("video")).check()
        return str(err.value)

    assert "does not exist" in check(str(tmp_path / "missing" / "out.mp4"))
    (tmp_path / "dir.mp4").mkdir()
    assert "not a regular file" in check(str(tmp_path / "dir.mp4"))
    (tmp_path / "file").write_text("")
    assert "does not exist" in check(str(tmp_path / "file" / "out.mp4"))

    # A directory without write permission; root ignores permission bits, so check as nobody
    # (in a folder nobody can reach: pytest's tmp_path is private to its user).
    outer = Path(tempfile.mkdtemp(prefix="edgepipe-video-"))
    outer.chmod(0o755)
    locked = outer / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    code = (
        "import sys; from edgepipe.stage import StageContext, StageError\n"
        "from edgepipe_plugins.sinks.video import VideoConfig, VideoSink\n"
        "try:\n"
        f"    VideoSink(VideoConfig(path={str(locked / 'out.mp4')!r}), StageContext('v')).check()\n"
        "except StageError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        shutil.rmtree(outer)
    assert run.returncode == 3, run.stderr
    assert "is not writable" in run.stdout


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValidationError, match="unknown placeholder"):
        VideoConfig(path="out-{camera}.mp4")
    with pytest.raises(ValidationError, match="must end in one of"):
        VideoConfig(path="out.txt")
    with pytest.raises(ValidationError, match="file name only"):
        VideoConfig(path="{source}/out.mp4")
    with pytest.raises(ValidationError, match="codec"):
        VideoConfig(path="out.mp4", codec="h264x")
    with pytest.raises(ValidationError, match="fps"):
        VideoConfig(path="out.mp4", fps=0)


def test_sample_config_validates(repo: Path) -> None:
    sample = yaml.safe_load((repo / "plugins/sinks/video/sample.yaml").read_text())
    (name, settings), = sample["stages"].items()
    assert settings.pop("type") == "video"
    VideoConfig(**settings)


def test_a_1280x720_stream_is_recorded_whole(tmp_path: Path) -> None:
    # Every frame of a 1280x720 stream is drawn and written (how fast: benchmarks/README.md and
    # the sink's README; a test asserts no speed, the machine may be busy).
    img = np.full((720, 1280), 100, np.uint8)
    det = np.array([[100, 100, 400, 300, 0.9, 0], [600, 300, 700, 500, 0.8, 3]], np.float32)
    frames = [Frame("cam", i, 1.0 + i / 30, image=img, original=img, detections=det, names=NAMES) for i in range(30)]
    sink = VideoSink(VideoConfig(path=str(tmp_path / "hd.mp4"), fps=30), StageContext("video"))
    sink.start()
    for f in frames:
        sink.process([f])
    sink.stop()
    assert len(read_video(tmp_path / "hd.mp4")[0]) == 30
    assert sink.published.value == 30 and sink.detections.value == 60


# --- what a browser makes of the file ------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from helpers.browser import Browser

    with Browser() as b:
        yield b


def _fourcc(path: Path) -> str:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        return int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode(errors="replace")
    finally:
        cap.release()


def _plays(browser, folder: Path, name: str, width: int, height: int, seconds: float) -> dict:
    """Chromium's report on playing ``folder/name``; asserts it plays like a video should."""
    from helpers.browser import serve_directory

    with serve_directory(folder) as base:
        state = browser.play_video(base + name, play_for=0.5)
    assert state["error"] is None, f"Chromium refuses {name}: {state}"
    assert state["currentTime"] >= 0.5, f"{name} does not advance: {state}"
    assert (state["videoWidth"], state["videoHeight"]) == (width, height), state
    if seconds:
        assert state["duration"] == pytest.approx(seconds, abs=0.15), state
    return state


def test_default_webm_records_vp8_that_a_browser_plays(tmp_path: Path, browser, capfd) -> None:
    path = tmp_path / "clip.webm"
    sink = _run(VideoConfig(path=str(path)), _frames(20, fps=10.0))
    assert sink.config.codec is None and _fourcc(path) == "VP80"  # the extension chose VP8
    images, fps = read_video(path)
    assert len(images) == 20 and fps == pytest.approx(10, abs=0.05)
    assert edge_colour_ratio(images[10], _box(10), color(0)) > 0.9
    _plays(browser, tmp_path, "clip.webm", W, H, 2.0)
    # OpenCV's own complaint about a WebM FourCC ("tag 'VP80' is not supported", then it writes
    # VP8 anyway) does not reach the worker's stderr, nor any other line of theirs.
    assert "OpenCV" not in capfd.readouterr().err


def test_mp4_asks_for_h264_and_says_what_it_wrote_instead(tmp_path: Path, browser, caplog, capfd) -> None:
    path = tmp_path / "clip.mp4"
    with caplog.at_level("INFO", logger="edgepipe"):
        _run(VideoConfig(path=str(path), fps=10), _frames(12))
    fourcc = _fourcc(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if fourcc in ("avc1", "h264", "H264"):  # a platform with an H.264 encoder: plays, no remark
        assert warnings == []
        _plays(browser, tmp_path, "clip.mp4", W, H, 1.2)
    else:  # the pip wheel here: MPEG-4 Part 2 into the same file, and one line naming all of it
        assert fourcc in ("mp4v", "FMP4")  # (FFmpeg's decoder reads the tag back as FMP4)
        assert len(warnings) == 1, warnings
        assert "No H.264 (avc1) encoder" in warnings[0] and "MPEG-4 Part 2 (mp4v)" in warnings[0]
        assert str(path) in warnings[0] and ".webm" in warnings[0]
    assert "h264" not in capfd.readouterr().err.lower(), "FFmpeg's own lines leaked to stderr"
    assert len(read_video(path)[0]) == 12


def test_max_width_scales_the_recording_down(tmp_path: Path) -> None:
    path = tmp_path / "small.webm"
    _run(VideoConfig(path=str(path), fps=10, max_width=160), _frames(6))
    images, _ = read_video(path)
    assert len(images) == 6 and images[0].shape == (120, 160, 3)


def test_webm_of_a_killed_worker_plays_up_to_what_was_written(tmp_path: Path, browser) -> None:
    # kill -9 in the middle of a recording: no stop(), so the WebM has no index, no duration and
    # loses what was still buffered (the encoder's lag and FFmpeg's 256 KB output buffer). What
    # reached the disk must still play in a browser. A high bitrate on incompressible frames
    # fills the buffer quickly, so the test needs only a few seconds of video.
    code = (
        "import os, signal, numpy as np\n"
        "from edgepipe.messages import Frame\n"
        "from edgepipe.stage import StageContext\n"
        "from edgepipe_plugins.sinks.video import VideoConfig, VideoSink\n"
        f"sink = VideoSink(VideoConfig(path={str(tmp_path / 'killed.webm')!r}, fps=10, bitrate=4000), StageContext('v'))\n"
        "sink.start()\n"
        "rng = np.random.default_rng(1)\n"
        "for i in range(80):\n"
        "    img = rng.integers(0, 255, (240, 320), dtype=np.uint8)\n"
        "    sink.process([Frame('cam', i, 1.7e9 + i / 10, image=img, original=img)])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    images, _ = read_video(tmp_path / "killed.webm")
    assert 10 <= len(images) < 80, f"{len(images)} of 80 frames readable after kill -9"
    state = _plays(browser, tmp_path, "killed.webm", 320, 240, 0)
    assert state["duration"] == "Infinity", "without its index the length is unknown until the end"


def test_lines_caught_while_opening_go_back_to_stderr_unless_they_are_opencv_s(capfd, caplog) -> None:
    import logging

    from edgepipe_plugins.sinks.video import _native_output

    log = logging.getLogger("edgepipe.stage.video-test")
    with caplog.at_level("DEBUG", logger=log.name):
        with _native_output(log):
            os.write(2, b"OpenCV: FFMPEG: tag 0x30385056/'VP80' is not supported with codec id 139\n")
            os.write(2, b"[h264_v4l2m2m @ 0x55d0c0ffee00] Could not find a valid device\n")
            os.write(2, b"12:00:00 INFO    supervisor: a line of another thread\n")
    err = capfd.readouterr().err
    assert err == "12:00:00 INFO    supervisor: a line of another thread\n"
    debug = [r.getMessage() for r in caplog.records]
    assert any("VP80" in m for m in debug) and any("h264_v4l2m2m" in m for m in debug)
