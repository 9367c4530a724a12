"""First-party sources driven directly (start/read/stop) on real inputs: generated video files,
image folders, the synthetic scene stream, a real ZeroMQ producer, and the camera pre-flight on a
machine without cameras. RTSP and GStreamer have their own files (test_rtsp.py, test_gstreamer.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import zmq
from edgepipe_plugins.sources.camera import CameraConfig, CameraSource
from edgepipe_plugins.sources.file import FileConfig, FileSource
from edgepipe_plugins.sources.images import ImagesConfig, ImagesSource
from edgepipe_plugins.sources.synthetic import SyntheticConfig, SyntheticSource
from edgepipe_plugins.sources.zmq import ZmqConfig, ZmqSource
from pydantic import ValidationError

from edgepipe.messages import Frame, encode, encode_eos
from edgepipe.scenes import SceneStream
from edgepipe.stage import EndOfStream, Source, StageContext, StageError


def read_all(source: Source, limit: int = 1000, timeout: float = 20.0) -> List[Frame]:
    """Read until EndOfStream (or ``limit`` frames); None answers are waited through."""
    frames: List[Frame] = []
    deadline = time.monotonic() + timeout
    while len(frames) < limit:
        assert time.monotonic() < deadline, f"source stalled after {len(frames)} frames"
        try:
            frame = source.read()
        except EndOfStream:
            break
        if frame is not None:
            frames.append(frame)
    return frames


def write_video(path: Path, levels: List[int], fps: float = 25.0, size=(96, 64)) -> None:
    """A video whose frame k is a flat gray image of brightness levels[k] (decodes within a few levels)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for level in levels:
        writer.write(np.full((size[1], size[0], 3), level, np.uint8))
    writer.release()


# ------------------------------------------------------------------------------------ synthetic


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


# ------------------------------------------------------------------------------------ file


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


# ------------------------------------------------------------------------------------ images


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


# ------------------------------------------------------------------------------------ camera


def test_camera_check_fails_fast_without_a_device():
    for device in (0, "/dev/video7", "3"):
        cfg = CameraConfig(device=device)
        src = CameraSource(cfg, StageContext("cam"))
        if Path(f"/dev/video{cfg.device}" if isinstance(cfg.device, int) else cfg.device).exists():
            pytest.fail("this test expects a machine without V4L2 cameras")
        with pytest.raises(StageError, match=r"does not exist.*configs/synthetic.yaml"):
            src.check()
    assert CameraConfig(device="3").device == 3  # "${CAMERA:-3}" interpolates to a string
    with pytest.raises(ValidationError, match="fourcc"):
        CameraConfig(fourcc="MJPEG")


# ------------------------------------------------------------------------------------ zmq


def test_zmq_source_receives_renumbers_and_counts_malformed(tmp_path: Path):
    address = f"ipc://{tmp_path}/frames.sock"
    src = ZmqSource(ZmqConfig(bind=address, stop_on_eos=True), StageContext("remote"))
    src.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    try:
        image = np.arange(64 * 32, dtype=np.uint8).reshape(32, 64)
        for k in (5, 6):
            push.send_multipart(
                encode(Frame("cam7", k, 1000.0 + k, image=image, width=128, height=64, ratio=(0.5, 0.5), pad=(0.0, 0.0)))
            )
        push.send_multipart([b"\x93garbage"])
        push.send_multipart(encode_eos("cam7"))
        frames = read_all(src, timeout=10)
    finally:
        push.close(linger=0)
        ctx.term()
        src.stop()
    assert [(f.source, f.frame_id) for f in frames] == [("remote", 0), ("remote", 1)]
    assert [f.meta["upstream"] for f in frames] == [{"source": "cam7", "frame_id": 5}, {"source": "cam7", "frame_id": 6}]
    assert frames[1].timestamp == 1006.0 and frames[1].ratio == (0.5, 0.5)
    assert (frames[0].width, frames[0].height) == (128, 64)
    np.testing.assert_array_equal(frames[0].image, image)
    assert src.metrics.errors.labels("decode").value == 1


def test_zmq_source_keeps_source_and_connects(tmp_path: Path):
    address = f"ipc://{tmp_path}/producer.sock"
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(address)
    src = ZmqSource(ZmqConfig(connect=address, keep_source=True, live=False), StageContext("relay"))
    assert not src.live
    src.start()
    try:
        for source, k in (("a", 3), ("b", 9)):
            push.send_multipart(encode(Frame(source, k, 1.0, image=np.zeros((4, 4), np.uint8))))
        frames = read_all(src, limit=2, timeout=10)
    finally:
        push.close(linger=0)
        ctx.term()
        src.stop()
    assert [(f.source, f.frame_id) for f in frames] == [("a", 3), ("b", 9)]


def test_zmq_source_config_rules():
    with pytest.raises(ValidationError, match="exactly one of 'bind' and 'connect'"):
        ZmqConfig()
    with pytest.raises(ValidationError, match="refusing to bind 'tcp://0.0.0.0:5560'"):
        ZmqConfig(bind="tcp://0.0.0.0:5560")
    assert ZmqConfig(bind="tcp://0.0.0.0:5560", insecure=True).insecure
    assert ZmqConfig(connect="tcp://10.0.0.5:5560").connect == "tcp://10.0.0.5:5560"
    assert ZmqSource(ZmqConfig(bind="ipc:///x", carries="letterboxed"), StageContext("z")).output_kind() == "letterboxed"
