"""The systemd notify protocol against a real AF_UNIX datagram socket (filesystem and abstract),
and the messages a running daemon sends: READY after its stages are up, WATCHDOG only while every
stage progresses, STATUS, RELOADING on SIGHUP and STOPPING on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from edgepipe.systemd import Notifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.daemon import Daemon  # noqa: E402
from helpers.prometheus import small_synthetic_config  # noqa: E402

_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket: what a service sends, we read,
    with the sender's pid from SCM_CREDENTIALS (what systemd checks for NotifyAccess=main)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(5.0)

    def recv_from(self) -> Tuple[str, Optional[int]]:
        """One datagram and its sender's pid."""
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS.size))
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDS.unpack(payload[: _CREDS.size])[0]
        return data.decode(), pid

    def recv(self) -> str:
        return self.recv_from()[0]

    def pending(self) -> List[str]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(5.0)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple]:
    path = str(tmp_path / "notify")
    s = NotifySocket(path)
    yield path, s
    s.close()


def test_messages_arrive_in_order(path_socket: tuple) -> None:
    path, server = path_socket
    n = Notifier(path, environ={})
    assert n.enabled
    assert n.ready() is True
    assert n.watchdog() is True
    assert n.status("cam1 25.0 fps\ndetector 24.8 fps") is True
    assert n.stopping() is True
    got = [server.recv() for _ in range(4)]
    assert got == ["READY=1", "WATCHDOG=1", "STATUS=cam1 25.0 fps detector 24.8 fps", "STOPPING=1"]


def test_abstract_socket() -> None:
    name = f"edgepipe-test-{uuid.uuid4().hex}"
    server = NotifySocket(b"\0" + name.encode())
    try:
        n = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert n.socket_path == "@" + name
        assert n.ready(status="Up: 3 stages") is True
        assert n.watchdog() is True
        assert server.recv() == "READY=1\nSTATUS=Up: 3 stages"
        assert server.recv() == "WATCHDOG=1"
    finally:
        server.close()


def test_reloading_carries_monotonic_usec(path_socket: tuple) -> None:
    path, server = path_socket
    n = Notifier(path, environ={})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = server.recv().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert n.extend_timeout(2.5) is True
    assert server.recv() == "EXTEND_TIMEOUT_USEC=2500000"


def test_notify_fields_and_newline_rejected(path_socket: tuple) -> None:
    path, server = path_socket
    n = Notifier(path, environ={})
    assert n.notify(ready=1, status="ok", mainpid=os.getpid()) is True
    assert server.recv() == f"READY=1\nSTATUS=ok\nMAINPID={os.getpid()}"
    with pytest.raises(ValueError, match="STATUS.*newline"):
        n.notify(STATUS="two\nlines")
    with pytest.raises(ValueError):
        n.notify()
    assert server.pending() == []


def test_without_socket_everything_is_a_noop() -> None:
    n = Notifier(environ={"WATCHDOG_USEC": "10000000"})
    assert not n.enabled
    assert n.socket_path is None
    assert [n.ready(), n.watchdog(), n.status("x"), n.stopping(), n.reloading()] == [False] * 5
    assert n.watchdog_interval is None


