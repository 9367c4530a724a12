"""The systemd notify protocol against a real AF_UNIX datagram socket (filesystem and abstract)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

from edgepipe.systemd import Notifier


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket: what a service sends, we read."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

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
