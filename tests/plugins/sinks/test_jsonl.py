"""The ``jsonl`` sink driven directly (start/process/stop) on real files in a temporary folder:
one detection message per line, size-based rotation keeping the newest messages, appending and
truncating without backups, a half-written last line cut at start and data fsync-ed (the real
call, recorded), unwritable paths refused by the pre-flight, and a full disk (``/dev/full``)
counted as errors without failing the stage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import pytest
from edgepipe_plugins.sinks.jsonl import JsonlConfig, JsonlSink
from helpers.frames import det_frame

from edgepipe.messages import DETECTIONS_SCHEMA
from edgepipe.stage import StageContext, StageError


def test_jsonl_lines_and_rotation(tmp_path: Path):
    path = tmp_path / "detections.jsonl"
    sink = JsonlSink(JsonlConfig(inputs=["post"], path=str(path), max_bytes=2000, backups=2), StageContext("log"))
    sink.check()
    sink.start()
    try:
        for k in range(40):
            sink.process([det_frame("cam", k)])
    finally:
        sink.stop()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["detections.jsonl", "detections.jsonl.1", "detections.jsonl.2"]
    ids: List[int] = []
    for name in ("detections.jsonl.2", "detections.jsonl.1", "detections.jsonl"):
        text = (tmp_path / name).read_text()
        assert len(text.encode()) <= 2000 and text.endswith("\n")
        lines = [json.loads(line) for line in text.splitlines()]
        assert all(m["schema"] == DETECTIONS_SCHEMA and len(m["detections"]) == 2 for m in lines)
        ids += [m["frame_id"] for m in lines]
    # The newest messages survive, in order, none twice; the oldest went with the dropped backup.
    assert ids == list(range(40 - len(ids), 40)) and len(ids) < 40
    assert sink.published.value == 40 and sink.detections.value == 80


def test_jsonl_appends_and_truncates_without_backups(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"old": 1}\n')
    sink = JsonlSink(JsonlConfig(path=str(path), max_bytes=600, backups=0), StageContext("log"))
    sink.start()
    sink.process([det_frame("cam", 0, n=0)])
    assert path.read_text().splitlines()[0] == '{"old": 1}'
    for k in range(1, 10):
        sink.process([det_frame("cam", k, n=0)])
    sink.stop()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines and "old" not in lines[0] and lines[-1]["frame_id"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_jsonl_cuts_a_partial_last_line_at_start_and_syncs_to_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """A worker killed in the middle of a write leaves half a line: the next start cuts it, so
    every line parses. Data is fsync-ed before a rotation and when the sink stops."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"frame_id": 0}\n{"frame_id": 1}\n{"frame_id": 2, "detec')
    synced: List[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the real call, recorded
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    sink = JsonlSink(JsonlConfig(path=str(path), max_bytes=1500, backups=1), StageContext("log"))
    sink.start()
    assert "Removed a partial last line (22 bytes)" in caplog.text
    sink.process([det_frame("cam", 3)])
    assert [json.loads(x)["frame_id"] for x in path.read_text().splitlines()] == [0, 1, 3]
    assert synced == []
    for k in range(4, 10):
        sink.process([det_frame("cam", k)])  # 333 bytes each: rotates once, before frame 7
    assert (tmp_path / "d.jsonl.1").exists()
    assert synced[:2] == [str(path), str(tmp_path)]  # the file, then the renames in its directory
    sink.stop()
    assert synced[-1] == str(path)
    ids = [json.loads(x)["frame_id"] for name in ("d.jsonl.1", "d.jsonl") for x in (tmp_path / name).read_text().splitlines()]
    assert ids == [0, 1] + list(range(3, 10))


def test_jsonl_check_refuses_unwritable_paths(tmp_path: Path):
    cases = {
        str(tmp_path / "missing" / "d.jsonl"): "does not exist",
        str(tmp_path): "is a directory",
        "/sys/edgepipe-test.jsonl": "is not writable",  # sysfs refuses new files, even to root
    }
    for path, message in cases.items():
        with pytest.raises(StageError, match=message):
            JsonlSink(JsonlConfig(path=path), StageContext("log")).check()
    assert not list(tmp_path.iterdir()), "check() must not create anything"


def test_jsonl_full_disk_drops_and_counts_without_failing(caplog: pytest.LogCaptureFixture):
    # /dev/full accepts the open and fails every write with ENOSPC, like a full disk.
    sink = JsonlSink(JsonlConfig(path="/dev/full"), StageContext("log"))
    sink.check()
    sink.start()
    try:
        for k in range(5):
            sink.process([det_frame("cam", k)])
    finally:
        sink.stop()
    assert sink.metrics.errors.labels("process").value == 5
    assert sink.published.value == 0
    outage = [r.getMessage() for r in caplog.records if "Cannot write" in r.getMessage()]
    assert len(outage) == 1 and "No space left on device" in outage[0]
