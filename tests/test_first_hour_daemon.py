"""What a new user meets when a daemon cannot start or runs a paced source (issue 15): a port
that is taken names the setting and the variable to change, and a second daemon of the same
pipeline name is named with its pid; a paced source's processing time is its own work, not its
wait for the next tick."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml
from edgepipe_plugins.sources._common import Pacer
from helpers.daemon import Daemon
from helpers.net import free_port


def config(pub: str, out: Path) -> Dict[str, Any]:
    return {
        "name": "twice",
        "stages": {
            "cam": {"type": "synthetic", "width": 64, "height": 64, "fps": 10},
            "prep": {"type": "letterbox", "inputs": ["cam"], "imgsz": 64},
            "det": {"type": "yolov5", "inputs": ["prep"], "cfg": "yolov5n", "imgsz": 64, "device": "cpu",
                    "threads": 1, "backend": "torch"},
            "post": {"type": "nms", "inputs": ["det"]},
            "pub": {"type": "zmq_pub", "inputs": ["post"], "bind": "${TWICE_PUB}"},
            "out": {"type": "jsonl", "inputs": ["post"], "path": str(out)},
        },
        "metrics": {"listen": "127.0.0.1:0"},
    }


def test_a_second_daemon_of_the_same_name_is_named_with_its_pid(tmp_path: Path):
    pub = f"tcp://127.0.0.1:{free_port()}"
    env = {"TWICE_PUB": pub}
    with Daemon(config(pub, tmp_path / "a.jsonl"), tmp_path, env=env) as first:
        first.wait_ready()
        path = tmp_path / "second.yaml"
        path.write_text(yaml.safe_dump(config(pub, tmp_path / "b.jsonl")))
        r = subprocess.run([sys.executable, "-m", "edgepipe", "run", str(path)], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, **env))
        assert r.returncode == 1, r.stderr
        line = next(x for x in r.stderr.splitlines() if "failed to start" in x)
        assert "Address already in use" in line, line
        assert f"change stages.pub.bind (from ${{TWICE_PUB}} in {path})" in line, line
        assert f"another edgepipe daemon named 'twice' is running (pid {first.pid})" in line, line
        assert "Traceback" not in r.stderr


def test_a_paced_source_does_not_count_its_wait_as_work(monkeypatch):
    """The call that releases a tick never sleeps: the wait happens in the calls before it, which
    produce nothing (so a source's read() that returns a frame measures only its own work)."""
    import edgepipe_plugins.sources._common as common

    clock = [100.0]
    sleeps: List[float] = []
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(common.time, "sleep", sleep)
    pacer = Pacer(10.0)
    released = 0
    for _ in range(200):
        before = len(sleeps)
        if pacer.ready():
            released += 1
            assert len(sleeps) == before, "the call that released a tick slept"
        clock[0] += 0.001  # the loop's own time between calls
    assert released >= 5 and sleeps and max(sleeps) <= common.READ_WAIT_S
