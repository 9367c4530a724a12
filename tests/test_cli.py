"""The command line as a new user meets it, run for real in subprocesses: ``--version``; ``-h``
and ``--help`` on the top command and on every subcommand, with flags shown as flags (no
``<bool>``); ``validate`` over several files with one result line per file; ``subscribe``
saying what it waits on and taking a bare host:port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import pytest
from helpers.net import free_port

import edgepipe

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "faults" / "configs"


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True,
                          env=clean_env(), cwd=REPO, timeout=timeout)


def test_version():
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"edgepipe {edgepipe.__version__}\n"


def _commands(help_text: str) -> List[str]:
    section = help_text.split("Commands:", 1)[1]
    return [m.group(1) for m in re.finditer(r"^  (\S+)\s", section, re.M)]


def test_h_and_help_on_every_command_show_flags_without_a_type():
    top = cli("--help")
    assert top.returncode == 0, top.stderr
    paths = [[]] + [[c] for c in _commands(top.stdout)]
    assert {"run", "validate", "subscribe", "detect", "weights", "keys"} <= {p[0] for p in paths[1:]}
    for group in ("weights", "keys"):
        paths += [[group, c] for c in _commands(cli(group, "--help").stdout)]
    assert ["weights", "convert"] in paths and ["keys", "generate"] in paths
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda a: cli(*a), [p + [flag] for p in paths for flag in ("-h", "--help")]))
    for i, path in enumerate(paths):
        short, long = runs[2 * i], runs[2 * i + 1]
        name = " ".join(["edgepipe"] + path)
        assert short.returncode == 0 and long.returncode == 0, f"{name}: {short.stderr}{long.stderr}"
        assert short.stdout == long.stdout, f"{name}: -h and --help differ"
        assert f"Usage: {name} " in long.stdout, long.stdout
        # A flag takes no value: "--help  Show this message", never "--help <bool>".
        assert "<bool>" not in long.stdout, f"{name} --help:\n{long.stdout}"
        assert re.search(r"^  -h, --help\s+Show this message and exit\.$", long.stdout, re.M), long.stdout
    # The command list keeps each command's whole summary rather than cutting it off.
    assert "or until every finite source has ended." in " ".join(top.stdout.split()), top.stdout
    assert "--version" in top.stdout


def test_validate_takes_several_files_and_prints_one_line_per_file():
    configs = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    done = cli("validate", *configs)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(configs), done.stdout
    for path, line in zip(configs, lines):
        assert line.startswith(f"{path}: OK: "), line
    assert done.stderr == ""


def test_validate_reports_each_bad_file_on_its_own_lines_and_fails():
    good = "configs/demo.yaml"
    bad = [str(FAULTS / "out_of_range_iou.yaml"), str(FAULTS / "unknown_type.yaml")]
    missing = "configs/no-such-file.yaml"
    done = cli("validate", bad[0], good, missing, bad[1])
    assert done.returncode == 1
    (ok,) = done.stdout.splitlines()
    assert ok.startswith(f"{good}: OK: "), done.stdout
    errors = done.stderr.splitlines()
    assert len(errors) == 3, done.stderr  # one error each
    for path, line in zip([bad[0], missing, bad[1]], errors):
        assert line.startswith(f"edgepipe: error: {path}: "), line
        assert line.count(path) == 1, f"the path is named twice: {line}"
    assert "stages.post.iou_thres" in errors[0] and "not a stage type" in errors[2]


def test_subscribe_says_what_it_waits_on_when_nothing_arrives():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    done = cli("subscribe", endpoint, "--topic", "detections/door", "--timeout", "6")
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    waiting, timeout = lines
    assert endpoint in waiting and "'detections/door'" in waiting and "waiting" in waiting.lower(), waiting
    assert "zmq_pub" in waiting  # what would have to be there
    assert timeout.startswith("edgepipe: error: no message on"), timeout


def test_subscribe_accepts_a_bare_host_port_as_tcp_and_says_so():
    import zmq

    port = free_port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    proc = subprocess.Popen([sys.executable, "-m", "edgepipe", "subscribe", f"127.0.0.1:{port}", "--count", "1",
                             "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=REPO)
    try:
        message = {"source": "cam", "frame_id": 0, "detections": []}
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            pub.send_multipart([b"detections/cam", json.dumps(message).encode()])
            time.sleep(0.1)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.close()
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[0]) == message
    assert f"tcp://127.0.0.1:{port}" in err and f"'127.0.0.1:{port}'" in err, err


@pytest.mark.parametrize("endpoint", ["localhost", "tcp//127.0.0.1:5556"])
def test_subscribe_still_refuses_what_is_no_address(endpoint):
    done = cli("subscribe", endpoint, "--timeout", "1")
    assert done.returncode == 2
    assert "is not a ZeroMQ address" in done.stderr
