"""The broker sinks' on-disk spool (plugins/sinks/_spool.py) on real files: order, acknowledgement
and rewind, the byte cap (oldest dropped and counted), what survives a reopen, what a writer
killed with SIGKILL mid-append leaves (a valid prefix, the torn tail cut), damage found at open,
the directory lock, and memory that stays flat however much the spool holds."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

import pytest
from edgepipe_plugins.sinks._spool import HEADER, Spool, SpoolError


def rec(i: int, size: int = 40) -> bytes:
    body = f"message {i:08d} ".encode()
    return body + b"." * max(0, size - len(body))


def drain(spool: Spool, batch: int = 100) -> List[bytes]:
    """Read and acknowledge everything, returning the payloads in delivery order."""
    out: List[bytes] = []
    while True:
        got = spool.read(batch)
        if not got:
            return out
        for seq, payload in got:
            out.append(payload)
            assert spool.ack(seq)


def opened(path: Path, **kw) -> Spool:
    kw.setdefault("max_bytes", 1 << 20)
    kw.setdefault("segment_bytes", 4096)
    s = Spool(str(path), **kw)
    s.open()
    return s


def test_delivers_in_order_and_acknowledged_records_leave(tmp_path: Path):
    s = opened(tmp_path)
    assert s.append([rec(i) for i in range(500)]) == 0
    assert s.messages == 500 and s.bytes == 500 * (HEADER.size + 40)
    assert drain(s) == [rec(i) for i in range(500)]
    assert s.messages == 0 and s.bytes == 0
    # Finished segments are gone; only the one being written to remains.
    assert len(list(tmp_path.glob("*.seg"))) == 1
    s.close()


def test_rewind_sends_the_unacknowledged_again_in_order(tmp_path: Path):
    s = opened(tmp_path)
    s.append([rec(i) for i in range(10)])
    first = s.read(6)
    for seq, _ in first[:2] + first[3:4]:  # 0, 1 and 3 acknowledged; 2, 4, 5 lost in flight
        s.ack(seq)
    s.rewind()
    assert [p for _, p in s.read(100)] == [rec(i) for i in (2, 3, 4, 5, 6, 7, 8, 9)]
    assert not s.ack(first[0][0]), "an acknowledgement of a settled record counts once"
    s.close()


def test_a_reopened_spool_continues_after_the_last_acknowledged_record(tmp_path: Path):
    s = opened(tmp_path)
    s.append([rec(i) for i in range(300)])
    for seq, _ in s.read(120):
        s.ack(seq)
    s.close()  # writes the cursor
    s = opened(tmp_path)
    assert s.messages == 180
    assert drain(s) == [rec(i) for i in range(120, 300)]
    s.append([rec(300)])
    assert [p for _, p in s.read(5)] == [rec(300)], "sequence numbers go on after a restart"
    s.close()


def test_the_cap_drops_the_oldest_and_counts_them(tmp_path: Path):
    size = HEADER.size + 40
    s = opened(tmp_path, max_bytes=100 * size, segment_bytes=10 * size)
    dropped = 0
    for i in range(0, 1000, 7):
        dropped += s.append([rec(j) for j in range(i, min(i + 7, 1000))])
        assert s.bytes <= 100 * size
    assert dropped == 900 and s.messages == 100
    # Disk use stays within the cap plus one segment.
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) <= 110 * size
    assert drain(s) == [rec(i) for i in range(900, 1000)]
    s.close()


def test_the_cap_also_drops_records_in_flight(tmp_path: Path):
    size = HEADER.size + 40
    s = opened(tmp_path, max_bytes=10 * size)
    s.append([rec(i) for i in range(10)])
    in_flight = s.read(4)
    assert s.append([rec(i) for i in range(10, 13)]) == 3
    assert not s.ack(in_flight[0][0]), "a dropped record cannot be acknowledged"
    s.rewind()
    assert [p for _, p in s.read(100)] == [rec(i) for i in range(3, 13)]
    s.close()


def test_a_record_larger_than_the_cap_is_refused_and_counted(tmp_path: Path):
    s = opened(tmp_path, max_bytes=1000)
    assert s.append([rec(0), b"x" * 2000, rec(1)]) == 1
    assert drain(s) == [rec(0), rec(1)]
    s.close()


WRITER = textwrap.dedent(
    """
    import sys
    from edgepipe_plugins.sinks._spool import Spool
    s = Spool(sys.argv[1], max_bytes=1 << 30, segment_bytes=64 * 1024, fsync_interval=60)
    s.open()
    i = 0
    while True:
        s.append([b"%08d" % n + b"." * 300 for n in range(i, i + 50)])
        i += 50
        if i == 5000:
            print("written", flush=True)
    """
)


def test_a_writer_killed_mid_append_leaves_a_valid_prefix(tmp_path: Path):
    """SIGKILL while appending as fast as it can: the reopened spool holds records 0..n-1 with
    nothing missing, repeated or damaged; a torn last record is cut off, never delivered."""
    torn = 0
    for attempt in range(3):
        d = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
        time.sleep(0.05 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        s = opened(d, max_bytes=1 << 30)
        got = drain(s, 5000)
        assert len(got) >= 5000
        assert got == [b"%08d" % n + b"." * 300 for n in range(len(got))]
        torn += s.corrupt_bytes
        s.close()
    print(f"\ntorn bytes cut off over 3 kills: {torn}")


def test_damage_ends_its_segment_and_the_rest_is_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    s = opened(tmp_path, segment_bytes=1000)
    s.append([rec(i) for i in range(100)])
    s.close()
    segments = sorted(tmp_path.glob("*.seg"))
    assert len(segments) >= 4
    data = bytearray(segments[1].read_bytes())
    data[HEADER.size * 2 + 45] ^= 0xFF  # inside the second record of the second segment
    segments[1].write_bytes(bytes(data))
    with open(segments[-1], "ab") as f:
        f.write(HEADER.pack(400, 0, 100) + b"torn")  # record 100, cut short by a crash
    s = opened(tmp_path, segment_bytes=1000)
    per_segment = 1000 // (HEADER.size + 40)
    assert s.lost_records == per_segment - 1
    assert s.corrupt_bytes > 0
    got = drain(s)
    expected = [rec(i) for i in range(100) if not per_segment + 1 <= i < 2 * per_segment]
    assert got == expected
    assert "checksum" in caplog.text and "cut short" in caplog.text
    s.close()


def test_one_process_at_a_time(tmp_path: Path):
    s = opened(tmp_path)
    script = f"from edgepipe_plugins.sinks._spool import Spool; Spool({str(tmp_path)!r}, 1 << 20).open()"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "SpoolError" in done.stderr and "in use by another process" in done.stderr and str(tmp_path) in done.stderr
    s.close()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_an_unusable_directory_is_one_line(tmp_path: Path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match="spool directory .*file/spool"):
        Spool(str(tmp_path / "file" / "spool"), 1 << 20).open()


def test_acknowledged_segments_leave_once_idle(tmp_path: Path):
    s = opened(tmp_path, idle_roll=0.2)
    s.append([rec(i) for i in range(20)])
    drain(s)
    time.sleep(0.3)
    s.maintain()
    assert list(tmp_path.glob("*.seg")) == []
    s.append([rec(20)])
    assert drain(s) == [rec(20)]
    s.close()
    assert opened(tmp_path).messages == 0


MEMORY = textwrap.dedent(
    """
    import sys
    from edgepipe_plugins.sinks._spool import Spool

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024

    s = Spool(sys.argv[1], max_bytes=48 << 20, segment_bytes=1 << 20, fsync_interval=60)
    s.open()
    payload = b"x" * 300
    s.append([payload] * 1000)
    for _ in range(2):
        for seq, _ in s.read(1000):
            s.ack(seq)
    base = rss()
    for _ in range(300):                       # 300 000 records, 94 MB: twice the cap
        s.append([payload] * 1000)
    full = rss()
    read = 0
    while True:
        got = s.read(500)
        if not got:
            break
        for seq, _ in got:
            s.ack(seq)
        read += len(got)
    print(base, full, rss(), read, s.messages)
    """
)


def test_memory_stays_flat_however_much_the_spool_holds(tmp_path: Path):
    done = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    base, full, drained, read, left = (int(x) for x in done.stdout.split())
    print(f"\nRSS {base / 1e6:.1f} MB empty, {full / 1e6:.1f} MB holding 48 MB, {drained / 1e6:.1f} MB after draining {read} records")
    assert left == 0 and 150_000 <= read <= 160_000  # the cap kept the newest ~48 MB
    assert full - base < 8 << 20 and drained - base < 8 << 20
