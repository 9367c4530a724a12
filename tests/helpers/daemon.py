"""Run a real ``edgepipe run`` daemon from a test.

Typical use (module-scoped, so several tests share one start-up)::

    from helpers.daemon import Daemon, Subscriber

    @pytest.fixture(scope="module")
    def daemon(tmp_path_factory):
        config = {
            "name": "synth",
            "stages": {
                "cam": {"type": "synthetic", "width": 160, "height": 120, "fps": 15},
                ...
                "pub": {"type": "zmq_pub", "inputs": ["post"], "bind": "tcp://127.0.0.1:0"},
            },
        }
        with Daemon(config, tmp_path_factory.mktemp("synth")) as d:
            d.wait_ready()
            yield d

    def test_metrics(daemon):
        assert daemon.sample("edgepipe_stage_up", stage="cam") == 1.0
        ...

What it does for you:

- writes the config dict as YAML in the given directory; unless the config sets them, the
  metrics endpoint listens on a free port (``127.0.0.1:0``) and ``runtime.status_interval`` is 1 s;
- starts ``python -m edgepipe run CONFIG`` in a new session (its own process group), with
  stdout/stderr read by a thread into :attr:`Daemon.lines` (also echoed on failure);
- Every wait has a generous default bound (minutes, not seconds): a bound is there to catch a
  hang, and CI shares two cores with other jobs, so a slow start is not a failure;
- :meth:`wait_ready` waits for the supervisor's "Ready:" line and learns the metrics address
  from it; :meth:`wait_for_line` waits for any log text;
- :meth:`metrics_text`, :meth:`sample`, :meth:`samples`, :meth:`healthz` scrape the endpoint;
  :meth:`wait_until` polls a condition;
- :meth:`worker_pids` maps worker names to pids (from process titles), for kill -9 tests;
- :meth:`stop` sends SIGTERM (to the supervisor, or the whole group with ``group=True``), waits
  for the exit code and asserts that no process of the group is left; leaving the ``with``
  block does the same (killing leftovers, then failing the test if there were any).

:class:`Subscriber` collects ``[topic, json]`` messages from a ZeroMQ PUB endpoint in a thread;
start it before the daemon is ready so no message is lost to the slow-joiner effect.
:func:`install_test_plugins` installs the third-party test package (stages ``counter``,
``passthrough``, ``record``) into the running venv once per session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

REPO = Path(__file__).resolve().parents[2]
THIRDPARTY = REPO / "tests" / "data" / "thirdparty_plugin"
_READY = re.compile(r"Ready: .*metrics on http://([^/\s]+)/metrics")


def process_group_members(pgid: int) -> List[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def process_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Daemon:
    """``edgepipe run`` in a subprocess (see the module docstring)."""

    def __init__(
        self,
        config: Dict[str, Any],
        workdir: Path,
        env: Optional[Dict[str, str]] = None,
        args: Tuple[str, ...] = (),
        filename: str = "pipeline.yaml",
    ) -> None:
        self.config = json.loads(json.dumps(config))  # a private copy
        self.config.setdefault("metrics", {}).setdefault("listen", "127.0.0.1:0")
        self.config.setdefault("runtime", {}).setdefault("status_interval", 1.0)
        self.workdir = Path(workdir)
        self.config_path = self.workdir / filename
        self.write_config(self.config)
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.args = args
        self.lines: List[str] = []
        self.metrics_address: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self._cond = threading.Condition()
        self._reader: Optional[threading.Thread] = None

    # -- life cycle ----------------------------------------------------------------------------

    def write_config(self, config: Dict[str, Any]) -> None:
        """(Re)write the YAML file; follow with ``send(signal.SIGHUP)`` to reload."""
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgepipe", "run", str(self.config_path), *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=str(self.workdir),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close(check=exc[0] is None)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                m = _READY.search(line)
                if m:
                    self.metrics_address = m.group(1)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 120.0, start: int = 0) -> re.Match:
        """Wait until a log line (from index ``start``) matches ``pattern``; fail with the log."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                exited = self.proc is not None and self.proc.poll() is not None
                left = deadline - time.monotonic()
                if left <= 0 or (exited and not (self._reader and self._reader.is_alive())):
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout:g} s "
                        f"(exit code {self.proc.poll() if self.proc else None}); log:\n"
                        + "\n".join(self.lines)
                    )
                self._cond.wait(min(left, 0.2))

    def wait_ready(self, timeout: float = 300.0) -> str:
        """Wait for 'Ready:'; returns the metrics address (host:port)."""
        self.wait_for_line(r"Ready: ", timeout)
        assert self.metrics_address, f"Ready line without a metrics address:\n{self.log}"
        return self.metrics_address

    def send(self, sig: int, group: bool = False) -> None:
        if group:
            os.killpg(self.pid, sig)
        else:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 120.0) -> int:
        """Wait for the daemon to exit; its exit code (AssertionError with the log on timeout)."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout:g} s; log:\n{self.log}") from None
        if self._reader is not None:
            self._reader.join(5)
        return self.returncode

    def leftovers(self) -> List[int]:
        return process_group_members(self.pid) if self.proc is not None else []

    def stop(self, group: bool = False, timeout: float = 90.0) -> int:
        """SIGTERM, wait, and assert no process of the daemon's group is left; the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.send(signal.SIGTERM, group=group)
        code = self.wait(timeout)
        self.assert_no_leftovers()
        return code

    def assert_no_leftovers(self, grace: float = 15.0) -> None:
        deadline = time.monotonic() + grace
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.leftovers()
        if left:
            titles = [f"{p}: {process_title(p)}" for p in left]
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            raise AssertionError(f"processes left behind: {titles}; log:\n{self.log}")

    def close(self, check: bool = True) -> None:
        """Stop if running; kill whatever is left. With ``check``, leftovers fail the test."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.send(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        left = self.leftovers()
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if check and left:
            raise AssertionError(f"processes left behind: {left}; log:\n{self.log}")

    # -- observing -------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        assert self.metrics_address, "call wait_ready() first"
        return f"http://{self.metrics_address}{path}"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as r:
            return r.read().decode()

    def samples(self) -> List[Tuple[str, Dict[str, str], float]]:
        from prometheus_client.parser import text_string_to_metric_families

        out = []
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                out.append((s.name, dict(s.labels), float(s.value)))
        return out

    def sample(self, name: str, **labels: str) -> Optional[float]:
        """The value of one series (labels must match exactly the given ones), None if absent."""
        for n, lab, value in self.samples():
            if n == name and all(lab.get(k) == v for k, v in labels.items()):
                return value
        return None

    def healthz(self) -> Tuple[int, Dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.url("/healthz"), timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_until(self, what: Callable[[], Any], timeout: float = 60.0, message: str = "") -> Any:
        """Poll ``what()`` until truthy; its value. AssertionError naming ``message`` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = what()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s: {message}; log:\n{self.log}")
            time.sleep(0.1)

    def worker_pids(self) -> Dict[str, int]:
        """Worker name -> pid, from the ``edgepipe: <pipeline>/<worker>`` process titles."""
        prefix = f"edgepipe: {self.config.get('name', 'edgepipe')}/"
        out = {}
        for p in self.leftovers():
            title = process_title(p)
            if title.startswith(prefix):
                out[title[len(prefix) :]] = p
        return out


