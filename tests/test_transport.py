"""Links on real ZeroMQ sockets (ipc:// in a temp dir and inproc://): policies, end markers,
malformed input, bounded queues, the runtime directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import List

import numpy as np
import pytest
import zmq

from edgepipe.messages import EndMarker, Frame, encode
from edgepipe.metrics import StageMetrics
from edgepipe.runtime import RuntimeDirError, open_runtime_dir
from edgepipe.transport import HWM, Input, Output, inproc_endpoint


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)  # closes what a failed test left open


@pytest.fixture
def ipc_dir():
    d = tempfile.mkdtemp(prefix="ep-t-", dir="/tmp")
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


def frame(source: str, i: int, size: int = 16) -> Frame:
    return Frame(source=source, frame_id=i, timestamp=time.time(), image=np.full((size, size), i % 256, np.uint8))


def never() -> bool:
    return False


def drain(inp: Input, want: int, timeout: float = 5.0, limit: int = 100) -> List:
    got: List = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        inp.pollable.poll(50)
        got.extend(inp.recv(limit))
    return got


def test_block_link_is_lossless_and_applies_backpressure(ctx, ipc_dir):
    ep = f"ipc://{ipc_dir}/c.in"
    m = StageMetrics("c", "processor")
    inp = Input(ctx, ep, "block", m)
    out = Output(ctx, ep, "block", "c")
    n = 60
    sent_at: List[float] = []

    def produce():
        # 64 kB frames: the kernel's socket buffers (bytes, not messages) hold only a few.
        for i in range(n):
            out.send_frame(encode(frame("cam", i, size=256)), lambda: None, never)
            sent_at.append(time.monotonic())
        out.send_eos("cam", lambda: None, never)

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.5)  # the consumer is not reading yet: the producer must be stuck
    stuck_at = len(sent_at)
    assert stuck_at < n, "a bounded link accepted every frame without a reader"
    got = []
    while not (got and isinstance(got[-1], EndMarker)):
        inp.pollable.poll(100)
        got.extend(inp.recv(1))
    t.join(5)
    assert [f.frame_id for f in got[:-1]] == list(range(n))
    assert got[-1] == EndMarker("cam")
    assert m.received.value == n and m.dropped.labels("skipped").value == 0
    np.testing.assert_array_equal(got[7].image, np.full((256, 256), 7, np.uint8))
    assert not got[7].image.flags.writeable  # a view of the ZeroMQ buffer, not a copy
    out.close(0)
    inp.close()


def test_block_send_keeps_serving_and_gives_up_on_abort(ctx):
    ep = inproc_endpoint("nobody")
    out = Output(ctx, ep, "block", "nobody", hwm=1)
    idle_calls = []
    aborted = threading.Event()
    results = []

    def produce():
        for i in range(5):
            results.append(out.send_frame(encode(frame("cam", i)), lambda: idle_calls.append(1), aborted.is_set))

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.5)
    assert idle_calls  # the worker would be answering its supervisor meanwhile
    aborted.set()
    t.join(5)
    assert not t.is_alive() and results[-1] is False
    out.close(0)


def test_latest_keeps_newest_per_source_and_counts_skipped(ctx, ipc_dir):
    ep = f"ipc://{ipc_dir}/det.in"
    m = StageMetrics("det", "processor")
    inp = Input(ctx, ep, "latest", m)
    outs = {s: Output(ctx, ep, "latest", "det") for s in ("a", "b")}
    for i in range(10):  # two 200 fps sources while the stage is busy (not calling recv)
        for s, o in outs.items():
            assert o.send_frame(encode(frame(s, i)), lambda: None, never)
        time.sleep(0.005)
    time.sleep(0.3)
    items = inp.recv(0)
    assert sorted((f.source, f.frame_id) for f in items) == [("a", 9), ("b", 9)]
    assert m.received.value == 20
    assert m.dropped.labels("skipped").value == 18
    # End markers are never replaced and come after the frames.
    outs["a"].send_frame(encode(frame("a", 10)), lambda: None, never)
    outs["a"].send_eos("a", lambda: None, never)
    got = drain(inp, 2)
    assert [type(x).__name__ for x in got] == ["Frame", "EndMarker"] and got[0].frame_id == 10
    for o in outs.values():
        o.close(0)
    inp.close()


def test_latest_producer_drops_when_the_link_is_full(ctx):
    # Nobody binds this endpoint: the pipe fills to the high-water mark, then frames are dropped
    # at the producer (counted), and the producer never waits.
    out = Output(ctx, inproc_endpoint("gone"), "latest", "gone")
    m = StageMetrics("cam", "source")
    t0 = time.monotonic()
    ok = [out.send_frame(encode(frame("cam", i)), lambda: None, never, m) for i in range(20)]
    assert time.monotonic() - t0 < 10.0  # a producer that waited would never return here
    assert sum(ok) == HWM["latest"]
    assert m.dropped.labels("queue_full").value == 20 - HWM["latest"]
    out.close(0)


@pytest.mark.parametrize("policy", ["block", "latest"])
def test_malformed_messages_are_counted_and_dropped(ctx, ipc_dir, policy):
    ep = f"ipc://{ipc_dir}/x.in"
    m = StageMetrics("x", "processor")
    inp = Input(ctx, ep, policy, m)
    push = ctx.socket(zmq.PUSH)
    push.connect(ep)
    good = encode(frame("cam", 3))
    header = bytes(good[0])
    for junk in ([b"\xc1"], [header], [header, b"short"], [b"\x92\x01\x02"], good):
        push.send_multipart(junk)
    got = drain(inp, 1)
    time.sleep(0.2)
    got += inp.recv(100)
    assert [f.frame_id for f in got] == [3]
    assert m.errors.labels("decode").value == 4
    assert m.dropped.labels("error").value == 4
    push.close(0)
    inp.close()


def test_oversized_message_is_refused_by_the_receiver(ctx, ipc_dir, monkeypatch):
    import edgepipe.transport as transport

    monkeypatch.setattr(transport, "MAX_MESSAGE_BYTES", 10_000)
    ep = f"ipc://{ipc_dir}/big.in"
    inp = Input(ctx, ep, "block")
    push = ctx.socket(zmq.PUSH)
    push.connect(ep)
    push.send_multipart(encode(frame("cam", 0, size=200)))  # 40 kB payload
    time.sleep(0.3)
    assert inp.recv(10) == []
    push.close(0)
    inp.close()


def test_inproc_and_ipc_into_one_input(ctx, ipc_dir):
    """A consumer with producers in its own worker and in another process binds both."""
    ipc = f"ipc://{ipc_dir}/mix.in"
    inp = Input(ctx, [ipc, inproc_endpoint("mix")], "block")
    local = Output(ctx, inproc_endpoint("mix"), "block", "mix")
    remote = Output(ctx, ipc, "block", "mix")
    local.send_frame(encode(frame("a", 0)), lambda: None, never)
    remote.send_frame(encode(frame("b", 0)), lambda: None, never)
    got = drain(inp, 2)
    assert sorted(f.source for f in got) == ["a", "b"]
    local.close(0)
    remote.close(0)
    inp.close()


def test_unknown_policy_is_refused(ctx):
    with pytest.raises(ValueError, match="link policy 'fifo' is not one of block, latest"):
        Input(ctx, inproc_endpoint("p"), "fifo")


# -- the runtime directory ------------------------------------------------------------------------


def test_private_runtime_dir_is_0700_and_removed_on_close(tmp_path):
    rd = open_runtime_dir(None, "unit", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert rd.path == str(tmp_path / f"edgepipe-unit-{os.getpid()}")
    assert stat.S_IMODE(os.stat(rd.path).st_mode) == 0o700
    assert rd.control_endpoint == f"ipc://{rd.path}/control"
    assert rd.input_endpoint("det") == f"ipc://{rd.path}/det.in"
    rd.close()
    assert not os.path.exists(rd.path)


def test_stale_runtime_dir_of_a_dead_daemon_is_cleaned(tmp_path):
    # A daemon killed with -9 leaves its directory; nobody holds its lock any more.
    code = (
        "import os; from edgepipe.runtime import open_runtime_dir; "
        f"rd = open_runtime_dir(None, 'unit', env={{'XDG_RUNTIME_DIR': {str(tmp_path)!r}}}); "
        "open(os.path.join(rd.path, 'det.in'), 'w').close(); print(rd.path, flush=True); os._exit(0)"
    )
    stale = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.isdir(stale)
    rd = open_runtime_dir(None, "unit", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert not os.path.exists(stale)
    rd.close()


def test_configured_runtime_dir_is_locked_and_stale_sockets_removed(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "old.in").write_text("")  # left by a killed daemon
    (d / "keep.txt").write_text("x")
    rd = open_runtime_dir(str(d), "unit", env={})
    assert not (d / "old.in").exists() and (d / "keep.txt").exists()
    with pytest.raises(RuntimeDirError, match=rf"runtime dir '{d}' is in use by another edgepipe \(pid {os.getpid()}\)"):
        open_runtime_dir(str(d), "other", env={})
    rd.close()
    assert d.is_dir() and (d / "keep.txt").exists() and not (d / "edgepipe.lock").exists()
    # systemd's RuntimeDirectory= is used when no dir is configured.
    rd = open_runtime_dir(None, "unit", env={"RUNTIME_DIRECTORY": str(d)})
    assert rd.path == str(d)
    rd.close()


def test_too_long_ipc_path_is_a_clear_error(tmp_path):
    d = tmp_path / ("x" * 90)
    rd = open_runtime_dir(str(d), "unit", env={})
    with pytest.raises(RuntimeDirError, match="too long for ipc sockets .* set runtime.dir to a shorter path"):
        rd.check_lengths(["detector"])
    rd.close()
