"""An RTSP camera that dies and one that freezes, under a running daemon (a real gst-rtsp-server
process, the real ``rtsp`` source, frames forwarded by ``zmq_push`` to a PULL socket here).

Killed and restarted: the source reconnects with doubling backoff, each attempt counted in
edgepipe_source_reconnects_total and logged on one line; meanwhile /healthz names the stalled
source and the systemd watchdog goes quiet; frames resume with increasing ids once the server is
back, and the watchdog pings again. Frozen (SIGSTOP): reads time out instead of hanging, the
worker keeps answering the supervisor (no hang kill), /healthz answers at once and names the
source; the stream comes back after SIGCONT; and a SIGTERM while the server is frozen still stops
the daemon cleanly within 10 s.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from typing import List

import pytest
from helpers.daemon import Daemon
from helpers.rtsp_server import RtspServer
from test_systemd import NotifySocket, Recorder

from .util import FrameSink


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rtsp")
    short = tempfile.mkdtemp(prefix="ep-", dir="/tmp")
    server = RtspServer(fps=15).start()
    sink = FrameSink(f"ipc://{short}/frames", close_on_end=True)
    notify = NotifySocket(str(tmp / "notify"))
    recorder = Recorder(notify)
    config = {
        "name": "rtsp",
        "stages": {
            "cam": {"type": "rtsp", "url": server.url, "open_timeout": 3, "read_timeout": 2,
                    "backoff": 0.5, "max_backoff": 2, "stall_timeout": 3},
            "fwd": {"type": "zmq_push", "inputs": ["cam"], "connect": f"ipc://{short}/frames",
                    "send_timeout": 1, "stall_timeout": 3},
        },
        "runtime": {"dir": os.path.join(short, "run")},
    }
    d = Daemon(config, tmp)
    d.env["NOTIFY_SOCKET"] = str(tmp / "notify")
    d.env["WATCHDOG_USEC"] = "1000000"  # a ping every 0.5 s while healthy
    try:
        with d:
            d.wait_ready(120)
            d.wait_until(lambda: len(sink.since(0)) >= 10, 60, "first frames from the camera")
            yield d, server, sink, recorder
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
        sink.close()
        recorder.close()
        notify.close()
        os.rmdir(os.path.join(short, "run"))
        os.rmdir(short)


def stalled(d: Daemon) -> List[str]:
    code, body = d.healthz()
    return body["stalled"] if code == 503 else []


def pings(recorder: Recorder, start: float, end: float) -> int:
    return len(recorder.between(start, end, "WATCHDOG"))


def test_healthy_stream_flows_and_the_watchdog_pings(setup):
    d, _, sink, recorder = setup
    assert d.healthz()[0] == 200
    assert d.sample("edgepipe_source_reconnects_total", stage="cam") == 0
    t = time.monotonic()
    time.sleep(2.0)
    assert pings(recorder, t, t + 2.0) >= 3


def test_killed_server_reconnect_with_backoff_and_frames_resume(setup):
    d, server, sink, recorder = setup
    start = len(d.lines)
    pid = d.worker_pids()["cam"]
    last_id = sink.since(0)[-1][1]
    assert server.proc is not None
    server.proc.kill()  # SIGKILL: the camera is gone without a goodbye
    server.proc.wait()
    gone = time.time()

    # Reads fail, reconnects are attempted and counted, with doubling backoff up to max_backoff.
    d.wait_for_line(r"Lost 'rtsp://127\.0\.0\.1:\d+/test' \(.*\); reconnecting in 0\.5 s \(attempt 1\)", 30, start)
    d.wait_until(lambda: d.sample("edgepipe_source_reconnects_total", stage="cam") >= 3, 30, "reconnects counted")
    waits = [float(m.group(1)) for m in (re.search(r"reconnecting in ([0-9.]+) s", line) for line in d.lines[start:]) if m]
    assert waits[:3] == [0.5, 1.0, 2.0] and set(waits[3:]) <= {2.0}, waits

    # The stall is visible: /healthz names the source; the watchdog goes quiet; nothing hangs.
    d.wait_until(lambda: "cam" in stalled(d), 30, "/healthz names the stalled camera")
    quiet = time.monotonic() + 1.0  # a ping already on its way may still arrive
    time.sleep(2.5)
    assert pings(recorder, quiet, quiet + 1.5) == 0, "watchdog pinged while the source was stalled"
    assert d.worker_pids()["cam"] == pid and d.sample("edgepipe_worker_up", worker="cam") == 1.0

    server.start()  # same port
    back = time.time()
    d.wait_for_line(r"Reconnected to 'rtsp://127\.0\.0\.1:\d+/test' after \d+ attempt\(s\)", 60, start)
    fresh = d.wait_until(lambda: len(sink.since(back)) >= 10 and sink.since(back), 60, "frames after the restart")
    ids = [f[1] for f in fresh]
    assert ids == sorted(ids) and ids[0] > last_id, "frame ids carry on across the reconnect"
    assert not [f for f in sink.since(gone + 1.0) if f[2] < back], "frames captured while the camera was gone"
    d.wait_until(lambda: d.healthz()[0] == 200, 30, "healthy again")
    t = time.monotonic()
    recorder.wait_for("WATCHDOG", t, 5, d.log)
    assert d.worker_pids()["cam"] == pid  # reconnected inside the worker: no restart
    assert d.sample("edgepipe_worker_restarts_total", worker="cam") == 0


def test_frozen_server_times_out_without_hanging(setup):
    d, server, sink, recorder = setup
    start = len(d.lines)
    pid = d.worker_pids()["cam"]
    before = d.sample("edgepipe_source_reconnects_total", stage="cam")
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        frozen = time.time()
        # read_timeout is 2 s: the read gives up and a reconnect starts, counted.
        d.wait_for_line(r"Lost 'rtsp://.*' \(no new frame within read_timeout=2 s \(stalled\)\); reconnecting", 20, start)
        d.wait_until(lambda: d.sample("edgepipe_source_reconnects_total", stage="cam") > before, 20, "reconnect counted")
        d.wait_until(lambda: "cam" in stalled(d), 30, "/healthz names the frozen camera")
        t0 = time.monotonic()
        code, body = d.healthz()
        assert time.monotonic() - t0 < 10.0 and code == 503 and "cam" in body["stalled"], body
        # The worker keeps sending heartbeats: it is not killed as hung, and it reads nothing.
        assert d.worker_pids()["cam"] == pid
        assert not any("sent no heartbeat" in line for line in d.lines[start:])
        # FFmpeg hands back an old picture when its timeout fires; it must not pass for a capture.
        assert not sink.since(frozen + 1.0), "frames while the server was frozen"
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    thawed = time.time()
    d.wait_until(lambda: len(sink.since(thawed)) >= 5, 60, "frames after SIGCONT")
    d.wait_until(lambda: d.healthz()[0] == 200, 30, "healthy again")


def test_sigterm_while_the_server_is_frozen_stops_cleanly_within_10_s(setup):
    d, server, _, _ = setup
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(1.0)  # the capture thread is now blocked in a read of the frozen stream
        t0 = time.monotonic()
        assert d.stop(timeout=15) == 0, d.log
        assert time.monotonic() - t0 < 10.0
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_camera_unreachable_at_start_says_cannot_connect_and_nothing_else(tmp_path):
    # Cameras that do not work when the daemon starts: one at an address where nothing listens,
    # one on a real RTSP server under a wrong path. Each attempt is one line of ours, "Cannot
    # connect to <url> (retrying in N s, attempt n): <why>", not "Lost" (nothing was ever
    # received), without the password, and without FFmpeg's and OpenCV's own lines ("[tcp @
    # 0x...] Connection to tcp://... failed", "[rtsp @ 0x...] method DESCRIBE failed: 404",
    # "[ WARN:0@...] cap.cpp ...") that used to come with every retry.
    from helpers.net import free_port

    port = free_port()  # nothing listens there
    with RtspServer(fps=15) as server:
        wrong = server.url.replace("rtsp://", "rtsp://admin:s3cret@").rsplit("/", 1)[0] + "/nope"
        urls = {"gone": f"rtsp://admin:s3cret@127.0.0.1:{port}/stream", "wrong": wrong}
        stages = {name: {"type": "rtsp", "url": url, "open_timeout": 2, "read_timeout": 2, "backoff": 0.2,
                         "max_backoff": 0.4} for name, url in urls.items()}
        stages["fwd"] = {"type": "zmq_push", "inputs": list(urls), "send_timeout": 1,
                         "connect": f"tcp://127.0.0.1:{free_port()}"}
        with Daemon({"name": "unreachable", "stages": stages}, tmp_path) as d:
            d.wait_ready(120)
            for name in urls:
                d.wait_for_line(rf"{name}: Cannot connect to .*attempt 5\)", 60)
            assert d.stop() == 0, d.log
    why = {"gone": f"127\\.0\\.0\\.1:{port} refused the connection",
           "wrong": r"the server answers but the stream does not open \(a wrong path, user or password\?\)"}
    for name, url in urls.items():
        shown = repr(url.replace(":s3cret@", ":***@"))
        tries = [line for line in d.lines if f"{name}: " in line and url.split("@")[1] in line]
        assert len(tries) >= 5, d.log
        for n, line in enumerate(tries[:5], 1):
            assert re.search(rf"WARNING\s+{name}: Cannot connect to {re.escape(shown)} \(retrying in [\d.]+ s, "
                             rf"attempt {n}\): {why[name]}$", line), line
        waits = [float(re.search(r"retrying in ([\d.]+) s", line).group(1)) for line in tries[:4]]
        assert waits == [0.2, 0.4, 0.4, 0.4], waits
        # Every line that names the camera is one of those attempts.
        about = [line for line in d.lines if url.split("@")[1] in line]
        assert about == tries, d.log
    assert not [line for line in d.lines if " Lost " in line], d.log
    native = re.compile(r"\[\w+ @ 0x[0-9a-f]+\]|\[ ?(WARN|ERROR|INFO):\d+@|cap\.cpp|cap_ffmpeg|OpenCV\(")
    assert not [line for line in d.lines if native.search(line)], d.log
    assert "s3cret" not in d.log
