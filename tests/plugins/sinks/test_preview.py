"""The ``preview`` sink driven directly (start/process/stop) in the test process, watched over real
HTTP and in a real headless Chromium: the page loads, the stream updates, boxes are drawn where the
detections are (checked on screenshot pixels), the latest detections list names them; JPEG
encoding is capped and happens only while someone watches; the pipeline side never waits for a
viewer; stop() leaves no thread and no open port behind; the pre-flight, defaults and sample.
The preview inside a running daemon is in tests/test_pipelines.py."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, List, Tuple

import cv2
import numpy as np
import pytest
import yaml
from edgepipe_plugins.sinks.preview import PreviewConfig, PreviewSink
from helpers.browser import Browser
from helpers.frames import NAMES
from helpers.pixels import colour_mask, edge_colour_ratio
from helpers.preview import CAM_TRIANGLE, cam_frame, crop, get_json, stream_rects, to_screen

from edgepipe.draw import color
from edgepipe.messages import Frame
from edgepipe.stage import StageContext, StageError

# "cam" carries its original 320x240 picture: a bright square moving right (detected as class 0,
# red) and a fixed triangle (class 2, blue). "lb" carries only its letterboxed 320x320 picture
# of a 640x480 source (ratio 0.5, 40 px bands), with a fixed square (class 1, green) whose box
# is in original pixels and must be mapped onto the letterboxed picture.
LB_SQUARE = [100.0, 120.0, 300.0, 360.0]  # original pixels
LB_SQUARE_DRAWN = [50.0, 100.0, 150.0, 220.0]  # x * 0.5 + 0, y * 0.5 + 40
FEED_FPS = 25.0


def _lb_frame(i: int) -> Frame:
    lb = np.full((320, 320), 114, np.uint8)
    lb[40:280] = 60 + (i % 20)
    dets = np.array([LB_SQUARE + [0.66, 1]], np.float32)
    return Frame("lb", i, time.time(), image=lb, width=640, height=480, ratio=(0.5, 0.5),
                 pad=(0.0, 40.0), detections=dets, names=NAMES, timing={"letterbox": 0.001})


class Feeder:
    """Calls sink.process like a worker loop would, at FEED_FPS, timing every call."""

    def __init__(self, sink: PreviewSink, sources: Tuple[str, ...] = ("cam", "lb")):
        self.sink = sink
        self.sources = sources
        self.calls: List[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="feeder")
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            frames = [(cam_frame if s == "cam" else _lb_frame)(i) for s in self.sources]
            t = time.perf_counter()
            self.sink.process(frames)
            self.calls.append(time.perf_counter() - t)
            i += 1
            self.stop.wait(1.0 / FEED_FPS)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture
def sink() -> Iterator[PreviewSink]:
    before = set(threading.enumerate())
    s = PreviewSink(PreviewConfig(port=0, max_fps=8), StageContext("preview"))
    s.check()
    s.start()
    try:
        yield s
    finally:
        s.stop()
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not left, f"threads left running after stop(): {left}"


@pytest.fixture
def feeder(sink: PreviewSink) -> Iterator[Feeder]:
    f = Feeder(sink)
    try:
        yield f
    finally:
        f.close()


def test_page_in_headless_chromium(sink: PreviewSink, feeder: Feeder, tmp_path: Path) -> None:
    with Browser(width=1280, height=1000) as b:
        b.open(sink.url)
        assert "edgepipe" in b.run("return document.title")
        b.wait_for(
            "const imgs = [...document.querySelectorAll('.stream img')];"
            "return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0);",
            what="both streams showing a picture",
        )
        b.wait_for(
            "return document.querySelectorAll('#stages tbody tr').length >= 4",
            what="the stage table",
        )
        rects = stream_rects(b)
        assert (rects["cam"]["nw"], rects["cam"]["nh"]) == (320, 240)
        assert (rects["lb"]["nw"], rects["lb"]["nh"]) == (320, 320)
        for r in rects.values():
            assert r["w"] > 100 and r["y"] + r["h"] <= 1000, f"stream not in the viewport: {r}"
        first = b.screenshot()
        time.sleep(0.8)
        second = b.screenshot()
        cv2.imwrite(str(tmp_path / "preview.png"), second)

        # The stream updates: the moving square changed the stream area between screenshots.
        diff = np.abs(crop(first, rects["cam"]).astype(int) - crop(second, rects["cam"]).astype(int))
        assert diff.max(axis=2).astype(bool).mean() > 0.005, "the cam stream did not change"

        # Boxes are drawn where the detections are, in their class colours, on the screenshot.
        for shot in (first, second):
            tri = to_screen(CAM_TRIANGLE, rects["cam"])
            assert edge_colour_ratio(shot, tri, color(2)) > 0.9, "cam: triangle box missing"
            sq = to_screen(LB_SQUARE_DRAWN, rects["lb"])
            assert edge_colour_ratio(shot, sq, color(1)) > 0.9, "lb: square box not mapped"
            # The moving square's red box lies in its band (y 30..80 of the picture) only.
            cam = crop(shot, rects["cam"])
            red = colour_mask(cam) & (np.abs(cam.astype(int) - color(0)).max(axis=2) < 80)
            rows = np.nonzero(red.any(axis=1))[0] / (rects["cam"]["h"] / 240)
            assert len(rows) and rows.min() >= 14 and rows.max() <= 84, "cam: red box misplaced"
        # Nothing coloured where no detection is (lower-left corner of the cam picture).
        cam = crop(second, rects["cam"])
        assert not colour_mask(cam[int(cam.shape[0] * 0.8) :, : int(cam.shape[1] * 0.3)]).any()

        # The latest detections list names every detection, with its confidence.
        text = b.wait_for(
            "const t = document.getElementById('detections').innerText;"
            "return /circle/.test(t) && /triangle/.test(t) && /square/.test(t) ? t : '';",
            what="labels in the detections list",
        )
        assert "0.91" in text and "0.77" in text and "0.66" in text
        # Per-stage stats from frame.timing: the detector's 30 ms shows.
        stages = b.run("return document.getElementById('stages').innerText")
        assert "yolov5" in stages and "30.0" in stages


def test_api_latest_reports_detections_and_stats(sink: PreviewSink, feeder: Feeder) -> None:
    time.sleep(2.0)
    doc = get_json(sink.url + "api/latest")
    by_source = {s["source"]: s for s in doc["sources"]}
    assert set(by_source) == {"cam", "lb"}
    cam = by_source["cam"]
    msg = cam["message"]
    assert msg["schema"] == "edgepipe.detections/v2" and msg["width"] == 320
    assert [d["label"] for d in msg["detections"]] == ["circle", "triangle"]
    assert msg["detections"][1]["bbox"] == CAM_TRIANGLE
    assert by_source["lb"]["message"]["detections"][0]["bbox"] == LB_SQUARE  # original pixels
    # The feeder runs at most at FEED_FPS (less on a busy box); the sink measures what it gets.
    assert 0.4 * FEED_FPS < cam["fps"] <= 1.2 * FEED_FPS
    assert cam["detections_per_s"] == pytest.approx(2 * cam["fps"], rel=0.15)
    assert 0 <= cam["age_ms"] < 500
    stages = {s["stage"]: s for s in doc["stages"]}
    assert stages["yolov5"]["mean_ms"] == pytest.approx(30.0)
    assert stages["letterbox"]["fps"] == pytest.approx(2 * stages["yolov5"]["fps"], rel=0.2)
    assert doc["palette"][0] == "#ff0000"
    assert sink.published.value >= 2 * cam["frames"] - 2
    assert sink.detections.value >= 3 * cam["frames"] - 3


def _read_parts(url: str, seconds: float) -> List[bytes]:
    """The JPEG parts an MJPEG client receives from ``url`` within ``seconds``."""
    parts: List[bytes] = []
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            line = resp.readline()
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
                resp.readline()
                parts.append(resp.read(n))
    return parts


def test_jpeg_only_while_watched_and_capped(sink: PreviewSink, feeder: Feeder) -> None:
    time.sleep(1.0)
    assert sink.hub.encoded == 0, "encoded JPEGs while nobody watched"
    parts = _read_parts(sink.url + "stream/cam", 3.0)
    # max_fps is 8: at most ~24 parts in 3 s (one right away), and close to that when frames
    # come at 25 fps (a busy 2-core box may deliver fewer).
    assert 8 <= len(parts) <= 26, len(parts)
    for p in (parts[0], parts[-1]):
        img = cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (240, 320, 3)
    encoded = sink.hub.encoded
    assert encoded <= len(parts) + 2
    # Two viewers share the encoded pictures: encodes stay at the cap, not twice it.
    results: List[List[bytes]] = []
    threads = [
        threading.Thread(target=lambda: results.append(_read_parts(sink.url + "stream", 2.0)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(len(r) >= 5 for r in results)
    assert sink.hub.encoded - encoded <= 8 * 2 + 3
    # Nobody watches any more: encoding stops.
    time.sleep(0.5)
    idle = sink.hub.encoded
    time.sleep(1.0)
    assert sink.hub.encoded == idle


def test_pipeline_never_waits_for_a_stuck_viewer(sink: PreviewSink, feeder: Feeder) -> None:
    # A viewer that asks for the stream and never reads: the server's writes to it block once
    # the socket buffers fill, but process() must stay as quick as ever, and stop() must not hang.
    port = int(sink.url.rsplit(":", 1)[1].strip("/"))
    stuck = socket.create_connection(("127.0.0.1", port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"GET /stream/cam HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        time.sleep(4.0)
        n0 = len(feeder.calls)
        time.sleep(2.0)
        calls = feeder.calls[n0:]
        assert len(calls) > 20
        # Blocking on the viewer would take the 10 s send timeout; a busy shared CPU may delay
        # a call by scheduling slices, never by seconds.
        assert max(calls) < 2.0, f"process() took up to {max(calls) * 1000:.0f} ms"
        assert sink.hub.encoded > 5  # the stuck viewer was served until its buffers filled
    finally:
        feeder.close()
        t = time.monotonic()
        sink.stop()
        assert time.monotonic() - t < 8.0  # not the viewer's 10 s send timeout
        stuck.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_unknown_source_and_path(sink: PreviewSink, feeder: Feeder) -> None:
    time.sleep(0.3)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(sink.url + "stream/nope", timeout=10)
    assert err.value.code == 404 and b"'cam'" in err.value.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(sink.url + "etc/passwd", timeout=10)
    assert err.value.code == 404


def test_check_refuses_a_taken_port_but_not_its_own_page(sink: PreviewSink) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        taken = PreviewSink(PreviewConfig(port=port), StageContext("preview2"))
        with pytest.raises(StageError, match=f"cannot listen on 127.0.0.1:{port}"):
            taken.check()
    # A reload re-checks while this sink's own page holds the port: that must pass.
    own_port = int(sink.url.rsplit(":", 1)[1].strip("/"))
    PreviewSink(PreviewConfig(port=own_port), StageContext("preview")).check()


def test_defaults_and_sample(repo: Path) -> None:
    config = PreviewConfig()
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert PreviewSink.needs_original
    sample = yaml.safe_load((repo / "plugins/sinks/preview/sample.yaml").read_text())
    ((_, settings),) = sample["stages"].items()
    assert settings.pop("type") == "preview"
    PreviewConfig(**settings)
    with pytest.raises(ValueError, match="max_fps"):
        PreviewConfig(max_fps=0)
    with pytest.raises(ValueError, match="port"):
        PreviewConfig(port=70000)
