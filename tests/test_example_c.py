"""The C example (examples/subscriber.c) built with the system's gcc and libzmq, run against a
live daemon: the detection message contract holds beyond Python. A missing compiler or zmq.h is
a failure (gcc and libzmq3-dev are in the Makefile's DEB_PACKAGES), not a skip."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from helpers.daemon import Daemon
from helpers.net import free_port

from edgepipe.client import DetectionMessage, detections_schema
from edgepipe.messages import DETECTIONS_SCHEMA

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples" / "subscriber.c"


@pytest.fixture(scope="module")
def subscriber(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/subscriber.c compiled, warnings as errors (the README's line is `cc subscriber.c -lzmq`)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: install the Debian packages listed in the Makefile (make deps)")
    exe = tmp_path_factory.mktemp("example") / "subscriber"
    r = subprocess.run(
        [gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SOURCE), "-lzmq"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, f"building {SOURCE.name} failed (libzmq3-dev installed?):\n{r.stderr}"
    return exe


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """synthetic -> letterbox -> untrained yolov5n (64 px, low threshold, so boxes come out)
    -> nms -> zmq_pub on a free loopback port (``daemon.endpoint``)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = {
        "name": "example",
        "stages": {
            "cam": {"type": "synthetic", "width": 160, "height": 120, "fps": 10, "seed": 3},
            "prep": {"type": "letterbox", "inputs": ["cam"], "imgsz": 64},
            "detector": {"type": "yolov5", "inputs": ["prep"], "weights": None, "cfg": "yolov5n",
                         "device": "cpu", "threads": 1, "imgsz": 64, "conf_thres": 0.0001},
            "post": {"type": "nms", "inputs": ["detector"], "conf_thres": 0.0001, "max_det": 20},
            "pub": {"type": "zmq_pub", "inputs": ["post"], "bind": endpoint},
        },
    }
    with Daemon(config, tmp_path_factory.mktemp("example-daemon")) as d:
        d.endpoint = endpoint  # type: ignore[attr-defined]
        d.wait_ready()
        yield d
        assert d.stop() == 0


def test_c_subscriber_prints_schema_conforming_detection_messages(subscriber: Path, daemon: Daemon) -> None:
    r = subprocess.run(
        [str(subscriber), daemon.endpoint, "10", "30"],  # type: ignore[attr-defined]
        capture_output=True, text=True, timeout=90,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 10, r.stdout
    messages: List[Dict[str, Any]] = [json.loads(line) for line in lines]
    schema = detections_schema()
    for m in messages:
        DetectionMessage.model_validate(m)  # the model the shipped schema is generated from
        assert set(schema["required"]) <= set(m), m
        assert m["schema"] == DETECTIONS_SCHEMA and m["source"] == "cam"
        assert (m["width"], m["height"]) == (160, 120)
        for det in m["detections"]:
            x1, y1, x2, y2 = det["bbox"]
            assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120, det
    ids = [m["frame_id"] for m in messages]
    assert ids == sorted(set(ids)), "per-source frame ids only increase (a live source may skip)"
    assert any(m["detections"] for m in messages), "boxes reach the C side too"


def test_c_subscriber_gives_up_after_its_timeout(subscriber: Path) -> None:
    nobody = f"tcp://127.0.0.1:{free_port()}"
    r = subprocess.run([str(subscriber), nobody, "1", "0.5"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == f"subscriber: no message on {nobody} for 0.5 s"
