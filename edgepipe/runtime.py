"""The runtime directory: where a daemon's ipc:// sockets live, private to it.

Chosen in this order: the config's ``runtime.dir``; ``$RUNTIME_DIRECTORY`` (systemd's
``RuntimeDirectory=``, created for the service with the right owner and mode); a directory given
either way is created 0700 when missing, tightened to 0700 when it is ours and only readable by
others, and refused when it belongs to another user or others may write in it; else a fresh
``edgepipe-<name>-<pid>`` directory, mode 0700, under ``$XDG_RUNTIME_DIR`` or the temp dir. The
supervisor holds an exclusive lock (``flock``) on ``edgepipe.lock`` inside it for its whole life:
a second daemon on the same directory is refused, and a directory whose lock nobody holds was
left by a killed daemon, so its stale sockets (and, for the per-daemon directories, the directory
itself) are removed. Two daemons side by side each get their own directory; only their TCP ports
(metrics, publishers) must differ. Besides the sockets, each source keeps its next frame id there
(:class:`PositionFile`), so a restarted source continues its ids, and a stage may keep state for
its own restarts in ``<stage>.state.json`` (the tracker's next track ids); both go with the
daemon.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import mmap
import os
import shutil
import stat
import struct
import tempfile
from typing import IO, Iterable, List, Mapping, Optional

__all__ = [
    "MAX_IPC_PATH",
    "PositionFile",
    "RuntimeDir",
    "RuntimeDirError",
    "open_runtime_dir",
    "read_position",
    "running_daemons",
]

log = logging.getLogger(__name__)

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_IPC_PATH = 107
LOCK_NAME = "edgepipe.lock"
CONTROL_NAME = "control"
INPUT_SUFFIX = ".in"
POSITION_SUFFIX = ".next"
STATE_SUFFIX = ".state.json"  # a stage's own state for its restarts (the tracker's next ids)
_POSITION = struct.Struct("<Q")


class RuntimeDirError(Exception):
    """The runtime directory cannot be used; the message says which and why, in one line."""


class RuntimeDir:
    """An opened, locked runtime directory. :meth:`close` unlocks it and removes what we made."""

    def __init__(self, path: str, owned: bool, lock: IO[str]) -> None:
        self.path = path
        self.owned = owned  # created by us: removed entirely on close
        self._lock: Optional[IO[str]] = lock

    @property
    def control_endpoint(self) -> str:
        return "ipc://" + os.path.join(self.path, CONTROL_NAME)

    def input_endpoint(self, stage: str) -> str:
        """Where the consumer ``stage`` binds its input PULL socket (between processes)."""
        return "ipc://" + os.path.join(self.path, stage + INPUT_SUFFIX)

    def position_path(self, source: str) -> str:
        """The :class:`PositionFile` of the source stage ``source``."""
        return os.path.join(self.path, source + POSITION_SUFFIX)

    def check_lengths(self, stages: Iterable[str]) -> None:
        """RuntimeDirError when a socket path would not fit in sun_path."""
        longest = max([CONTROL_NAME] + [s + INPUT_SUFFIX for s in stages], key=len)
        full = os.path.join(self.path, longest)
        if len(full.encode()) > MAX_IPC_PATH:
            raise RuntimeDirError(
                f"runtime dir {self.path!r} is too long for ipc sockets ({full!r} has "
                f"{len(full.encode())} bytes, at most {MAX_IPC_PATH}); set runtime.dir to a shorter path"
            )

    def close(self) -> None:
        if self._lock is None:
            return
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            _remove_sockets(self.path)
            _unlink(os.path.join(self.path, LOCK_NAME))
        self._lock.close()
        self._lock = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_sockets(path: str) -> None:
    """Remove the sockets, source positions and stage states a daemon leaves in its runtime dir."""
    for p in (
        glob.glob(os.path.join(path, "*" + INPUT_SUFFIX))
        + glob.glob(os.path.join(path, "*" + POSITION_SUFFIX))
        + glob.glob(os.path.join(path, "*" + STATE_SUFFIX))
        + [os.path.join(path, CONTROL_NAME)]
    ):
        _unlink(p)


class PositionFile:
    """The next frame id of one source, in a small file of the runtime dir shared with the
    supervisor (``<stage>.next``, 8 bytes, little-endian).

    The worker writes it through a memory map before each frame leaves the source, so it is
    current even when the worker is killed the next instant (the page belongs to the file, not
    to the process); the supervisor reads it with :func:`read_position` to give a restarted
    source its ``resume`` id. Writing before sending means a kill between the two loses that
    frame rather than repeating it."""

    def __init__(self, path: str, value: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _POSITION.pack(value))
            self._map: Optional[mmap.mmap] = mmap.mmap(fd, _POSITION.size)
        finally:
            os.close(fd)

    def set(self, value: int) -> None:
        if self._map is not None:
            _POSITION.pack_into(self._map, 0, value)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def read_position(path: str) -> int:
    """What a :class:`PositionFile` holds; 0 when there is none (the source never ran)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_POSITION.size)
    except OSError:
        return 0
    return _POSITION.unpack(data)[0] if len(data) == _POSITION.size else 0


