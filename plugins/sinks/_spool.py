"""The on-disk spool of the broker sinks (``mqtt``, ``nats``): an ordered, bounded, crash-safe
queue of messages waiting for a broker's acknowledgement.

Every message a sink must not lose is appended here first and leaves only when the broker has
acknowledged it (write-ahead), so a broker outage, a killed worker and a daemon restart all end
the same way: the next connection delivers what is left, oldest first. Design:

- **Segments.** Records go to append-only files ``<first seq>.seg`` of about ``segment_bytes``;
  a segment is deleted as soon as every record in it is acknowledged (or dropped). A record is
  ``[u32 length][u32 crc32][u64 seq][payload]``, the CRC covering seq and payload. Sequence
  numbers increase by one per record for the life of the directory (also across restarts), which
  is what the acknowledgement cursor (file ``cursor``) and the in-flight bookkeeping refer to.
- **Crash safety.** A record reaches the file in one ``write`` per batch, and readers only look
  below the end of the last complete batch. At open every segment is read through and checked:
  the first record that is cut short, fails its CRC or breaks the sequence ends its segment (the
  file is truncated there, counted and logged), so a half-written record left by ``kill -9`` or a
  power cut is never delivered. The cursor is rewritten (write, rename) about once per
  ``fsync_interval``: after a crash at most the records acknowledged since are delivered again
  (at-least-once; the sinks give every message an id for that).
- **fsync policy.** ``kill -9`` loses nothing written (the page cache belongs to the kernel); only
  a power cut or kernel crash can. The spool therefore calls ``fsync`` at most once per
  ``fsync_interval`` and only while some record appended since the last sync is still
  unacknowledged (the broker is down or slow): a healthy link costs no syncs at all. Segments
  whose records are all acknowledged are deleted within seconds (the write segment too, after
  ``idle_roll`` s), before the kernel writes their dirty pages back (30 s by default), so a
  device on a flash card pays for the spool in writes only during an outage. ``fsync_interval``
  0 syncs every batch before :meth:`Spool.append` returns.
- **Bounded.** The unacknowledged bytes (records with their headers) never exceed ``max_bytes``:
  an append that would go beyond drops the oldest records first and reports how many.
- **Flat memory.** Nothing is held per record except the ones read and not yet acknowledged (the
  sink's in-flight window): reads go to the files with ``pread`` in bounded chunks; per segment
  only its first sequence number, size and record count are kept.

One process at a time: :meth:`Spool.open` takes an exclusive lock (``flock``) on the directory's
``lock`` file and refuses a directory another process holds. Thread-safe: the worker's main
thread appends while the sink's delivery thread reads and acknowledges.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from typing import Dict, List, Optional, Sequence, Set, Tuple

__all__ = ["HEADER", "MAX_RECORD", "Spool", "SpoolError"]

HEADER = struct.Struct("<IIQ")  # payload length, crc32 of (seq, payload), seq
MAX_RECORD = 64 * 1024 * 1024  # no message of ours comes near; a larger length is damage
_SEQ = struct.Struct("<Q")
_SUFFIX = ".seg"
_READ_CHUNK = 256 * 1024

log = logging.getLogger(__name__)


class SpoolError(Exception):
    """The spool cannot be used (directory not writable, held by another process); one line."""


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) & 0xFFFFFFFF


class _Segment:
    """One segment file: ``first`` is the seq of its first record, ``count`` the records in it,
    ``size`` its length in bytes (complete records only). ``fd`` is a read handle, opened on use."""

    __slots__ = ("count", "fd", "first", "path", "size")

    def __init__(self, path: str, first: int, size: int = 0, count: int = 0) -> None:
        self.path = path
        self.first = first
        self.size = size
        self.count = count
        self.fd: Optional[int] = None

    @property
    def next(self) -> int:
        return self.first + self.count

    def read_fd(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Spool:
    """An ordered, bounded, crash-safe message queue in a directory (see the module docstring).

    Life cycle: :meth:`open` (scans and repairs), then any number of :meth:`append` (producer
    side) and :meth:`read`/:meth:`ack`/:meth:`rewind` (delivery side), :meth:`maintain` every
    second or so from the delivery side (syncs, cursor, idle segment), :meth:`close`.

    Delivery: :meth:`read` hands out records from the read position, oldest first, and moves it
    on; :meth:`ack` marks one delivered (in any order; the oldest unacknowledged record is what
    the cursor keeps); :meth:`rewind` moves the read position back to the oldest unacknowledged
    record (a connection was lost: whatever was in flight goes out again, in order).
    """

    def __init__(
        self,
        directory: str,
        max_bytes: int,
        segment_bytes: int = 4 * 1024 * 1024,
        fsync_interval: float = 1.0,
        idle_roll: float = 5.0,
    ) -> None:
        if max_bytes < HEADER.size + 1:
            raise ValueError(f"max_bytes must be above {HEADER.size}, got {max_bytes}")
        self.directory = directory
        self.max_bytes = int(max_bytes)
        self.segment_bytes = max(int(segment_bytes), HEADER.size + 1)
        self.fsync_interval = float(fsync_interval)
        self.idle_roll = float(idle_roll)
        self._lock = threading.Lock()
        self._segments: List[_Segment] = []
        self._wfd: Optional[int] = None  # append handle of the last segment
        self._next_seq = 0  # seq of the next record appended
        # The oldest unacknowledged record: its seq, and its offset / index in segments[0].
        self._ack_seq = 0
        self._ack_off = 0
        self._ack_index = 0
        # The read position: the next record read() hands out.
        self._read_seg: Optional[_Segment] = None
        self._read_off = 0
        self._read_seq = 0
        # Records read and not yet acknowledged: seq -> (segment, offset, record size).
        self._inflight: Dict[int, Tuple[_Segment, int, int]] = {}
        self._acked: Set[int] = set()  # acknowledged ahead of the oldest unacknowledged one
        self._synced_seq = 0  # every record below this one is on disk (or was never unacked)
        self._last_sync = 0.0
        self._dir_dirty = False  # a segment file was created since the last directory sync
        self._to_sync: List[int] = []  # append handles of rolled segments not yet synced
        self._cursor_written = -1
        self._last_cursor = 0.0
        self._write_opened = 0.0
        self._lock_fd: Optional[int] = None
        self.corrupt_bytes = 0  # found damaged at open (cut off)
        self.lost_records = 0  # records missing from the sequence at open (a damaged segment)

    # -- open / close ------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, check every segment, cut off damage, find the cursor.
        :class:`SpoolError` (one line) when the directory cannot be used."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool directory {self.directory!r}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SpoolError(
                    f"spool directory {self.directory!r} is in use by another process "
                    "(two sinks or daemons with the same state directory?)"
                ) from None
            raise SpoolError(f"spool directory {self.directory!r}: cannot lock: {exc.strerror or exc}") from None
        with self._lock:
            self._scan()

    def _scan(self) -> None:
        names = []
        for name in os.listdir(self.directory):
            if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)].isdigit():
                names.append((int(name[: -len(_SUFFIX)]), name))
        names.sort()
        cursor = self._read_cursor()
        expected: Optional[int] = None
        for first, name in names:
            path = os.path.join(self.directory, name)
            seg = _Segment(path, first)
            self._check_segment(seg)
            if seg.count == 0:
                os.unlink(path)
                continue
            if expected is not None and first != expected:
                # A segment that lost its tail (damage) leaves a hole before the next one.
                missing = max(0, first - expected)
                self.lost_records += missing
                log.warning("Spool %r: %d record(s) missing before %s (damaged segment)", self.directory, missing, name)
            expected = seg.next
            self._segments.append(seg)
        self._next_seq = self._segments[-1].next if self._segments else 0
        if cursor is not None:
            self._next_seq = max(self._next_seq, cursor)
        # Segments entirely below the cursor were delivered before the restart.
        while self._segments and cursor is not None and self._segments[0].next <= cursor:
            os.unlink(self._segments.pop(0).path)
        self._ack_seq = self._segments[0].first if self._segments else self._next_seq
        self._ack_off = 0
        self._ack_index = 0
        if cursor is not None and self._segments and cursor > self._ack_seq:
            head = self._segments[0]
            off = 0
            for _ in range(cursor - head.first):
                length, _crc_value, _seq = HEADER.unpack(os.pread(head.read_fd(), HEADER.size, off))
                off += HEADER.size + length
            self._ack_seq, self._ack_off, self._ack_index = cursor, off, cursor - head.first
        self._synced_seq = self._next_seq
        self._cursor_written = self._ack_seq
        self._rewind()

    def _check_segment(self, seg: _Segment) -> None:
        """Read ``seg`` through; set its size and count to its valid prefix and cut the rest."""
        fd = seg.read_fd()
        end = os.fstat(fd).st_size
        off, seq, why = 0, seg.first, ""
        buf, buf_off = b"", 0  # a window of the file starting at buf_off
        while off < end:
            if off + HEADER.size > end:
                why = "a record header cut short"
                break
            if off + HEADER.size > buf_off + len(buf):
                buf, buf_off = os.pread(fd, _READ_CHUNK, off), off
            length, crc, rec_seq = HEADER.unpack_from(buf, off - buf_off)
            if length > MAX_RECORD or rec_seq != seq:
                why = f"a bad record header at offset {off}"
                break
            if off + HEADER.size + length > end:
                why = "a record cut short"
                break
            start = off + HEADER.size
            if start + length > buf_off + len(buf):
                buf, buf_off = os.pread(fd, max(_READ_CHUNK, HEADER.size + length), off), off
            payload = buf[start - buf_off : start - buf_off + length]
            if _crc(rec_seq, payload) != crc:
                why = f"a record failing its checksum at offset {off}"
                break
            off = start + length
            seq += 1
        seg.size, seg.count = off, seq - seg.first
        if off < end:
            self.corrupt_bytes += end - off
            log.warning(
                "Spool %r: cut %d byte(s) off %s after %d good record(s): %s (an interrupted write or a damaged disk)",
                self.directory, end - off, os.path.basename(seg.path), seg.count, why,
            )
            seg.close()
            os.truncate(seg.path, off)

    def _read_cursor(self) -> Optional[int]:
        try:
            with open(os.path.join(self.directory, "cursor"), "rb") as f:
                text = f.read(64).decode("ascii").strip()
            return int(text) if text.isdigit() else None
        except (OSError, UnicodeDecodeError):
            return None

    def close(self) -> None:
        """Sync what is unacknowledged, write the cursor, release files and the lock."""
        with self._lock:
            self._sync(time.monotonic(), force=True)
            self._write_cursor(force=True)
            for fd in self._to_sync:
                os.close(fd)
            self._to_sync = []
            for seg in self._segments:
                seg.close()
            if self._wfd is not None:
                os.close(self._wfd)
                self._wfd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    # -- producer side -----------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes]) -> int:
        """Append records (in this order, after everything already here); returns how many of
        the oldest records were dropped to stay within ``max_bytes``. A payload that alone is
        larger than ``max_bytes`` is not stored and counts as dropped. OSError (disk full, I/O
        error): the records of the failing write are not stored, nor any after them (no partial
        record stays behind either)."""
        dropped = 0
        with self._lock:
            batch = []
            for p in payloads:
                if HEADER.size + len(p) > self.max_bytes or len(p) > MAX_RECORD:
                    dropped += 1
                    continue
                batch.append(p)
            if not batch:
                return dropped
            # Whole segments of about segment_bytes each, one write per segment touched.
            while batch:
                seg = self._write_segment(HEADER.size + len(batch[0]))
                room = self.segment_bytes - seg.size
                parts, seq, n = [], self._next_seq, 0
                for p in batch:
                    size = HEADER.size + len(p)
                    if n and size > room:
                        break
                    parts.append(HEADER.pack(len(p), _crc(seq, p), seq))
                    parts.append(p)
                    room -= size
                    seq += 1
                    n += 1
                self._write(seg, b"".join(parts), n)
                batch = batch[n:]
            dropped += self._enforce_cap()
            if self.fsync_interval <= 0:
                self._sync(time.monotonic(), force=True)
        return dropped

    def _write(self, seg: _Segment, blob: bytes, n: int) -> None:
        assert self._wfd is not None
        try:
            written = 0
            while written < len(blob):
                written += os.write(self._wfd, blob[written:])
        except OSError:
            os.ftruncate(self._wfd, seg.size)  # no half batch stays behind
            raise
        seg.size += len(blob)
        seg.count += n
        self._next_seq += n

    def _write_segment(self, incoming: int) -> _Segment:
        """The segment to append to: the last one, or a new one when it is full (or none)."""
        last = self._segments[-1] if self._segments else None
        if last is not None and self._wfd is not None and (last.size == 0 or last.size + incoming <= self.segment_bytes):
            return last
        if self._wfd is not None:
            if self._synced_seq < self._next_seq:
                self._to_sync.append(self._wfd)  # synced (then closed) by the next sync
            else:
                os.close(self._wfd)
            self._wfd = None
        path = os.path.join(self.directory, f"{self._next_seq:020d}{_SUFFIX}")
        self._wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._wfd, 0)  # a leftover of the same name (all of it acknowledged) is stale
        seg = _Segment(path, self._next_seq)
        self._segments.append(seg)
        self._dir_dirty = True
        self._write_opened = time.monotonic()
        if len(self._segments) == 1:
            self._ack_seq, self._ack_off, self._ack_index = seg.first, 0, 0
            self._read_seg, self._read_off, self._read_seq = seg, 0, seg.first
        else:
            self._release_head()  # a finished segment from before a restart can go now
        return seg

    def _enforce_cap(self) -> int:
        dropped = 0
        while self._unacked_bytes() > self.max_bytes and self._ack_seq < self._next_seq:
            head = self._segments[0]
            if head is not self._segments[-1] and self._unacked_bytes() - (head.size - self._ack_off) >= self.max_bytes:
                dropped += head.count - self._ack_index  # the whole head segment goes
                for seq in range(self._ack_seq, head.next):
                    self._inflight.pop(seq, None)
                    self._acked.discard(seq)
                self._ack_seq, self._ack_off, self._ack_index = head.next, head.size, head.count
            else:
                self._pop_head(self._record_size(head, self._ack_off, self._ack_seq))
                dropped += 1
            self._release_head()
        if self._read_seq < self._ack_seq:
            self._rewind()  # the read position was among the dropped records
        return dropped

    def _record_size(self, seg: _Segment, off: int, seq: int) -> int:
        known = self._inflight.get(seq)
        if known is not None:
            return known[2]
        length = HEADER.unpack(os.pread(seg.read_fd(), HEADER.size, off))[0]
        return HEADER.size + length

    # -- delivery side -----------------------------------------------------------------------

    def read(self, max_records: int) -> List[Tuple[int, bytes]]:
        """Up to ``max_records`` records ``(seq, payload)`` from the read position, in order."""
        out: List[Tuple[int, bytes]] = []
        with self._lock:
            while len(out) < max_records:
                seg = self._read_seg
                if seg is None:
                    break
                if self._read_off >= seg.size:
                    i = self._index(seg)
                    if i is None or i + 1 >= len(self._segments):
                        break
                    nxt = self._segments[i + 1]
                    self._read_seg, self._read_off, self._read_seq = nxt, 0, nxt.first
                    continue
                want = min(_READ_CHUNK, seg.size - self._read_off)
                buf = os.pread(seg.read_fd(), want, self._read_off)
                pos = 0
                while len(out) < max_records and pos + HEADER.size <= len(buf):
                    length, crc, seq = HEADER.unpack_from(buf, pos)
                    size = HEADER.size + length
                    if pos + size > len(buf):
                        if pos == 0:  # one record larger than the chunk
                            buf = os.pread(seg.read_fd(), size, self._read_off)
                            continue
                        break
                    payload = bytes(buf[pos + HEADER.size : pos + size])
                    if seq != self._read_seq or _crc(seq, payload) != crc:
                        self._cut(seg)
                        break
                    self._inflight[seq] = (seg, self._read_off, size)
                    out.append((seq, payload))
                    self._read_off += size
                    self._read_seq += 1
                    pos += size
        return out

    def _cut(self, seg: _Segment) -> None:
        """Records were checked at open; one damaged since (a failing disk) ends its segment at
        the read position, as the check at open would have done."""
        lost = seg.next - self._read_seq
        log.error(
            "Spool %r: record %d damaged on disk; %d record(s) of %s lost",
            self.directory, self._read_seq, lost, os.path.basename(seg.path),
        )
        self.lost_records += lost
        if seg is self._segments[-1] and self._wfd is not None:
            os.close(self._wfd)  # the next append starts a new segment after the hole
            self._wfd = None
        os.truncate(seg.path, self._read_off)
        seg.size, seg.count = self._read_off, self._read_seq - seg.first
        self._release_head()

    def ack(self, seq: int) -> bool:
        """Mark record ``seq`` delivered; False if it is not in flight (acknowledged already,
        dropped, or from before a :meth:`rewind`)."""
        with self._lock:
            if seq not in self._inflight or seq in self._acked:
                return False
            self._acked.add(seq)
            while self._ack_seq in self._acked:
                self._acked.discard(self._ack_seq)
                self._pop_head(self._inflight[self._ack_seq][2])
                self._release_head()
            return True

    def rewind(self) -> None:
        """Hand out everything unacknowledged again, from the oldest."""
        with self._lock:
            self._rewind()

    def _rewind(self) -> None:
        self._inflight.clear()
        self._acked.clear()
        if self._segments:
            self._read_seg, self._read_off, self._read_seq = self._segments[0], self._ack_off, self._ack_seq
        else:
            self._read_seg, self._read_off, self._read_seq = None, 0, self._next_seq

    def _pop_head(self, size: int) -> None:
        """The oldest unacknowledged record (``size`` bytes) is done (acknowledged or dropped)."""
        self._inflight.pop(self._ack_seq, None)
        self._ack_seq += 1
        self._ack_off += size
        self._ack_index += 1

    def _release_head(self) -> None:
        """Delete head segments that are done, except the one being written to."""
        while self._segments:
            head = self._segments[0]
            if self._ack_index < head.count or (head is self._segments[-1] and self._wfd is not None):
                break
            self._segments.pop(0)
            head.close()
            os.unlink(head.path)
            if self._segments:
                nxt = self._segments[0]
                self._ack_seq, self._ack_off, self._ack_index = nxt.first, 0, 0
                if self._read_seg is head:
                    self._read_seg, self._read_off, self._read_seq = nxt, 0, nxt.first
            else:
                self._ack_seq, self._ack_off, self._ack_index = self._next_seq, 0, 0
                self._read_seg, self._read_off, self._read_seq = None, 0, self._next_seq

    def _index(self, seg: _Segment) -> Optional[int]:
        for i, s in enumerate(self._segments):
            if s is seg:
                return i
        return None

    # -- housekeeping ------------------------------------------------------------------------

    def maintain(self, now: Optional[float] = None) -> None:
        """Call about once a second from the delivery side: syncs when due (see the module
        docstring), rewrites the cursor when it moved, and deletes the write segment once all
        of it is acknowledged and it is older than ``idle_roll``. The fsync itself runs outside
        the lock, so the producer's appends never wait for the disk."""
        now = time.monotonic() if now is None else now
        with self._lock:
            plan = self._sync_plan(now)
        if plan is not None:
            self._run_sync(plan, now)
        with self._lock:
            if now - self._last_cursor >= max(self.fsync_interval, 0.2):
                self._write_cursor()
            if (
                len(self._segments) == 1 and self._ack_seq == self._next_seq
                and (self._wfd is None or now - self._write_opened >= self.idle_roll)
            ):
                if self._wfd is not None:
                    os.close(self._wfd)
                    self._wfd = None
                self._release_head()
                self._write_cursor()

    def _sync_plan(self, now: float, force: bool = False) -> Optional[Tuple[List[int], bool, int]]:
        """Under the lock: what a sync must cover now (file descriptors it then owns, whether the
        directory changed, the seq below which everything will be on disk), or None."""
        if self._synced_seq >= self._next_seq:
            return None
        if max(self._synced_seq, self._ack_seq) >= self._next_seq:
            self._synced_seq = self._next_seq  # everything since the last sync is acknowledged
            for fd in self._to_sync:
                os.close(fd)
            self._to_sync = []
            return None
        if not force and now - self._last_sync < self.fsync_interval:
            return None
        fds, self._to_sync = self._to_sync, []
        if self._wfd is not None:
            fds.append(os.dup(self._wfd))
        directory, self._dir_dirty = self._dir_dirty, False
        return fds, directory, self._next_seq

    def _run_sync(self, plan: Tuple[List[int], bool, int], now: float) -> None:
        fds, directory, target = plan
        try:
            for fd in fds:
                os.fsync(fd)
            if directory:
                dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        finally:
            for fd in fds:
                os.close(fd)
        with self._lock:
            self._synced_seq = max(self._synced_seq, target)
            self._last_sync = now

    def _sync(self, now: float, force: bool = False) -> None:
        """A sync while holding the lock (close, fsync_interval 0)."""
        plan = self._sync_plan(now, force)
        if plan is None:
            return
        self._lock.release()
        try:
            self._run_sync(plan, now)
        finally:
            self._lock.acquire()

    def _write_cursor(self, force: bool = False) -> None:
        if self._lock_fd is None or (self._ack_seq == self._cursor_written and not force):
            return
        path = os.path.join(self.directory, "cursor")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(f"{self._ack_seq}\n".encode())
            if force:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        self._cursor_written = self._ack_seq
        self._last_cursor = time.monotonic()

    # -- state -------------------------------------------------------------------------------

    def _unacked_bytes(self) -> int:
        return sum(s.size for s in self._segments) - self._ack_off

    @property
    def bytes(self) -> int:
        """Bytes of unacknowledged records (headers included): what ``max_bytes`` bounds."""
        with self._lock:
            return self._unacked_bytes()

    @property
    def messages(self) -> int:
        """Unacknowledged records (in flight included)."""
        with self._lock:
            return sum(s.count for s in self._segments) - self._ack_index

    @property
    def pending(self) -> int:
        """Records not yet handed out by :meth:`read` since the last rewind."""
        with self._lock:
            if self._read_seg is None:
                return 0
            i = self._index(self._read_seg)
            later = sum(s.count for s in self._segments[i + 1 :]) if i is not None else 0
            return (self._read_seg.next - self._read_seq) + later

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq
