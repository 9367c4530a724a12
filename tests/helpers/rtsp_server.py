"""A real RTSP server for the tests: GStreamer's gst-rtsp-server serving a live H.264 test stream.

Run as its own process with Debian's Python, which has python3-gi and the GstRtspServer
typelib (the project's venv cannot import ``gi``)::

    /usr/bin/python3 tests/helpers/rtsp_server.py --port 8554 [--path /test]

It prints ``READY <port>`` on stdout once it accepts connections and serves
``rtsp://127.0.0.1:<port>/<path>`` (a moving ball, 160x120 at 15 fps, x264 zerolatency) until
SIGTERM or SIGINT. ``--port 0`` picks a free port. The test side is :class:`RtspServer`, which
starts, stops and restarts this process (on the same port, for reconnect tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Optional

SYSTEM_PYTHON = "/usr/bin/python3"
LAUNCH = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width={w},height={h},framerate={fps}/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} bitrate=300 "
    "! rtph264pay name=pay0 pt=96 config-interval=1 )"
)


def serve(port: int, path: str, width: int, height: int, fps: int) -> None:
    import signal

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(LAUNCH.format(w=width, h=height, fps=fps))
    factory.set_shared(True)
    server.get_mount_points().add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"ERROR cannot listen on 127.0.0.1:{port}", flush=True)
        sys.exit(1)
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()


class RtspServer:
    """Test-side handle: ``start()`` runs the server process and waits for READY; ``url``."""

    def __init__(self, path: str = "/test", width: int = 160, height: int = 120, fps: int = 15):
        self.path, self.width, self.height, self.fps = path, width, height, fps
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    def start(self, timeout: float = 20.0) -> RtspServer:
        if not os.path.exists(SYSTEM_PYTHON):
            raise RuntimeError(f"{SYSTEM_PYTHON} not found; the RTSP server needs Debian's python3-gi")
        cmd = [
            SYSTEM_PYTHON, __file__, "--port", str(self.port), "--path", self.path,
            "--size", f"{self.width}x{self.height}", "--fps", str(self.fps),
        ]
        deadline = time.monotonic() + timeout
        while True:  # a just-released port may linger briefly after a stop
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().strip()
            if line.startswith("READY "):
                self.port = int(line.split()[1])
                return self
            self.proc.wait(timeout=10)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            if time.monotonic() > deadline:
                raise RuntimeError(f"RTSP server did not start: {line or err.strip()[-300:]!r}")
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--path", default="/test")
    parser.add_argument("--size", default="160x120")
    parser.add_argument("--fps", type=int, default=15)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    serve(args.port, args.path, w, h, args.fps)
