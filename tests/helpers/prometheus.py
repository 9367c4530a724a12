"""A real Prometheus server for tests: Debian's /usr/bin/prometheus on loopback, storage in a
temporary directory, scraping the given targets every second (optionally evaluating rule files).
Missing Prometheus is a failure. Also the small pipeline the systemd and Prometheus tests run:
the shipped configs/synthetic.yaml at a small image size."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import pytest
import yaml

from .net import free_port

REPO = Path(__file__).resolve().parents[2]


def small_synthetic_config(imgsz: int = 64, **stage_settings: Any) -> Dict[str, Any]:
    """configs/synthetic.yaml as shipped, at ``imgsz`` on the CPU, every port chosen free, and
    ``stage_settings`` (e.g. ``stall_timeout=2``) added to every stage."""
    config = yaml.safe_load((REPO / "configs" / "synthetic.yaml").read_text())
    stages = config["stages"]
    for stage in stages.values():
        if "imgsz" in stage:
            stage["imgsz"] = imgsz
        if stage["type"] == "yolov5":
            stage["device"] = "cpu"
        if stage["type"] == "zmq_pub":
            stage["bind"] = "tcp://127.0.0.1:0"
        stage.update(stage_settings)
    config["metrics"] = {"listen": "127.0.0.1:0"}
    return config


def find_prometheus() -> str:
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if path is None:
        pytest.fail("prometheus not found: install the Debian package 'prometheus' (make deps)")
    return path


class PromQLError(AssertionError):
    """Prometheus refused a query (a parse or evaluation error); the message is its own."""


class Prometheus:
    """A running Prometheus; :meth:`query` asks its HTTP API. Use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        job: str = "edgepipe",
        interval: str = "1s",
        rule_files: Sequence[Path] = (),
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.job = job
        config: Dict[str, Any] = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_interval": interval,
                    "scrape_timeout": interval,
                    "static_configs": [{"targets": list(targets)}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> Prometheus:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    find_prometheus(),
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_for(lambda: self._get("/-/ready", raw=True) is not None, timeout, "Prometheus to be ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def _get(self, path: str, raw: bool = False) -> Any:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                body = resp.read()
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            return None
        return body if raw else json.loads(body)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns ``data`` or raises AssertionError with Prometheus's error."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            payload = json.loads(exc.read() or b"{}")
            raise PromQLError(f"{path} {params}: {payload.get('errorType')}: {payload.get('error')}") from None
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, expr: str) -> List[Dict[str, Any]]:
        """Instant query; the result vector (a parse error raises PromQLError naming it)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]

    def targets_up(self) -> bool:
        data = self.api("targets", state="active")
        targets = data["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    def wait_for(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``check`` until truthy and return its value; a refused query fails at once."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except PromQLError:
                raise
            except AssertionError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise
                last = None
            if last:
                return last
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.log_tail()}")
