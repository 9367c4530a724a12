"""End to end: a real daemon publishing detections over CURVE with a client allow-list, read by
real `edgepipe subscribe` processes and by edgepipe.client; the metrics endpoint behind basic
auth; `edgepipe validate` refusing a public bind without keys."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml
from helpers.daemon import Daemon
from helpers.net import free_port

from edgepipe.client import subscribe
from edgepipe.daemon.exposition import iter_samples
from edgepipe.security import CurveConfig, generate_keys

pytestmark = pytest.mark.slow

DETECTOR = {"type": "yolov5", "weights": None, "cfg": "yolov5n", "device": "cpu", "threads": 1}


def edgepipe(*args: str, timeout: float = 120) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgepipe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pipeline(port: int, publish: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "name": "secure",
        "stages": {
            "cam": {"type": "synthetic", "width": 160, "height": 120, "fps": 10, "seed": 1},
            "prep": {"type": "letterbox", "inputs": ["cam"], "imgsz": 64, "auto": False},
            "detector": dict(DETECTOR, inputs=["prep"], imgsz=64),
            "post": {"type": "nms", "inputs": ["detector"]},
            "publish": dict({"type": "zmq_pub", "inputs": ["post"], "bind": f"tcp://0.0.0.0:{port}"}, **publish),
        },
    }


def get(url: str, auth: str = "") -> int:
    return fetch(url, auth)[0]


def fetch(url: str, auth: str = "") -> Tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def rejected(address: str) -> Optional[float]:
    """edgepipe_security_rejected_clients_total of the publishing stage (None: no such series)."""
    code, text = fetch(f"http://{address}/metrics", "scraper:s3cret")
    assert code == 200
    for name, labels, value in iter_samples(text):
        if name == "edgepipe_security_rejected_clients_total" and labels == {"stage": "publish"}:
            return value
    return None


def test_validate_refuses_a_public_bind_without_curve_naming_the_path(tmp_path: Path):
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(pipeline(5556, {})))
    done = subprocess.run(
        [sys.executable, "-m", "edgepipe", "validate", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "stages.publish" in lines[0] and "refusing to bind 'tcp://0.0.0.0:5556'" in lines[0]
    path.write_text(yaml.safe_dump(pipeline(5556, {"insecure": True})))
    ok = subprocess.run(
        [sys.executable, "-m", "edgepipe", "validate", str(path)], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr


def test_curve_daemon_serves_allowed_subscribers_only(tmp_path: Path):
    keys = tmp_path / "keys"
    generate_keys(keys / "server", "server")
    generate_keys(keys / "clients", "viewer")
    generate_keys(keys / "other", "stranger")
    server_key = str(keys / "server" / "server.key")
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    config = pipeline(
        port,
        {"curve": {"server_secret_key": str(keys / "server" / "server.key_secret"),
                   "client_public_keys": [str(keys / "clients")]}},
    )
    config["metrics"] = {"listen": "127.0.0.1:0", "auth": "scraper:s3cret"}

    with Daemon(config, tmp_path) as daemon:
        address = daemon.wait_ready()
        daemon.wait_until(lambda: rejected(address) is not None, message="the refusals series")
        assert rejected(address) == 0.0  # exists from the start, for the stage with a CURVE server
        # Started together, so the refused subscribers' windows overlap the allowed one's.
        allowed = edgepipe("subscribe", endpoint, "--count", "20", "--timeout", "60",
                           "--curve-server-key", server_key,
                           "--curve-secret-key", str(keys / "clients" / "viewer.key_secret"))
        stranger = edgepipe("subscribe", endpoint, "--timeout", "8",
                            "--curve-server-key", server_key,
                            "--curve-secret-key", str(keys / "other" / "stranger.key_secret"))
        plain = edgepipe("subscribe", endpoint, "--timeout", "8")
        outputs = {}
        for name, proc in (("allowed", allowed), ("stranger", stranger), ("plain", plain)):
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            outputs[name] = (proc.returncode, out, err)

        code, out, err = outputs["allowed"]
        assert code == 0, err
        messages: List[Dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
        assert len(messages) == 20
        ids = [m["frame_id"] for m in messages]
        assert ids == list(range(ids[0], ids[0] + 20)), "an allowed subscriber must get every message"
        assert all(m["source"] == "cam" and m["schema"] == "edgepipe.detections/v2" for m in messages)
        for name in ("stranger", "plain"):
            code, out, err = outputs[name]
            assert code != 0 and out == "", f"{name} subscriber received data: {out[:200]!r}"
            assert "no message on" in err
        # The stranger's handshakes were refused by the allow-list, and counted (the plain
        # subscriber speaks no CURVE: no handshake to refuse).
        assert (rejected(address) or 0) >= 1

        # The Python API with the same keys: typed messages.
        curve = CurveConfig(client_secret_key=keys / "clients" / "viewer.key_secret", server_public_key=server_key)
        stream = subscribe(endpoint, timeout=60, curve=curve)
        first, second = next(stream), next(stream)
        stream.close()
        assert second.frame_id == first.frame_id + 1 and first.source == "cam"

        assert get(f"http://{address}/metrics") == 401
        assert get(f"http://{address}/metrics", "scraper:wrong") == 401
        assert get(f"http://{address}/metrics", "scraper:s3cret") == 200
        assert daemon.stop(group=True) == 0


def test_subscribe_refuses_half_curve_options_and_unprotected_keys(tmp_path: Path):
    generate_keys(tmp_path, "me")
    half = subprocess.run(
        [sys.executable, "-m", "edgepipe", "subscribe", "tcp://127.0.0.1:5556", "--curve-server-key", "x.key"],
        capture_output=True, text=True, timeout=60,
    )
    assert half.returncode == 2 and "--curve-server-key and --curve-secret-key go together" in half.stderr
    secret = tmp_path / "me.key_secret"
    secret.chmod(0o644)
    loose = subprocess.run(
        [sys.executable, "-m", "edgepipe", "subscribe", "tcp://127.0.0.1:5556", "--timeout", "1",
         "--curve-server-key", str(tmp_path / "me.key"), "--curve-secret-key", str(secret)],
        capture_output=True, text=True, timeout=60,
    )
    assert loose.returncode == 2
    assert loose.stderr.strip().splitlines() == [
        f"edgepipe: error: curve.client_secret_key: {str(secret)!r} is accessible to other users "
        f"(mode 0644); run chmod 600 {str(secret)!r}"
    ]
