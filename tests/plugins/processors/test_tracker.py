"""The `tracker` stage on its own: skipped frames advance the motion model by the time that passed,
ids are never reused (also by a restarted stage, which ends the tracks that were open), a class
wavering detector keeps its ids, the options validate, the README's option table is the config,
and the accuracy goal on the demo model's detections of scenes with known identities (MOTA, IDF1
and ID switches from py-motmetrics, at 10 fps and with every other frame dropped)."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
from edgepipe_plugins.processors.tracker import TrackerConfig, TrackerStage
from edgepipe_plugins.processors.tracker.bytetrack import TRAIL, _full_view_motion
from pydantic import ValidationError

from edgepipe.messages import Frame
from edgepipe.stage import StageContext

REPO = Path(__file__).resolve().parents[3]
NAMES = ["circle", "square", "triangle", "cross"]


def tracker(runtime_dir: Optional[str] = None, **options) -> TrackerStage:
    stage = TrackerStage(TrackerConfig(**options), StageContext("track", runtime_dir=runtime_dir))
    stage.start()
    return stage


def frame(i: int, boxes: List[List[float]], t: Optional[float] = None) -> Frame:
    dets = np.array(boxes, np.float32).reshape(-1, 6)
    return Frame("cam", i, 1000.0 + (i / 10 if t is None else t), width=640, height=480, detections=dets,
                 names=NAMES)


def moving(i: int, speed: float = 8.0, size: float = 20.0, y: float = 100.0, cls: int = 1) -> List[float]:
    x = 10 + speed * i
    return [x, y, x + size, y + size, 0.9, cls]


def run_ids(boxes_of, frames: int) -> List[List[Optional[int]]]:
    """The track ids of each frame of ``boxes_of(i)``, i = 0 .. frames - 1, through a new tracker."""
    t = tracker()
    out = []
    for i in range(frames):
        f = frame(i, boxes_of(i))
        t.process([f])
        out.append(list(f.track_ids))
    return out


def test_a_frame_id_gap_moves_the_prediction_by_the_elapsed_periods():
    # A 20 px box moving 8 px per frame: 3 periods after frame 7 it is 24 px further. A model
    # stepping once would look 16 px short of it (IoU 0.11, no match) and lose the object.
    t = tracker()
    ids = []
    for i in list(range(8)) + [10, 13, 14, 17]:
        f = frame(i, [moving(i)])
        t.process([f])
        ids.append(f.track_ids[0])
    assert ids[0] is None and ids[1] == 1  # confirmed on its second sighting (min_hits 2)
    assert ids[1:] == [1] * 11, ids


def test_the_timestamp_clock_uses_capture_times():
    # Ids contiguous (a camera that dropped frames before numbering them), timestamps with gaps.
    t = tracker(clock="timestamp")
    times = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 1.0, 1.4]
    ids = []
    for i, ts in enumerate(times):
        f = frame(i, [moving(int(round(ts * 10)))], t=ts)
        t.process([f])
        ids.append(f.track_ids[0])
    assert ids[1:] == [1] * (len(times) - 1), ids


def test_ids_are_never_reused_and_lost_tracks_end_with_a_reason():
    t = tracker(track_buffer=3)
    seen, events = [], []
    for i in range(40):
        # one object at a time, each alive for 10 frames, in different places
        k = i // 10
        f = frame(i, [moving(i % 10, y=50.0 + 80 * k, cls=k % 4)] if i % 10 < 6 else [])
        t.process([f])
        seen += [x for x in f.track_ids if x is not None]
        events += f.events
    assert sorted(set(seen)) == [1, 2, 3, 4]
    kinds = [(e["type"], e["track_id"]) for e in events]
    assert kinds == [("new", 1), ("end", 1), ("new", 2), ("end", 2), ("new", 3), ("end", 3), ("new", 4), ("end", 4)]
    end = [e for e in events if e["type"] == "end"][0]
    assert end["reason"] == "lost" and end["label"] == "circle" and end["schema"] == "edgepipe.events/v1"
    assert end["last_seen"] == pytest.approx(1000.5) and end["first_seen"] == pytest.approx(1000.0)
    assert len({e["event_id"] for e in events}) == len(events)


def test_a_detector_wavering_between_classes_keeps_the_id_and_the_label_follows_the_votes():
    t = tracker()
    ids, events = [], []
    for i in range(12):
        cls = 1 if i < 4 else 2  # square, then the detector calls it a triangle
        f = frame(i, [moving(i, cls=cls)])
        t.process([f])
        ids.append(f.track_ids[0])
        events += f.events
    assert ids[1:] == [1] * 11
    updates = [e for e in events if e["type"] == "update"]
    assert [(u["changed"], u["label"]) for u in updates] == [(["label"], "triangle")]


def test_a_small_object_hidden_for_a_while_keeps_its_id_when_it_comes_out_off_its_path():
    # A 16 px circle moving 3 px per frame is hidden for 15 frames and comes out 8 to 16 px
    # ahead of where its motion predicts it: its predicted box barely or not at all overlaps the
    # detection (IoU 0.33 at 8 px, 0 at 16 px), but the Kalman uncertainty after 15 lost frames
    # covers the offset (step 2b). 25 px off is too far: a new object, a new id.
    def seen(i: int, off: float = 0.0) -> List[float]:
        x = 100 + 3.0 * i + off
        return [x, 100, x + 16, 116, 0.9, 0]

    for off, expected in ((8, 1), (12, 1), (16, 1), (25, 2)):
        t = tracker()
        ids = []
        for i in range(30):
            f = frame(i, [seen(i, off if i >= 25 else 0.0)] if not 10 <= i < 25 else [])
            t.process([f])
            ids.append(f.track_ids[0] if f.track_ids else "hidden")
        assert ids[1:10] == [1] * 9, ids
        assert ids[26:] == [expected] * 4, (off, ids)


def behind(i: int, comes_out: bool = True) -> List[List[float]]:
    """A 16 px circle moving 3 px per frame along y 130, and an 80 px square moving 1 px per
    frame in front of it: the circle is detected until half of it is covered (frame 45), hidden
    for 40 frames, and detected again from frame 86 once it is out on the other side."""
    square = [200.0 + i, 100, 280.0 + i, 180, 0.95, 1]
    x = 100.0 + 3 * i
    seen = x + 8 < square[0] or (comes_out and x + 8 > square[2])
    return [square] + ([[x, 130, x + 16, 146, 0.9, 0]] if seen else [])


def test_two_objects_crossing_behind_a_third_come_out_with_their_own_ids():
    # Two 20 px squares pass behind a 100 px circle in opposite directions, 2 px per frame: one
    # from its right side going left, one from its left going right. Each is seen shrinking as
    # it goes behind (the detector sees the part still in view, at least 8 px of it), is hidden
    # for about 50 frames, and comes out growing on the other side. Both hidden tracks follow
    # the circle, each with its own motion, and each is looked for where it comes out: neither
    # takes the other's object.
    def seen(i: int) -> List[List[float]]:
        boxes = [[200, 100, 300, 200, 0.95, 0]]
        a = 340 - 2.0 * i  # going left, behind the circle from x = 300 down to 200
        b = 140 + 2.0 * i  # going right, behind it from x = 200 up to 300
        for x, y in ((a, 140), (b, 150)):
            left, right = x, x + 20
            if right > 200 and left < 300:  # partly or wholly behind
                left, right = (max(left, 300), right) if x > 250 else (left, min(right, 200))
            if right - left >= 8:
                boxes.append([left, y, right, y + 20, 0.9, 1])
        return boxes

    rows = run_ids(seen, 100)
    first = rows[5]  # circle, a, b
    last = rows[-1]
    assert len(first) == 3 and None not in first, rows[:6]
    assert len(last) == 3 and None not in last, rows[-1]
    assert last == first, (first, last)  # a (rows' second box) ends on the left, b on the right


def test_an_object_going_behind_another_keeps_the_motion_it_had_while_seen_whole():
    # A 30 px object going left at 2 px per frame, seen whole until frame 10, then going behind
    # an object that comes right at 2 px per frame: the part of it in view shrinks 4 px per frame
    # from its left side, and its box's centre stands still, the wrong motion to look for it
    # with while it is hidden. Its motion is measured over its last sightings (TRAIL) where it
    # was whole.
    trail = deque(maxlen=TRAIL)
    for i in range(16):
        x1, x2 = 400 - 2.0 * i, 430 - 2.0 * i
        if i > 10:
            x1 = 380 + 2.0 * (i - 10)  # the occluder's right side, coming right
        trail.append((float(i), (x1 + x2) / 2, 115.0, x2 - x1, 30.0))
    velocity, centre, when = _full_view_motion(trail)
    assert velocity == pytest.approx([-2.0, 0.0])
    assert when == 10.0 and centre == pytest.approx([395.0, 115.0])
    # seen whole for fewer than FULL_SPAN periods: no measure
    short = deque(list(trail)[6:], maxlen=TRAIL)
    assert _full_view_motion(short) is None


def test_an_object_hidden_behind_another_for_longer_than_track_buffer_keeps_its_id():
    # 40 frames hidden is longer than track_buffer (30): as a plain lost track it would end and
    # come out with a new id. Lost while its box lies on the square's, it is hidden behind the
    # square: it is kept for hidden_buffer (10 times track_buffer), held inside the square's box,
    # and takes the circle that comes out around it.
    for hidden_buffer, same in ((None, True), (20, False)):
        t = tracker(hidden_buffer=hidden_buffer)
        circle: List[Optional[int]] = []
        ends = []
        for i in range(95):
            f = frame(i, behind(i))
            t.process([f])
            if len(f.detections) == 2:
                circle.append(f.track_ids[1])
            ends += [(i, e["track_id"]) for e in f.events if e["type"] == "end"]
        first, last = circle[1], circle[-1]
        assert first is not None and last is not None and circle[1:46] == [first] * 45, circle
        assert (last == first) is same, (hidden_buffer, circle)
        if same:
            assert ends == []
        else:  # hidden for longer than hidden_buffer (20): ended as lost, 20 periods after it hid
            assert [tid for _, tid in ends] == [first] and 60 <= ends[0][0] <= 75, ends


def test_a_hidden_object_that_never_comes_out_ends_after_hidden_buffer():
    # Lost on frame 46 and hidden behind the square from then on: it ends 60 periods (6 s at
    # 10 fps) later, not after track_buffer (30) as a plain lost track would.
    t = tracker(hidden_buffer="6s")
    events = []
    for i in range(130):
        f = frame(i, behind(i, comes_out=False))
        t.process([f])
        events += [(i, e["type"], e["track_id"], e.get("reason")) for e in f.events]
    circle_end = [e for e in events if e[1] == "end"]
    assert len(circle_end) == 1 and circle_end[0][3] == "lost" and 100 <= circle_end[0][0] <= 112, events


def test_an_object_called_another_class_for_a_few_frames_after_it_was_lost_keeps_its_id():
    # The circle of the test above (a 16 px circle, 3 px per frame) is not seen for 15 frames and
    # comes back 10 px off its predicted path, as a square for two frames and then as a circle
    # again. The square cannot continue the circle's track (class_aware), but it lies where the
    # lost track could be: it needs more sightings before it is confirmed, and the circle's
    # own track takes the circle back first. No second id, no switch.
    def seen(i: int) -> List[List[float]]:
        if 10 <= i < 25:
            return []
        x = 100 + 3.0 * i + (10 if i >= 25 else 0)
        return [[x, 100, x + 16, 116, 0.9, 1 if i in (25, 26) else 0]]

    ids = [x for row in run_ids(seen, 35) for x in row if x is not None]
    assert set(ids) == {1}, ids
    assert ids[-5:] == [1] * 5


def test_an_object_seen_again_as_another_class_for_good_keeps_its_id():
    # A 16 px circle at 3 px per frame is not seen for 15 frames and comes back 10 px off its
    # predicted path called a square, and stays a square. The square's new track lies where the
    # lost circle's could be and moves the same way: once it has been held back for HOLD_HITS
    # sightings, the circle's track takes it over instead of a second id (a switch).
    def seen(i: int) -> List[List[float]]:
        if 10 <= i < 25:
            return []
        x = 100 + 3.0 * i + (10 if i >= 25 else 0)
        return [[x, 100, x + 16, 116, 0.9, 1 if i >= 25 else 0]]

    ids = [x for row in run_ids(seen, 45) for x in row if x is not None]
    assert set(ids) == {1}, ids
    assert ids[-10:] == [1] * 10


def test_a_new_object_moving_its_own_way_where_one_was_lost_gets_a_new_id():
    # A 16 px circle going right at 1 px per frame is lost on frame 10; on frame 14 a square
    # comes in 6 px below where the circle's track is predicted and goes down at 1 px per frame,
    # staying where the circle could be for as long as it is held back: but it moves its own
    # way, so it is another object, with an id of its own (the circle's track would take it
    # over if velocities were not compared).
    def seen(i: int) -> List[List[float]]:
        boxes = []
        if i < 10:
            x = 100 + 1.0 * i
            boxes.append([x, 100, x + 16, 116, 0.9, 0])
        if i >= 14:
            y = 106 + 1.0 * (i - 14)
            boxes.append([114, y, 130, y + 16, 0.9, 1])
        return boxes

    rows = run_ids(seen, 30)
    assert set(rows[5]) == {1}, rows
    assert rows[-1] == [2], rows


def test_a_second_detection_of_a_tracked_object_starts_no_track():
    # A 20 px square is not seen for 4 frames; then the detector sees a triangle a little off
    # it (which continues no track: another class, overlapping too little) and from the next
    # frame both the square, which its track takes back, and the triangle. The triangle's
    # tentative track lies on a tracked object: it is the same object seen twice, not confirmed.
    def seen(i: int) -> List[List[float]]:
        x = 100 + 2.0 * i
        square = [x, 200, x + 20, 220, 0.9, 1]
        triangle = [x + 6, 202, x + 26, 222, 0.7, 2]
        if i < 8:
            return [square]
        if i < 12:
            return []
        if i == 12:
            return [triangle]
        return [square, triangle]

    ids = {x for row in run_ids(seen, 30) for x in row if x is not None}
    assert ids == {1}, ids


def test_an_object_coming_in_where_another_left_the_frame_gets_a_new_id():
    # A 30 px square leaves through the left edge at 2 px per frame, detected until 12 px of it
    # are left in the picture (frame 39); 10 frames later another square comes in at the same
    # place. The first one's track is still in its buffer and the newcomer within its
    # uncertainty, but a track predicted mostly outside the frame has left it: the newcomer is
    # another object.
    def seen(i: int) -> List[List[float]]:
        x = 60 - 2.0 * i
        if i < 40:
            return [[max(x, 0.0), 200, x + 30, 230, 0.9, 1]]
        if i < 50:
            return []
        return [[0, 200, 3 * (i - 50) + 6, 230, 0.9, 1]]

    ids = [x for row in run_ids(seen, 58) for x in row if x is not None]
    assert ids[0] == 1 and ids[-1] == 2 and set(ids) == {1, 2}, ids


def test_a_restarted_tracker_continues_the_ids_and_ends_the_open_tracks(tmp_path: Path):
    first = tracker(str(tmp_path))
    for i in range(5):
        f = frame(i, [moving(i), moving(i, y=300.0, cls=0)])
        first.process([f])
    assert sorted(f.track_ids) == [1, 2]
    # The worker dies here (nothing is called on it any more); a new incarnation starts.
    second = tracker(str(tmp_path))
    f = frame(9, [moving(9), moving(9, y=300.0, cls=0)])
    second.process([f])
    ends = [e for e in f.events if e["type"] == "end"]
    assert sorted(e["track_id"] for e in ends) == [1, 2]
    assert all(e["reason"] == "restarted" for e in ends)
    assert {e["label"] for e in ends} == {"square", "circle"}
    for i in range(10, 13):
        f = frame(i, [moving(i), moving(i, y=300.0, cls=0)])
        second.process([f])
    assert sorted(f.track_ids) == [3, 4], "a restarted tracker must not reuse ids"
    assert not any(e["type"] == "end" for e in f.events), "open tracks end once"


def _events(stage: TrackerStage, f: Frame) -> List[dict]:
    stage.process([f])
    return list(f.events)


def test_a_restart_replays_the_journal_and_ends_each_open_track_once(tmp_path: Path, monkeypatch):
    """Between rewrites of the state file (here: none after the start), new ids, new tracks and
    ends go to its journal before their frame leaves; a restart replays it, so it ends the one
    track still open, not the one that ended, and a line a kill cut short is ignored."""
    import edgepipe_plugins.processors.tracker as stage_module

    monkeypatch.setattr(stage_module, "STATE_INTERVAL_S", 3600.0)
    state, journal = tmp_path / "track.state.json", tmp_path / "track.journal.state.json"
    first = tracker(str(tmp_path), track_buffer=3)
    ended = []
    for i in range(12):
        boxes = [moving(i)] + ([moving(i, y=300.0, cls=0)] if i < 5 else [])
        ended += [(e["track_id"], e["reason"]) for e in _events(first, frame(i, boxes)) if e["type"] == "end"]
        if i == 0:  # the first frame of a source is written with the whole state
            written = state.read_bytes()
    assert ended == [(2, "lost")]
    assert state.read_bytes() == written, "the state file is rewritten once a second, not per change"
    kinds = [next(iter(json.loads(line))) for line in journal.read_text().splitlines()]
    assert kinds.count("new") == 2 and kinds.count("end") == 1, kinds
    with open(journal, "ab") as fh:  # killed in the middle of appending (that frame never left)
        fh.write(b'{"end":{"cam":[1')

    second = tracker(str(tmp_path), track_buffer=3)
    ends = [(e["track_id"], e["reason"]) for e in _events(second, frame(20, [moving(20)])) if e["type"] == "end"]
    assert ends == [(1, "restarted")]
    ids = set()
    for i in range(21, 25):
        f = frame(i, [moving(i)])
        second.process([f])
        ids.update(x for x in f.track_ids if x is not None)
    assert ids == {3}, "ids continue above every one given before the kill"
    third = tracker(str(tmp_path), track_buffer=3)
    ends = [(e["track_id"], e["reason"]) for e in _events(third, frame(30, [])) if e["type"] == "end"]
    assert ends == [(3, "restarted")], "each open track ends once: 1 did already"


def test_the_state_file_is_rewritten_every_second_of_the_source_s_time(tmp_path: Path):
    """Frames half a second apart, processed at once (a file read faster than real time): the
    whole state is rewritten every other frame, so a restart's 'end' carries a last_seen at
    most a second of the source's time old, and the cost per frame does not depend on the pace."""
    state = tmp_path / "track.state.json"
    t = tracker(str(tmp_path))
    last_seen = []
    for i in range(8):
        t.process([frame(i, [moving(i)], t=i * 0.5)])
        rows = json.loads(state.read_text())["open"].get("cam") or []
        last_seen.append(rows[0]["last_seen"] if rows else None)
    assert last_seen == [None, None, 1001.0, 1001.0, 1002.0, 1002.0, 1003.0, 1003.0]