class Subscriber:
    """Collects ``[topic, payload]`` messages from a PUB endpoint in a background thread.

    ``messages`` holds ``(topic, parsed JSON)``; :meth:`wait_for` polls for a condition on them.
    Use as a context manager (the thread and socket end on exit).
    """

    def __init__(self, endpoint: str, topic: str = "detections/") -> None:
        import zmq

        self.endpoint = endpoint
        self.messages: List[Tuple[str, Any]] = []
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        # It connects before the daemon binds: retried every 10 ms instead of ZeroMQ's 100, so
        # that it is there when the first frames are published (what it misses is gone).
        self._sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def _run(self) -> None:
        import zmq

        while not self._stop.is_set():
            if not self._sock.poll(100, zmq.POLLIN):
                continue
            topic, payload = self._sock.recv_multipart()[:2]
            try:
                body: Any = json.loads(payload)
            except ValueError:
                body = payload
            with self._lock:
                self.messages.append((topic.decode(errors="replace"), body))

    def __enter__(self) -> Subscriber:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._ctx.term()

    def snapshot(self) -> List[Tuple[str, Any]]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, cond: Callable[[List[Tuple[str, Any]]], bool], timeout: float = 30.0) -> List[Tuple[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.snapshot()
            if cond(msgs):
                return msgs
            time.sleep(0.05)
        raise AssertionError(f"condition not met within {timeout:g} s; got {len(self.snapshot())} messages")


_installed = False


def install_test_plugins() -> None:
    """pip-install tests/data/thirdparty_plugin into this venv (once per process), the way a
    user installs a third party's plugin: no network, no build isolation, from a copy so the
    source tree gets no build litter. Test processes running side by side (pytest -n) take a
    lock, and one that finds the current version already installed does not install it again."""
    global _installed
    if _installed:
        return
    import fcntl
    import hashlib

    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(THIRDPARTY.rglob("*")) if p.is_file() and "__pycache__" not in p.parts)
    ).hexdigest()[:16]
    marker = Path(sys.prefix) / f".edgepipe-testplugins-{digest}"
    with open(Path(sys.prefix) / ".edgepipe-testplugins.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.exists() and _testplugins_present()):
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "thirdparty_plugin"
                shutil.copytree(THIRDPARTY, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
                r = subprocess.run(
                    [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                     "--no-index", "--force-reinstall", "-q", str(src)],
                    capture_output=True, text=True, timeout=300,
                )
            if r.returncode != 0:
                raise AssertionError(f"installing the test plugin package failed:\n{r.stdout}\n{r.stderr}")
            for old in Path(sys.prefix).glob(".edgepipe-testplugins-*"):
                old.unlink()
            marker.touch()
    _installed = True


def _testplugins_present() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("edgepipe-testplugins")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The records a ``record`` sink wrote (missing file: none)."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out
