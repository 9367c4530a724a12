"""The `preview` page with a tracker and a zones stage upstream, in a real headless Chromium: the
stream shows the zone (outlined in its colour where its polygon is), the line, each track's id and
trail; the page lists the zones and lines with their live counts and the latest events; and
/api/latest carries them."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Iterator

import cv2
import numpy as np
import pytest
from edgepipe_plugins.sinks.preview import PreviewConfig, PreviewSink
from edgepipe_plugins.sinks.preview.overlay import LINE_COLOUR, ZONE_COLOUR
from helpers.browser import Browser
from helpers.pixels import edge_colour_ratio

from edgepipe.messages import Frame, event_message
from edgepipe.stage import StageContext

NAMES = ["circle", "square", "triangle", "cross"]
ZONE = [[200.0, 40.0], [300.0, 40.0], [300.0, 200.0], [200.0, 200.0]]  # original pixels, 320x240
LINE = [[100.0, 0.0], [100.0, 240.0]]


def _frame(i: int) -> Frame:
    img = np.full((240, 320), 90, np.uint8)
    x = 20 + 3 * (i % 40)
    cv2.rectangle(img, (x, 120), (x + 30, 150), 220, -1)
    dets = np.array([[x, 120, x + 30, 150, 0.9, 1]], np.float32)
    f = Frame("cam", i, time.time(), image=img, original=img, detections=dets, names=NAMES, track_ids=[7])
    f.meta["zones"] = {
        "zones": [{"name": "dock", "points": ZONE, "objects": 1, "entries": 4}],
        "lines": [{"name": "gate", "points": LINE, "directions": ["westward", "eastward"], "crossings": [2, 5]}],
    }
    if i % 20 == 0:
        track = {"track_id": 7, "label": "square", "class_id": 1, "first_seen": 1.0, "last_seen": 2.0,
                 "best_confidence": 0.9, "confidence": 0.9, "bbox": dets[0, :4].tolist(), "snapshot": None}
        f.events = [event_message("cross", f, track, "run1", line="gate", direction="eastward")]
    return f


@pytest.fixture
def sink() -> Iterator[PreviewSink]:
    s = PreviewSink(PreviewConfig(port=0, max_fps=8), StageContext("preview"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_zones_lines_track_ids_and_trails_on_the_page(sink: PreviewSink, tmp_path) -> None:
    for i in range(30):  # a trail's worth of frames first
        sink.process([_frame(i)])
    with Browser(width=1280, height=1000) as b:
        b.open(sink.url)
        i = 30
        deadline = time.monotonic() + 30
        shown = ""
        while time.monotonic() < deadline:
            sink.process([_frame(i)])
            i += 1
            shown = b.run("const t = document.getElementById('zones').innerText;"
                          "const ok = [...document.querySelectorAll('.stream img')].some(i => i.complete && i.naturalWidth > 0);"
                          "return ok && /dock/.test(t) ? t : '';")
            if shown:
                break
            time.sleep(0.1)
        assert "cam · dock" in shown and "4 entered" in shown, shown
        assert "westward 2" in shown and "eastward 5" in shown, shown
        events = b.run("return document.getElementById('events').innerText")
        assert "cross" in events and "#7" in events and "gate eastward" in events, events
        dets = b.run("return document.getElementById('detections').innerText")
        assert "#7" in dets and "square" in dets, dets
        for _ in range(10):
            sink.process([_frame(i)])
            i += 1
            time.sleep(0.1)
        shot = b.screenshot()
        cv2.imwrite(str(tmp_path / "preview-tracks.png"), shot)
        r = b.run("const img = document.querySelector('.stream img'); const r = img.getBoundingClientRect();"
                  "return {x: r.left, y: r.top, w: r.width, h: r.height, nw: img.naturalWidth, nh: img.naturalHeight};")
    sx, sy = r["w"] / r["nw"], r["h"] / r["nh"]
    zone = [r["x"] + 200 * sx, r["y"] + 40 * sy, r["x"] + 300 * sx, r["y"] + 200 * sy]
    assert edge_colour_ratio(shot, zone, ZONE_COLOUR) > 0.9, "the zone's outline is not where its polygon is"
    line = shot[int(r["y"] + 10 * sy):int(r["y"] + 100 * sy), int(r["x"] + 99 * sx) - 2:int(r["x"] + 101 * sx) + 3]
    white = (np.abs(line.astype(int) - np.array(LINE_COLOUR)).max(axis=2) < 60).any(axis=1)
    assert white.mean() > 0.9, "the line is not drawn where it is"
    # The trail: the square's colour along its path, left of where it is now.
    latest = json.loads(urllib.request.urlopen(sink.url + "api/latest", timeout=10).read())
    cam = latest["sources"][0]
    assert cam["zones"]["zones"][0]["name"] == "dock" and cam["message"]["detections"][0]["track_id"] == 7
    assert any(e["type"] == "cross" for e in cam["events"])
