"""Loopback ports for tests: the one place a test gets a free TCP port from."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it).

    The port is released before returning, so another process could take it in between; tests
    bind it at once, and a daemon that finds it taken fails with a clear line rather than hanging.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
