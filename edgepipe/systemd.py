"""The systemd notify protocol, in a few lines of our own.

Under ``Type=notify`` systemd passes the path of a datagram socket in ``$NOTIFY_SOCKET``; the
service tells it about its state by sending newline-separated ``KEY=value`` assignments there
(``READY=1``, ``WATCHDOG=1``, ``STATUS=...``, ``STOPPING=1``, ``RELOADING=1``). A path starting
with ``@`` names a socket in the Linux abstract namespace. Outside systemd (a terminal, the tests
without a socket) every call is a no-op that returns False, so the supervisor calls it
unconditionally. Sending never raises: a daemon must not die because its service manager went
away; the first failure is logged as a warning, later ones at debug level.

``WATCHDOG_USEC`` (set by ``WatchdogSec=``) says how often systemd expects ``WATCHDOG=1``; we ping
at half that period, as sd_watchdog_enabled(3) advises. ``WATCHDOG_PID``, when set, names the
only process the watchdog is meant for (the main PID), so spawned workers that inherit the
environment do not think they should ping.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends state notifications to systemd.

    ``socket_path`` defaults to ``$NOTIFY_SOCKET``; the watchdog settings come from
    ``$WATCHDOG_USEC``/``$WATCHDOG_PID``. ``environ`` replaces ``os.environ`` as the source of
    all three (for tests and embedding). With ``unset_environment=True`` the three variables are
    removed from ``os.environ`` after reading, so child processes started later do not inherit
    them (systemd ignores their messages under ``NotifyAccess=main`` anyway, but a child must not
    believe it is being watched).

    Every sending method returns True when the datagram was sent and False when there is no
    socket or sending failed. Methods are cheap (one datagram on a fresh socket) and safe to call
    from the supervisor's main loop; they are not meant to be called from signal handlers.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        path = socket_path if socket_path is not None else env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path.startswith("@"):
            # Abstract namespace: the name starts with a NUL byte instead of '@'.
            self._address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self._address = path
        elif path:
            # vsock: and other transports of newer systemd versions are not spoken here.
            log.warning("Ignoring NOTIFY_SOCKET %r: not a filesystem or abstract socket path", path)
        self.socket_path = path if self._address is not None else None
        self._watchdog_usec = _watchdog_usec(env)
        self._warned = False
        if unset_environment:
            for key in _ENV_KEYS:
                os.environ.pop(key, None)

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None when the
        watchdog is off, meant for another process (``WATCHDOG_PID``), or there is no socket."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2 / 1e6

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` assignments in one datagram, in the order given.

        Keys are upper-cased (``notify(ready=1)`` sends ``READY=1``). A value containing a
        newline would end the assignment early, so it is rejected with ValueError.
        """
        if not fields:
            raise ValueError("notify() needs at least one KEY=value field")
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ValueError(f"notify field {key.upper()}: value {text!r} contains a newline")
            lines.append(f"{key.upper()}={text}")
        return self._send("\n".join(lines))

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup finished (every stage up, the model warmed), or a reload finished.
        ``status`` is sent as ``STATUS=`` in the same datagram."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=_one_line(status))

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (the CLOCK_MONOTONIC time, which systemd
        253+ needs for ``Type=notify-reload``); send :meth:`ready` when the reload is done."""
        return self.notify(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown (drain) has begun."""
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is healthy; send it only while every stage progresses."""
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        """``STATUS=``: a one-line summary shown by ``systemctl status`` (newlines become
        spaces)."""
        return self.notify(STATUS=_one_line(text))

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for ``seconds`` more before the start, reload or stop
        timeout fires (a slow model warm-up on a cold Jetson)."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(1, int(seconds * 1e6)))

    def _send(self, message: str) -> bool:
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "Cannot notify systemd at %r: %s", self.socket_path, exc)
            return False
        return True


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("Ignoring WATCHDOG_USEC %r: not an integer", raw)
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("Ignoring WATCHDOG_PID %r: not an integer", pid)
            return None
    return usec
