"""A real headless Chromium for page tests, driven over plain W3C WebDriver HTTP calls.

Debian's ``chromium`` and ``chromium-driver`` packages provide the browser and the driver; this
module starts ``/usr/bin/chromedriver`` on a free loopback port, opens one session with a fresh
profile and flags that keep the browser off the network (no updates, no sync, no QUIC), and offers
the few commands page tests need: open a URL, run a script, take a screenshot as a BGR array.
Nothing is downloaded; a missing browser or driver is an error (tests fail, never skip).

    with Browser() as b:
        b.open("http://127.0.0.1:8080/")
        shot = b.screenshot()        # (H, W, 3) uint8 BGR

    with serve_directory(folder) as base, Browser() as b:
        state = b.play_video(base + "demo.webm")   # does a <video> element play it?
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import cv2
import numpy as np

from .net import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]


class BrowserError(RuntimeError):
    """The browser or driver is missing, failed to start, or a WebDriver command failed."""


class Browser:
    """One headless Chromium session; use as a context manager so everything is ended."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 30.0):
        for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
            if not os.access(path, os.X_OK):
                raise BrowserError(f"{path} not found: install the Debian package {pkg!r}")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="edgepipe-chromium-")
        self.port = free_port()
        self.log = open(os.path.join(self.profile, "chromedriver.log"), "wb")  # noqa: SIM115
        self.driver: Optional[subprocess.Popen] = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.session: Optional[str] = None
        try:
            self._wait_ready()
            args = FLAGS + [f"--window-size={width},{height}", f"--user-data-dir={self.profile}/data"]
            caps = {
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                    }
                }
            }
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    # -- WebDriver plumbing --------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout + 30) as resp:
                reply = json.load(resp)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise BrowserError(f"WebDriver {method} {path} failed: HTTP {exc.code}: {detail}") from None
        return reply.get("value")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            assert self.driver is not None
            if self.driver.poll() is not None:
                raise BrowserError(f"chromedriver exited with {self.driver.returncode}")
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except (OSError, BrowserError):
                pass
            time.sleep(0.1)
        raise BrowserError(f"chromedriver not ready within {self.timeout} s")

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    # -- what tests use ------------------------------------------------------------------------

    def open(self, url: str) -> None:
        self._call("POST", self._s("/timeouts"), {"pageLoad": int(self.timeout * 1000), "script": int(self.timeout * 1000)})
        self._call("POST", self._s("/url"), {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments[i]`` are ``args``) and return its value."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: Optional[float] = None, what: str = "") -> Any:
        """Poll ``script`` until it returns something truthy; BrowserError naming ``what`` if not."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.run(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {what or script!r}")
            time.sleep(0.1)

    def screenshot(self) -> np.ndarray:
        """The viewport as an (H, W, 3) uint8 BGR array (device pixels; scale factor is 1)."""
        png = base64.b64decode(self._call("GET", self._s("/screenshot")))
        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise BrowserError("screenshot is not a PNG")
        return image

    def play_video(self, url: str, play_for: float = 1.0, timeout: float = 30.0) -> Dict[str, Any]:
        """Load ``url`` into a muted ``<video>`` element on a page of the same origin, play it,
        and report once ``play_for`` seconds have played (or it ended, failed or ``timeout``
        passed): ``error`` (a MediaError code, None when there is none) and ``message``,
        ``duration`` (a number, or "Infinity"/"NaN" as text), ``currentTime``, ``videoWidth``,
        ``videoHeight``, ``readyState``, ``ended``, and ``played`` (seconds actually rendered)."""
        origin = "/".join(url.split("/", 3)[:3]) + "/"
        self.open(origin)
        self.run(
            "const v = document.createElement('video');"
            "v.muted = true; v.preload = 'auto'; v.src = arguments[0];"
            "document.body.appendChild(v); window.__video = v;"
            "v.play().catch(e => { window.__playError = String(e); });",
            url,
        )
        probe = (
            "const v = window.__video; let played = 0;"
            "for (let i = 0; i < v.played.length; i++) played += v.played.end(i) - v.played.start(i);"
            "return {error: v.error ? v.error.code : null, message: v.error ? v.error.message :"
            " (window.__playError || ''), duration: isFinite(v.duration) ? v.duration : String(v.duration),"
            " currentTime: v.currentTime, videoWidth: v.videoWidth, videoHeight: v.videoHeight,"
            " readyState: v.readyState, ended: v.ended, played: played};"
        )
        deadline = time.monotonic() + timeout
        while True:
            state: Dict[str, Any] = self.run(probe)
            if state["error"] is not None or state["ended"] or state["currentTime"] >= play_for:
                return state
            if time.monotonic() > deadline:
                return state
            time.sleep(0.1)

    def close(self) -> None:
        if self.session is not None:
            try:
                self._call("DELETE", self._s(""))
            except (OSError, BrowserError):
                pass
            self.session = None
        if self.driver is not None:
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()
            self.driver = None
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def serve_directory(folder: Union[str, Path]) -> Iterator[str]:
    """Serve ``folder``'s files over HTTP on 127.0.0.1 (a free port) while the block runs; yields
    the base URL ending in "/". The standard library's handler, quiet."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="serve_directory", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
