"""The `zones` stage: bad zones are refused by `edgepipe validate` with one line naming the path;
the geometry (simple polygons, the direction of a crossing); and, through a real daemon running
the demo model on a scripted scene whose true counts are known, line crossings and zone entries
counted exactly, read from a real /metrics scrape and from the events on the ZeroMQ topic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import yaml
from edgepipe_plugins.processors.zones.geometry import inside, polygon_problem, side
from helpers.daemon import Daemon, Subscriber
from helpers.net import free_port

from edgepipe.client import EventMessage, events_schema
from edgepipe.scenes import CLASSES

W, H = 640, 360


def chain(zones: Dict[str, Any], tracker: bool = True) -> Dict[str, Any]:
    stages: Dict[str, Any] = {
        "scene": {"type": "synthetic", "width": W, "height": H, "fps": 10},
        "prep": {"type": "letterbox", "inputs": ["scene"]},
        "detector": {"type": "yolov5", "inputs": ["prep"], "weights": "builtin:demo"},
        "post": {"type": "nms", "inputs": ["detector"]},
    }
    if tracker:
        stages["track"] = {"type": "tracker", "inputs": ["post"]}
    stages["zones"] = dict({"type": "zones", "inputs": ["track" if tracker else "post"]}, **zones)
    stages["publish"] = {"type": "zmq_pub", "inputs": ["zones"]}
    return {"name": "zones-test", "stages": stages}


SQUARE = [[0.1, 0.1], [0.4, 0.1], [0.4, 0.6], [0.1, 0.6]]
BAD = {
    "self_intersecting": (
        {"zones": {"bow": {"polygon": [[0.1, 0.1], [0.5, 0.5], [0.5, 0.1], [0.1, 0.5]]}}},
        "stages.zones.zones.bow.polygon: edges 0-1 and 2-3 cross: the polygon intersects itself",
    ),
    "zero_length_line": (
        {"lines": {"gate": {"points": [[0.5, 0.2], [0.5, 0.2]]}}},
        "stages.zones.lines.gate.points: the line has zero length (both ends are [0.5, 0.2])",
    ),
    "fraction_outside": (
        {"zones": {"dock": {"polygon": [[0.1, 0.1], [1.2, 0.1], [1.2, 0.6]]}}},
        "stages.zones: zones.dock.polygon: point 1 [1.2, 0.1] lies outside the frame",
    ),
    "pixels_outside": (
        {"units": "pixels", "lines": {"gate": {"points": [[320, 0], [320, 400]]}}},
        "stages.zones: lines.gate.points: point [320.0, 400.0] lies outside the 640x360 frame of source 'scene'",
    ),
    "unknown_class": (
        {"zones": {"dock": {"polygon": SQUARE, "classes": ["square", "person"]}}},
        "stages.zones: zones.dock.classes: unknown class 'person'; the detector's classes are circle, square, triangle, cross",
    ),
    "no_tracker": (
        {"zones": {"dock": {"polygon": SQUARE}}},
        "stages.zones: a zones stage needs a tracker upstream",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_edgepipe_validate_refuses_in_one_line_naming_the_path(case: str, tmp_path: Path):
    zones, expected = BAD[case]
    config = chain(zones, tracker=case != "no_tracker")
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "edgepipe", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("edgepipe: error: " + expected), lines[0]


def test_the_tracker_checks_its_class_names_too(tmp_path: Path):
    config = chain({"zones": {"dock": {"polygon": SQUARE}}})
    config["stages"]["track"]["classes"] = ["sqare"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "edgepipe", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == ("edgepipe: error: stages.track: classes: unknown class 'sqare'; the "
                                   "detector's classes are circle, square, triangle, cross")


def test_polygons_and_sides():
    assert polygon_problem([[0, 0], [1, 0], [1, 1], [0, 1]]) is None
    assert "intersects itself" in polygon_problem([[0, 0], [1, 1], [1, 0], [0, 1]])
    assert "no area" in polygon_problem([[0, 0], [1, 1], [2, 2]])
    assert "same" in polygon_problem([[0, 0], [0, 0], [1, 1]])
    poly = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    assert inside(np.array([[5, 5], [15, 5], [-1, 2]]), poly).tolist() == [True, False, False]
    # A line drawn top to bottom: its first direction (+1 side) is towards the left of the picture.
    a, b = np.array([50.0, 0.0]), np.array([50.0, 100.0])
    assert side(np.array([[40, 50], [60, 50], [50.5, 50]]), a, b, 1.0).tolist() == [1, -1, 0]


# -- counts through a real daemon ----------------------------------------------------------------

# Six scripted objects (well apart in time or rows, so none hides another), each a straight path.
# The line is vertical at x = 320 drawn top to bottom: 'westward' is its first direction.
SCRIPT = [  # shape, size, start (x, y), end (x, y), first frame, frames
    ("square", 60, (60, 90), (580, 90), 0, 60),       # crosses eastward, passes through the dock
    ("circle", 60, (580, 250), (60, 250), 5, 60),     # crosses westward, misses the dock
    ("triangle", 64, (80, 270), (580, 270), 30, 60),  # crosses eastward, misses the dock
    ("cross", 64, (560, 100), (400, 100), 40, 40),    # enters the dock, does not reach the line
    ("square", 56, (200, 60), (200, 300), 70, 40),    # moves down, left of the line: nothing
    ("circle", 56, (600, 140), (40, 140), 80, 45),    # crosses westward through the dock
]
# The dock: x 360..520, y 40..180 (pixels); a box's anchor is the middle of its bottom edge.
DOCK = [[360, 40], [520, 40], [520, 180], [360, 180]]
FRAMES = 170


def expected_counts() -> Tuple[Dict[str, int], int]:
    """Crossings per direction and dock entries, from the geometry of the script."""
    cross = {"westward": 0, "eastward": 0}
    entries = 0
    for _shape, size, (x0, y0), (x1, y1), _first, _n in SCRIPT:
        if min(x0, x1) < 320 < max(x0, x1):
            cross["westward" if x1 < x0 else "eastward"] += 1
        bottom = np.array([[x0 + f * (x1 - x0), y0 + f * (y1 - y0) + size / 2] for f in np.linspace(0, 1, 200)])
        entries += int(inside(bottom, np.array(DOCK, float)).any())
    return cross, entries


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("zones")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    script = [{"shape": s, "size": z, "start": list(a), "end": list(b), "first": f, "frames": n}
              for s, z, a, b, f, n in SCRIPT]
    config = {
        "name": "zones-count",
        "stages": {
            "scene": {"type": "synthetic", "width": W, "height": H, "fps": 20, "count": FRAMES,
                      "seed": 5, "script": script},
            "prep": {"type": "letterbox", "inputs": ["scene"], "imgsz": 640},
            "detector": {"type": "yolov5", "inputs": ["prep"], "weights": "builtin:demo", "device": "cpu",
                         "imgsz": 640, "threads": 1},
            "post": {"type": "nms", "inputs": ["detector"]},
            "track": {"type": "tracker", "inputs": ["post"]},
            "zones": {"type": "zones", "inputs": ["track"], "units": "pixels",
                      "zones": {"dock": {"polygon": DOCK}},
                      "lines": {"middle": {"points": [[320, 0], [320, 360]],
                                           "directions": ["westward", "eastward"]}}},
            "publish": {"type": "zmq_pub", "inputs": ["zones"], "bind": endpoint},
            "log": {"type": "jsonl", "inputs": ["zones"], "path": str(tmp / "out.jsonl"),
                    "detections": False, "events": True},
        },
    }
    with Subscriber(endpoint, topic="events/") as events, Subscriber(endpoint) as dets, \
            Daemon(config, tmp) as daemon:
        daemon.wait_ready(180)
        # Every scripted object is gone by frame 126 and its track ended (track_buffer 30) by
        # frame 157; read the counts before the source ends (tracks open then get no end event).
        dets.wait_for(lambda ms: any(m["frame_id"] >= 165 for _, m in ms), timeout=120)
        samples = daemon.samples()
        assert daemon.wait(timeout=120) == 0, daemon.log
        events.wait_for(lambda ms: True, timeout=1)
        yield samples, [m for _, m in events.snapshot()], tmp / "out.jsonl", [m for _, m in dets.snapshot()]


def test_line_crossings_and_zone_entries_are_exact(scripted):
    samples, events, _, _ = scripted
    cross, entries = expected_counts()
    assert cross == {"westward": 2, "eastward": 2} and entries == 3  # the script is what it says

    def value(name: str, **labels: str) -> float:
        got = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
        assert len(got) == 1, (name, labels, got)
        return got[0]

    for direction, n in cross.items():
        assert value("edgepipe_zone_crossings_total", stage="zones", source="scene", line="middle",
                     direction=direction) == n
    assert value("edgepipe_zone_entries_total", stage="zones", source="scene", zone="dock") == entries
    assert value("edgepipe_zone_objects", stage="zones", source="scene", zone="dock") == 0
    got = {d: sum(1 for e in events if e["type"] == "cross" and e["direction"] == d) for d in cross}
    assert got == cross
    assert sum(1 for e in events if e["type"] == "enter" and e["zone"] == "dock") == entries
    assert sum(1 for e in events if e["type"] == "leave" and e["zone"] == "dock") == entries


def test_each_object_is_one_track_with_its_lifecycle(scripted):
    _, events, _, dets = scripted
    news = [e for e in events if e["type"] == "new"]
    assert len(news) == len(SCRIPT), [(e["track_id"], e["label"]) for e in news]
    assert [e["label"] for e in sorted(news, key=lambda e: e["frame_id"])] == [s[0] for s in SCRIPT]
    ends = [e for e in events if e["type"] == "end"]
    assert sorted(e["track_id"] for e in ends) == sorted(e["track_id"] for e in news)
    assert all(e["reason"] == "lost" for e in ends)
    ids = {d["track_id"] for m in dets for d in m["detections"]} - {None}
    assert ids == {e["track_id"] for e in news}
    for e in events:
        if e["type"] == "leave":
            assert 0 < e["duration"] < 6 and e["zones"] == []
        if e["type"] == "enter":
            assert e["zones"] == ["dock"]


def test_events_follow_the_shipped_schema_and_the_jsonl_sink_records_them(scripted):
    _, events, jsonl, _ = scripted
    schema = events_schema()
    assert events
    for e in events:
        EventMessage.model_validate(e)
        assert set(schema["required"]) <= set(e)
        assert e["schema"] == "edgepipe.events/v1" and e["source"] == "scene"
    assert len({e["event_id"] for e in events}) == len(events)
    records = [yaml.safe_load(line) for line in jsonl.read_text().splitlines()]
    assert [r["event_id"] for r in records] == [e["event_id"] for e in events]
    # The lifecycle shows each change of zones: an update in the same frame, or the track's end
    # (a track that ends inside a zone leaves it with its end).
    announced = {(e["track_id"], e["frame_id"]) for e in events
                 if (e["type"] == "update" and "zones" in e["changed"]) or e["type"] == "end"}
    changes = [(e["track_id"], e["frame_id"]) for e in events if e["type"] in ("enter", "leave")]
    assert len(changes) == 2 * expected_counts()[1]
    assert set(changes) <= announced


def _unused(_: List[str]) -> None:  # keeps CLASSES imported for readers of SCRIPT
    assert set(_) <= set(CLASSES)
