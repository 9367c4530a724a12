"""SIGHUP over broken configs: whatever is written over a running daemon's config file, the reload
is refused with one log line naming the cause and the pipeline goes on unchanged (same workers,
frames still flowing); a valid file afterwards is applied as usual. docs/guarantees.md promises
this: one typo must not stop every camera (under systemd the restart would fail the same way).
"""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml
from helpers.daemon import Daemon

from .util import assert_workers_clean, detection_pipeline, jsonl

FIVE = ["scene", "prep", "det", "post", "out"]


def broken_files(config: Dict[str, Any]) -> Dict[str, Any]:
    """Name -> what to write over the config: a dict (dumped as YAML) or raw text."""
    def with_det(**changes: Any) -> Dict[str, Any]:
        c = copy.deepcopy(config)
        c["stages"]["det"].update(changes)
        return c

    text = yaml.safe_dump(config, sort_keys=False)
    long_name = copy.deepcopy(config)
    # A new stage whose ipc socket path would not fit in sun_path under this runtime dir.
    long_name["stages"]["o" * 63] = {"type": "jsonl", "inputs": ["post"], "path": config["stages"]["out"]["path"] + "2"}
    loop = text.replace("stages:\n", "stages: &loop\n", 1).replace("  out:\n", "  out:\n    again: *loop\n", 1)
    assert "again: *loop" in loop
    return {
        "imgsz with one side": with_det(imgsz=[320]),
        "imgsz empty": with_det(imgsz=[]),
        "imgsz not a number": with_det(imgsz=float("nan")),
        "imgsz zero": with_det(imgsz=0),
        "self-referencing alias": loop,
        "binary garbage": b"\xff\xfe\x00\x01\x02 not yaml",
        "empty file": "",
        "a stage name too long for the runtime dir": long_name,
    }


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reload")
    config = detection_pipeline(tmp / "out.jsonl", name="reload")
    # A runtime dir long enough that a 63-character stage name no longer fits an ipc path.
    rundir = Path(config["runtime"]["dir"]) / ("r" * 48)
    rundir.mkdir(mode=0o700)
    config["runtime"]["dir"] = str(rundir)
    with Daemon(config, tmp) as d:
        d.wait_ready()
        d.out = tmp / "out.jsonl"
        yield d


def test_broken_configs_on_sighup_are_refused_and_the_pipeline_goes_on(daemon: Daemon):
    pids = daemon.worker_pids()
    assert sorted(pids) == sorted(FIVE)
    for what, content in broken_files(daemon.config).items():
        start = len(daemon.lines)
        seen = len(jsonl(daemon.out))
        if isinstance(content, dict):
            daemon.write_config(content)
        elif isinstance(content, bytes):
            daemon.config_path.write_bytes(content)
        else:
            daemon.config_path.write_text(content)
        daemon.send(signal.SIGHUP)
        line = daemon.wait_for_line(r"Reload refused, still running the previous config: (.*)", start=start).group(0)
        assert "Traceback" not in "\n".join(daemon.lines[start:]), f"{what}: traceback in the log"
        refused = [x for x in daemon.lines[start:] if "Reload refused" in x]
        assert len(refused) == 1, f"{what}: {refused}"
        assert daemon.proc.poll() is None, f"{what}: the daemon exited: {line}"
        assert daemon.worker_pids() == pids, f"{what}: workers changed"
        daemon.wait_until(lambda seen=seen: len(jsonl(daemon.out)) > seen + 3, 60, f"{what}: frames keep flowing")
    assert_workers_clean(daemon, len(FIVE))


def test_each_refusal_names_its_cause(daemon: Daemon):
    causes = [x for x in daemon.lines if "Reload refused" in x]
    text = "\n".join(causes)
    assert "stages.det.imgsz: imgsz is an int or [height, width] of ints (got [320])" in text
    assert "stages.det.imgsz: imgsz sides must be between 32 and 8192 (got 0)" in text
    assert "a YAML alias refers to a node that holds it (a cycle)" in text
    assert "not UTF-8 text" in text and "the file is empty" in text
    assert "runtime.dir: runtime dir" in text and "too long for ipc sockets" in text


def test_a_valid_config_after_the_broken_ones_applies(daemon: Daemon):
    start = len(daemon.lines)
    config = copy.deepcopy(daemon.config)
    config["stages"]["post"]["conf_thres"] = 0.02
    daemon.write_config(config)
    daemon.send(signal.SIGHUP)
    daemon.wait_for_line(r"Reloaded .*: \d worker\(s\) unchanged", start=start)
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    ids = [r["frame_id"] for r in jsonl(daemon.out, final=True)]
    assert ids == sorted(set(ids)) and len(ids) > 20
    assert os.path.exists(daemon.out)
