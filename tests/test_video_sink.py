"""The `video` sink writes a playable, annotated file: read back with OpenCV, the frame count,
size and rate are right and each detection's box is drawn in its class colour where it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
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


def test_writing_keeps_up(tmp_path: Path) -> None:
    # A 1280x720 stream must not make the sink the bottleneck of a 2-core box at camera rates.
    img = np.full((720, 1280), 100, np.uint8)
    det = np.array([[100, 100, 400, 300, 0.9, 0], [600, 300, 700, 500, 0.8, 3]], np.float32)
    frames = [Frame("cam", i, 1.0 + i / 30, image=img, original=img, detections=det, names=NAMES) for i in range(30)]
    sink = VideoSink(VideoConfig(path=str(tmp_path / "hd.mp4"), fps=30), StageContext("video"))
    sink.start()
    t = time.perf_counter()
    for f in frames:
        sink.process([f])
    per_frame = (time.perf_counter() - t) / len(frames)
    sink.stop()
    assert per_frame < 0.033, f"{per_frame * 1000:.1f} ms per 1280x720 frame"
    assert sink.published.value == 30 and sink.detections.value == 60