def test_a_full_journal_is_folded_into_the_state_file(tmp_path: Path, monkeypatch):
    """A source whose clock stands still never makes a second pass: the journal is folded into
    the file once it has JOURNAL_MAX lines instead of growing without end."""
    import edgepipe_plugins.processors.tracker as stage_module

    monkeypatch.setattr(stage_module, "JOURNAL_MAX", 3)
    journal = tmp_path / "track.journal.state.json"
    t = tracker(str(tmp_path), track_buffer=2)
    lines = []
    for i in range(40):
        # A new object every 4 frames, each seen for 3 frames: tracks start and end all along.
        t.process([frame(i, [moving(i % 4, y=40.0 * (i // 4))] if i % 4 < 3 else [], t=0.0)])
        lines.append(len(journal.read_text().splitlines()))
    assert max(lines) == 3 and lines.count(0) >= 3, lines
    saved = json.loads((tmp_path / "track.state.json").read_text())
    assert saved["next_id"]["cam"] > 3


def test_a_journal_left_beside_a_newer_state_file_only_repeats_it(tmp_path: Path, monkeypatch):
    """Killed after the state file was rewritten but before its journal was emptied: replaying
    the old journal over the new file changes nothing (each open track ends once, ids go on)."""
    import edgepipe_plugins.processors.tracker as stage_module

    monkeypatch.setattr(stage_module, "STATE_INTERVAL_S", 3600.0)
    journal = tmp_path / "track.journal.state.json"
    first = tracker(str(tmp_path))
    for i in range(5):
        first.process([frame(i, [moving(i), moving(i, y=300.0, cls=0)])])
    old = journal.read_bytes()
    assert old.count(b"\n") == 2  # the two tracks confirmed
    monkeypatch.setattr(stage_module, "STATE_INTERVAL_S", 0.0)
    first.process([frame(5, [moving(5), moving(5, y=300.0, cls=0)])])
    assert journal.read_bytes() == b"", "rewriting the state file empties the journal"
    journal.write_bytes(old)

    second = tracker(str(tmp_path))
    f = frame(9, [moving(9), moving(9, y=300.0, cls=0)])
    ends = [e for e in _events(second, f) if e["type"] == "end"]
    assert sorted(e["track_id"] for e in ends) == [1, 2]
    for i in range(10, 13):
        f = frame(i, [moving(i), moving(i, y=300.0, cls=0)])
        second.process([f])
    assert sorted(f.track_ids) == [3, 4]


@pytest.mark.parametrize("options, path", [
    ({"track_buffer": "3 minutes"}, "track_buffer"),
    ({"track_buffer": -1}, "track_buffer"),
    ({"hidden_buffer": "forever"}, "hidden_buffer"),
    ({"low_thresh": 0.6, "track_thresh": 0.5}, "low_thresh"),
    ({"clock": "wall"}, "clock"),
    ({"snapshots": {"dir": "/tmp/x", "max_bytes": 10}}, "snapshots.max_bytes"),
])
def test_bad_options_are_refused(options, path):
    with pytest.raises(ValidationError) as err:
        TrackerConfig(**options)
    assert path.split(".")[0] in str(err.value)


def test_track_buffer_in_seconds_follows_the_frame_rate():
    assert TrackerConfig(track_buffer="2.5s").buffer() == (None, 2.5)
    assert TrackerConfig(track_buffer=30).buffer() == (30.0, None)
    t = tracker(track_buffer="0.55s")
    events = []
    for i in range(20):  # seen on frames 0-5; gone for more than 0.55 s (5.5 periods at 10 fps) on frame 11
        f = frame(i, [moving(i)] if i < 6 else [])
        t.process([f])
        events += [(i, e["type"]) for e in f.events]
    assert events == [(1, "new"), (11, "end")]


@pytest.mark.slow
def test_tracking_accuracy_on_the_demo_model_at_10_fps_and_with_every_other_frame_dropped():
    """The issue's goal is IDF1 >= 0.90 and at most 1 ID switch per 100 ground-truth tracks, on
    the demo model and scenes, tracked as configs/demo.yaml does. Over 98 scenes there are 0.9
    and 0.7 per 100 tracks, over 218 scenes 1.05 and 0.96 (benchmarks/README.md); these three
    scenes have none at either rate, so this holds them to at most one switch in the 27 tracks
    here, to catch it getting worse. test_tracking_in_hard_scenes below looks at the scenes where
    the tracker's own rules matter."""
    from benchmarks import bench_tracking as b

    scenes = [(b.WIDTH, b.HEIGHT, seed, b.OBJECTS, 200) for seed in (101, 102, 103)]
    result = b.accuracy(scenes)["demo"]
    print(result)
    for rate, r in result.items():
        assert r["ground_truth_tracks"] >= 15, r
        assert r["idf1"] >= 0.90, (rate, r)
        assert r["mota"] >= 0.80, (rate, r)
        assert r["switches_per_100_tracks"] <= 4.0, (rate, r)



@pytest.mark.slow
def test_tracking_in_hard_scenes():
    """Scenes where the tracker's own rules decide (benchmarks/README.md traces them): in 313
    two objects stay hidden behind others for longer than track_buffer and come out, in 208 a
    small object lost for 2 s comes back called another class for two frames, in 338 the
    detector sees one object as two classes from its first frame; in the first 40 frames of 418
    an object seen as a square is lost for 3 frames and comes back a circle for good, and in
    the first 80 of 336 and 110 of 403 the detector sees a tracked object a second time as
    another class while its track is lost. Tracked the way this module used to (a hidden object
    ends after track_buffer, a new id starts on the other class, both detections start tracks)
    the first three had 5 ID switches; without step 4's rules for a second detection and for a
    lost track taking over a held-back one, the last three had 4; now none (at most one is let
    pass, for another CPU's rounding in the detector)."""
    from benchmarks import bench_tracking as b

    scenes = [(b.WIDTH, b.HEIGHT, seed, b.OBJECTS, 300) for seed in (208, 313, 338)]
    scenes += [(b.WIDTH, b.HEIGHT, seed, b.OBJECTS, frames) for seed, frames in ((418, 40), (336, 80), (403, 110))]
    # The stage's defaults, which start tracks on the detections these rules are about, and the demo's
    result = b.accuracy(scenes, trackers={"defaults": {}, "demo": b.demo_settings()["tracker"]})
    print(result)
    for options, by_rate in result.items():
        r = by_rate["10fps"]
        assert r["ground_truth_tracks"] >= 45, (options, r)
        assert r["id_switches"] <= 1, (options, r)
        assert r["idf1"] >= 0.90, (options, r)


@pytest.mark.slow
def test_the_demo_starts_tracks_only_on_objects_it_is_sure_of():
    """configs/demo.yaml's new_track_thresh (0.88): the demo model scores objects it sees whole
    above 0.9, and the parts and halves it also sees lower; a track started on one of those (an
    object coming in at the frame edge, two small ones overlapping, a cross seen as pieces at the
    top edge) swaps with the object's own or takes it over. These scenes, up to the frame where
    the stage's defaults made a switch, had 7 at 10 fps with the defaults (4 of them in 519's
    pieces) and none with the demo's options (at most one is let pass, for another CPU's rounding
    in the detector); the benchmark script reads the option from the demo's file, so this also
    fails if the file loses it."""
    from benchmarks import bench_tracking as b

    demo = b.demo_settings()
    assert demo["tracker"].get("new_track_thresh") == 0.88, demo
    assert demo["detector"]["conf_thres"] <= 0.1 and demo["nms"]["conf_thres"] <= 0.1, demo  # ByteTrack's low ones
    scenes = [(b.WIDTH, b.HEIGHT, seed, b.OBJECTS, frames) for seed, frames in ((610, 70), (520, 80), (501, 90), (519, 170))]
    result = b.accuracy(scenes, trackers={"defaults": {}, "demo": demo["tracker"]})
    print(result)
    assert result["defaults"]["10fps"]["id_switches"] >= 4, result
    for rate, r in result["demo"].items():
        assert r["ground_truth_tracks"] >= 20, (rate, r)
        assert r["id_switches"] <= 1, (rate, r)
        assert r["idf1"] >= 0.90, (rate, r)

def pictured(i: int, conf: float, x: float = 40.0) -> Frame:
    img = np.full((240, 320), 80, np.uint8)
    img[100:140, int(x) + 4 * i:int(x) + 4 * i + 40] = 220
    f = frame(i, [[x + 4 * i, 100, x + 4 * i + 40, 140, conf, 1]])
    f.original, f.width, f.height = img, 320, 240
    return f


def test_snapshots_best_confidence_named_in_events_and_capped(tmp_path: Path):
    import cv2

    snaps = tmp_path / "snaps"
    t = tracker(snapshots={"dir": str(snaps), "max_bytes": 2**20, "min_interval": 0.0, "min_gain": 0.05})
    assert t.needs_original, "snapshots ask for the original picture"
    events = []
    for i, conf in enumerate([0.6, 0.62, 0.7, 0.69, 0.9, 0.91]):
        f = pictured(i, conf)
        t.process([f])
        events += f.events
    new = [e for e in events if e["type"] == "new"][0]
    assert new["snapshot"]["confidence"] == pytest.approx(0.62)
    better = [e for e in events if e["type"] == "update"]
    assert [e["changed"] for e in better] == [["snapshot"], ["snapshot"]]
    assert [e["snapshot"]["confidence"] for e in better] == pytest.approx([0.7, 0.9])
    for i in range(6, 40):  # the object is gone: the track ends, naming its best snapshot
        f = frame(i, [])
        t.process([f])
        events += f.events
    end = [e for e in events if e["type"] == "end"][0]
    assert end["snapshot"]["confidence"] == pytest.approx(0.9) and end["snapshot"]["frame_id"] == 4
    crop = cv2.imread(str(snaps / end["snapshot"]["crop"]), cv2.IMREAD_GRAYSCALE)
    full = cv2.imread(str(snaps / end["snapshot"]["frame"]))
    assert crop is not None and full.shape == (240, 320, 3)
    assert crop.shape[0] >= 40 and crop.mean() > 150, "the crop shows the bright object"
    assert sorted(p.name for p in snaps.iterdir()) == sorted([end["snapshot"]["crop"], end["snapshot"]["frame"]])

    # The size cap: the oldest files go first.
    small = tmp_path / "small"
    t = tracker(snapshots={"dir": str(small), "max_bytes": 2**20, "min_interval": 0.0})
    filler = small / "old.jpg"
    filler.write_bytes(b"\xff" * (2**20 - 100))
    import os

    os.utime(filler, (1, 1))
    t.writer.open()  # index what is there now
    for i in range(3):
        t.process([pictured(i, 0.9)])
    assert not filler.exists(), "the oldest file is removed first when the cap is passed"
    assert len(list(small.iterdir())) == 2


def test_unwritable_snapshot_dir_makes_the_stage_unhealthy_but_it_keeps_tracking(tmp_path: Path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    t = tracker(snapshots={"dir": str(blocked / "snaps")})
    assert t.metrics.problem and "not usable" in t.metrics.problem
    ids = []
    for i in range(4):
        f = pictured(i, 0.9)
        t.process([f])
        ids.append(f.track_ids[0])
    assert ids[1:] == [1, 1, 1]
    assert "cannot write snapshots" in (t.metrics.problem or "")