def _try_lock(path: str) -> Optional[IO[str]]:
    """The lock file opened and locked, or None when another process holds it."""
    f = open(os.path.join(path, LOCK_NAME), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _holder(path: str) -> str:
    try:
        with open(os.path.join(path, LOCK_NAME)) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def _lock_as_ours(path: str, lock: IO[str]) -> None:
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()


def _make_private(path: str) -> None:
    """Make an existing directory fit for ipc sockets: ours and mode 0700.

    Anyone who can enter the directory can connect to the sockets, and anyone who can write in it
    can replace them, so: a directory of another user, or one that others may write in (a shared
    directory such as /tmp), is refused (RuntimeDirError); one of ours that others may only read
    or enter is tightened to 0700 with a warning."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"runtime dir {path!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise RuntimeDirError(
            f"runtime dir {path!r} belongs to uid {st.st_uid}, not to this daemon's uid "
            f"{os.geteuid()}; ipc sockets need a private directory of its own"
        )
    if mode & 0o022:
        raise RuntimeDirError(
            f"runtime dir {path!r} is writable by other users (mode {mode:04o}); ipc sockets need "
            "a private directory: name one of this daemon's own (it is created 0700)"
        )
    if mode & 0o077:
        os.chmod(path, 0o700)
        log.warning(
            "Tightened runtime dir %r from mode %04o to 0700: its ipc sockets must be private", path, mode
        )


def _clean_stale(base: str, name: str) -> None:
    """Remove ``edgepipe-<name>-*`` directories whose daemon is gone (nobody holds the lock)."""
    for path in glob.glob(os.path.join(base, f"edgepipe-{name}-*")):
        try:
            if os.stat(path).st_uid != os.getuid() or not os.path.isdir(path):
                continue
            lock = _try_lock(path)
        except OSError:
            continue
        if lock is not None:
            log.info("Removed stale runtime dir %r of a daemon that is gone", path)
            shutil.rmtree(path, ignore_errors=True)
            lock.close()


def running_daemons(name: str, env: Optional[Mapping[str, str]] = None) -> List[int]:
    """Pids of other live daemons of pipeline ``name`` using the per-daemon runtime directories
    (whoever holds the lock of an ``edgepipe-<name>-*`` directory), for an error that names them."""
    env = os.environ if env is None else env
    base = env.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    pids = []
    for path in glob.glob(os.path.join(glob.escape(base), f"edgepipe-{glob.escape(name)}-*")):
        try:
            lock = _try_lock(path)
        except OSError:
            continue
        if lock is not None:  # nobody holds it: a stale directory
            lock.close()
            continue
        holder = _holder(path)
        if holder.isdigit() and int(holder) != os.getpid():
            pids.append(int(holder))
    return sorted(pids)


def open_runtime_dir(
    configured: Optional[str], name: str, env: Optional[Mapping[str, str]] = None
) -> RuntimeDir:
    """Pick, create or clean, and lock the daemon's runtime directory (see module docstring)."""
    env = os.environ if env is None else env
    given = configured or (env.get("RUNTIME_DIRECTORY", "").split(":")[0] or None)
    if given:
        path = os.path.abspath(os.path.expanduser(given))
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            _make_private(path)
            lock = _try_lock(path)
        except OSError as exc:
            raise RuntimeDirError(f"runtime dir {path!r}: {exc.strerror or exc}") from None
        if lock is None:
            raise RuntimeDirError(
                f"runtime dir {path!r} is in use by another edgepipe (pid {_holder(path)}); "
                "give each daemon its own runtime.dir"
            )
        _remove_sockets(path)  # left by a daemon that was killed
        _lock_as_ours(path, lock)
        return RuntimeDir(path, owned=False, lock=lock)

    base = env.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if not os.path.isdir(base):
        base = tempfile.gettempdir()
    _clean_stale(base, name)
    path = os.path.join(base, f"edgepipe-{name}-{os.getpid()}")
    try:
        if os.path.isdir(path):  # our pid, reused after a crash: same name, stale content
            shutil.rmtree(path)
        os.mkdir(path, 0o700)
        lock = _try_lock(path)
    except OSError as exc:
        raise RuntimeDirError(f"runtime dir {path!r}: {exc.strerror or exc}") from None
    assert lock is not None  # a directory we just created
    _lock_as_ours(path, lock)
    return RuntimeDir(path, owned=True, lock=lock)


class _JournalFormatter(logging.Formatter):
    """journald adds time and unit; a ``<N>`` prefix gives each line its syslog priority."""

    _PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelname, 6)}>" + super().format(record)


def configure_logging(level: str, who: str, stream: Optional[IO[str]] = None) -> logging.Handler:
    """Log lines for a terminal (with time) or for journald (no time, priority prefixes when
    ``$JOURNAL_STREAM`` is set); ``who`` names the process (``supervisor`` or the worker)."""
    import sys

    handler = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter(f"{who}: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {who}: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