def test_unsupported_transport_is_ignored() -> None:
    n = Notifier(environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and n.ready() is False


def test_socket_gone_returns_false_without_raising(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(str(tmp_path / "missing"), environ={})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "Cannot notify systemd" in warnings[0].getMessage()


def test_watchdog_interval(path_socket: tuple) -> None:
    path, _ = path_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    assert Notifier(environ=env).watchdog_interval == 15.0
    assert Notifier(environ={**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    # Meant for another process (a spawned worker inheriting the supervisor's environment).
    assert Notifier(environ={**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier(environ={**env, "WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier(environ={**env, "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier(environ={"NOTIFY_SOCKET": path}).watchdog_interval is None


def test_unset_environment_hides_socket_from_children(path_socket: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    path, server = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier(unset_environment=True)
    assert n.enabled and n.watchdog_interval == 2.0
    assert not any(k in os.environ for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"))
    # A child started now finds no socket, so it cannot notify even by mistake.
    child = subprocess.run(
        [sys.executable, "-c", "from edgepipe.systemd import Notifier; print(Notifier().ready())"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    assert child.stdout.strip() == "False"
    assert n.ready() is True
    assert server.recv() == "READY=1"
    assert server.pending() == []


def test_sender_pid_is_visible(path_socket: tuple) -> None:
    """SCM_CREDENTIALS works here, so the daemon test below can tell who sent what."""
    path, server = path_socket
    assert Notifier(path, environ={}).watchdog()
    assert server.recv_from() == ("WATCHDOG=1", os.getpid())


# --- a running daemon ---------------------------------------------------------------------------


class Recorder:
    """Reads the notify socket in a thread: (monotonic time, sender pid, message) per datagram."""

    def __init__(self, server: NotifySocket) -> None:
        self.server = server
        self.messages: List[Tuple[float, Optional[int], str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.server.sock.settimeout(0.2)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text, pid = self.server.recv_from()
            except socket.timeout:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), pid, text))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def snapshot(self) -> List[Tuple[float, Optional[int], str]]:
        with self._lock:
            return list(self.messages)

    def between(self, start: float, end: float, key: str) -> List[str]:
        return [m for t, _, m in self.snapshot() if start <= t < end and _has(m, key)]

    def wait_for(self, key: str, after: float, timeout: float, log: str = "") -> Tuple[float, str]:
        """The first message carrying ``key`` received after ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, _, m in self.snapshot():
                if t >= after and _has(m, key):
                    return t, m
            time.sleep(0.05)
        raise AssertionError(f"no {key} within {timeout:g} s; got {self.snapshot()}\n{log}")


def _has(message: str, key: str) -> bool:
    return any(line.split("=", 1)[0] == key for line in message.split("\n"))


def _states(messages: List[Tuple[float, Optional[int], str]]) -> List[str]:
    """The state changes in order (READY, RELOADING, STOPPING), leaving out WATCHDOG/STATUS."""
    out = []
    for _, _, m in messages:
        for line in m.split("\n"):
            key, _, value = line.partition("=")
            if key in ("READY", "RELOADING", "STOPPING") and value == "1":
                out.append(key)
    return out


@pytest.mark.slow
def test_daemon_notifies_systemd(tmp_path: Path) -> None:
    rundir = tempfile.mkdtemp(prefix="ep-", dir="/tmp")  # ipc:// paths have a length limit
    config = small_synthetic_config(stall_timeout=2.0)
    # The stall below lasts seconds; the supervisor must not replace the stopped worker.
    config["runtime"] = {"dir": rundir, "hang_timeout": 120}
    stages = list(config["stages"])
    source = next(n for n, s in config["stages"].items() if s["type"] == "synthetic")
    server = NotifySocket(str(tmp_path / "notify"))
    recorder = Recorder(server)
    daemon = Daemon(config, tmp_path)
    daemon.env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    daemon.env["WATCHDOG_USEC"] = "1000000"  # WatchdogSec=1: a ping every 0.5 s
    try:
        with daemon:
            started = time.monotonic()
            daemon.wait_ready()
            t_ready, first = recorder.wait_for("READY", started, 30, daemon.log)
            # READY comes once every stage is up and the detector has loaded its model.
            for stage in stages:
                assert daemon.sample("edgepipe_stage_up", stage=stage) == 1.0, stage
            assert daemon.sample("edgepipe_detector_info", stage="detector", device="cpu") == 1.0
            assert recorder.between(0, t_ready, "WATCHDOG") == [], "watchdog pinged before READY"

            # Healthy (every stage has made progress): pings every 0.5 s, and a one-line fps
            # summary in STATUS=.
            daemon.wait_until(lambda: daemon.healthz()[0] == 200, 15, "/healthz never said ok")
            t_healthy = time.monotonic()
            time.sleep(3.0)
            pings = recorder.between(t_healthy, t_healthy + 3.0, "WATCHDOG")
            assert len(pings) >= 4, recorder.snapshot()
            _, status = recorder.wait_for("STATUS", t_ready + 0.001, 10, daemon.log)
            summary = dict(line.split("=", 1) for line in status.split("\n"))["STATUS"]
            assert "fps" in summary and all(stage in summary for stage in stages), summary

            # A stalled stage stops the pings: freeze the source's worker, so no stage progresses.
            cam = daemon.worker_pids()[source]
            os.kill(cam, signal.SIGSTOP)
            t_stop = time.monotonic()
            try:
                code, health = daemon.wait_until(
                    lambda: (lambda h: h if h[0] == 503 else None)(daemon.healthz()), 15,
                    "/healthz never reported the frozen source as stalled",
                )
                assert source in health["stalled"], health
                quiet_from = max(time.monotonic(), t_stop + 2.0 + 1.0)
                time.sleep(quiet_from + 3.0 - time.monotonic())
                assert recorder.between(quiet_from, quiet_from + 3.0, "WATCHDOG") == [], (
                    "watchdog kept pinging while a stage was stalled"
                )
            finally:
                os.kill(cam, signal.SIGCONT)
            t_cont = time.monotonic()
            recorder.wait_for("WATCHDOG", t_cont, 15, daemon.log)  # healthy again: pings resume

            # SIGHUP: RELOADING=1 with the monotonic time, then READY=1 when the reload is done.
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            t_hup = time.monotonic()
            daemon.send(signal.SIGHUP)
            _, reloading = recorder.wait_for("RELOADING", t_hup, 15, daemon.log)
            usec = int(dict(line.split("=", 1) for line in reloading.split("\n"))["MONOTONIC_USEC"])
            assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            recorder.wait_for("READY", t_hup, 30, daemon.log)

            # SIGTERM: STOPPING=1, then a clean exit.
            t_term = time.monotonic()
            assert daemon.stop() == 0, daemon.log
            recorder.wait_for("STOPPING", t_term, 5, daemon.log)
    finally:
        recorder.close()
        server.close()
        os.rmdir(rundir)

    messages = recorder.snapshot()
    assert _states(messages) == ["READY", "RELOADING", "READY", "STOPPING"], messages
    # Only the supervisor (the main PID) speaks to systemd: NotifyAccess=main would drop the rest.
    senders = {pid for _, pid, _ in messages}
    assert senders == {daemon.pid}, senders
