"""The ``jsonl`` sink: detection messages appended to a file, one JSON document per line.

Each line is :func:`edgepipe.messages.detection_message` (the same document ``zmq_pub``
publishes) or, with ``events: true``, also each event message the frame carries, after the
frame's detection message (``detections: false`` records only the events); a reader tells them
apart by their ``schema``. Lines are written whole and flushed after every batch, so a reader (``tail -f``, jq, a log
shipper) never sees half a message. With ``max_bytes`` the file rotates by size like logrotate:
``path`` -> ``path.1`` -> ... -> ``path.<backups>``, the oldest deleted. When the disk is full
(or the file becomes unwritable) the messages are dropped, counted as errors, and writing resumes
by itself when space returns; one log line marks the outage and one its end. The file is
``fsync``-ed before it is rotated away and when the sink stops, so a power cut after a clean stop
or a rotation loses nothing written before; a partial last line left by a killed worker (or a
failed write) is cut off when the sink starts, so the file stays parseable line by line.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from typing import IO, ClassVar, Dict, List, Optional, Tuple

from pydantic import Field, model_validator

from edgepipe.messages import Frame, detection_message, dumps
from edgepipe.stage import StageConfig, StageError

from .._common import DeliveringSink

__all__ = ["JsonlConfig", "JsonlSink"]


class JsonlConfig(StageConfig):
    path: str = Field(..., min_length=1, description="File to append to (its directory must exist).")
    max_bytes: int = Field(
        0, ge=0, description="Rotate when the file would grow beyond this many bytes (0: never rotate)."
    )
    backups: int = Field(
        3, ge=0, le=1000, description="Rotated files to keep (path.1 ... path.N); 0 truncates instead."
    )
    detections: bool = Field(True, description="Record one detection message per frame.")
    events: bool = Field(
        False,
        description="Also record the event messages frames carry (tracked objects, zones), each on "
        "its own line after its frame's detection message.",
    )

    @model_validator(mode="after")
    def _something(self) -> JsonlConfig:
        if not (self.detections or self.events):
            raise ValueError("detections: nothing to record: set detections or events (or both) to true")
        return self


class JsonlSink(DeliveringSink):
    """Appends detection messages to a file, one JSON per line, with size-based rotation."""

    Config = JsonlConfig
    config: JsonlConfig
    accepts: ClassVar[Tuple[str, ...]] = ("detections",)

    _file: Optional[IO[bytes]] = None

    def check(self) -> None:
        path = os.path.abspath(os.path.expanduser(self.config.path))
        folder = os.path.dirname(path)
        if os.path.isdir(path):
            raise StageError(f"jsonl path {self.config.path!r} is a directory; expected a file name")
        if not os.path.isdir(folder):
            raise StageError(f"jsonl path {self.config.path!r}: directory {folder!r} does not exist")
        # Try it rather than trust permission bits: root passes os.access() on read-only or
        # virtual file systems where every write fails. Neither probe changes anything.
        try:
            if os.path.exists(path):
                open(path, "ab").close()
            else:
                tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            raise StageError(f"jsonl path {self.config.path!r} is not writable: {exc.strerror or exc}") from None

    def start(self) -> None:
        self.check()
        self._path = os.path.expanduser(self.config.path)
        self._failing = False
        try:
            cut = _trim_partial_line(self._path)
        except OSError as exc:
            raise StageError(f"jsonl path {self.config.path!r}: {exc.strerror or exc}") from None
        if cut:
            self.log.warning(
                "Removed a partial last line (%d bytes) from %r, left by an interrupted write", cut, self._path
            )
        self._open()

    def _open(self) -> None:
        self._file = open(self._path, "ab")  # noqa: SIM115 - held open for the stage's life
        self._size = self._file.tell()

    def _rotate(self) -> None:
        assert self._file is not None
        _sync(self._file)  # what goes to a backup is on the disk before the names change
        self._file.close()
        self._file = None
        keep = self.config.backups
        if keep == 0:
            open(self._path, "wb").close()
        else:
            for i in range(keep - 1, 0, -1):
                older = f"{self._path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self._path}.{i + 1}")
            os.replace(self._path, f"{self._path}.1")
            _sync_directory(os.path.dirname(os.path.abspath(self._path)))
        self._open()

    def addresses(self) -> Dict[str, str]:
        return {"detections file": os.path.abspath(self._path)}

    def process(self, frames: List[Frame]) -> None:
        lines = []
        for f in frames:
            if self.config.detections:
                lines.append(dumps(detection_message(f)) + b"\n")
            if self.config.events:
                lines.extend(dumps(e) + b"\n" for e in f.events)
        data = b"".join(lines)
        try:
            self._write(data, frames)
        except OSError as exc:
            self.metrics.errors.labels("process").inc(len(frames))
            if not self._failing:
                self._failing = True
                self.log.error("Cannot write %r, dropping messages until it works again: %s", self._path, exc.strerror or exc)
            self._recover()
            return
        if self._failing:
            self._failing = False
            self.log.info("Writing %r again", self._path)

    def _write(self, data: bytes, frames: List[Frame]) -> None:
        if self._file is None:
            self._open()
        assert self._file is not None
        limit = self.config.max_bytes
        if limit and self._size and self._size + len(data) > limit:
            self._rotate()
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        self._size += len(data)
        now = time.time()
        for f in frames:
            self.delivered(f, now)

    def _recover(self) -> None:
        """After a failed write: drop the buffered bytes and reopen, so no half line survives."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # the unflushed bytes are the failed batch; losing them is the point
        try:
            _trim_partial_line(self._path)
        except OSError:
            pass  # still failing; the next batch tries again

    def stop(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            _sync(file)
        except OSError as exc:
            self.log.error("Closing %r failed: %s", self._path, exc.strerror or exc)
        try:
            file.close()
        except OSError:
            pass  # the failed flush again, logged above


def _sync(file: IO[bytes]) -> None:
    """Flush to the operating system and on to the disk (a device such as /dev/full that
    cannot be synced is only flushed)."""
    file.flush()
    try:
        os.fsync(file.fileno())
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def _sync_directory(path: str) -> None:
    """fsync a directory, so renames in it are durable (where the system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data itself is synced
    finally:
        os.close(fd)


def _trim_partial_line(path: str) -> int:
    """Cut a last line that has no newline (a write that was interrupted); the bytes removed."""
    if not os.path.exists(path):
        return 0
    size = os.path.getsize(path)
    if not size or _last_byte(path) == b"\n":
        return 0
    keep = _last_newline(path)
    os.truncate(path, keep)
    return size - keep


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _last_newline(path: str) -> int:
    """Length of the file up to and including its last newline (0 when it has none)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            i = chunk.rfind(b"\n")
            if i >= 0:
                return pos + i + 1
    return 0
