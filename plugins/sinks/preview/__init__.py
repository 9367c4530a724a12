"""The `preview` sink: a live web page with the annotated stream, per-stage stats and detections.

An HTTP server on loopback (default http://127.0.0.1:8080/) runs in threads of this sink's worker,
from ``start()`` to ``stop()``. It serves one self-contained page (``page.html``, no CDN), an
MJPEG stream per source (``/stream/<source>``, ``/stream`` for the first source seen), and
``/api/latest``: the newest detection message of every source plus the stats the sink measures
itself (fps, frame age and detections/s per source; per-stage latency from ``frame.timing``),
and with a tracker and a zones stage upstream the zones and lines with their live counts and the
latest events. Pictures show track ids and short trails, zones and lines with their counts
(:mod:`.overlay`).

The pipeline side never waits for the HTTP side: ``process`` only copies the newest frame under a
short lock (the picture only while someone watches that source, or once a second so a new viewer
sees a picture at once) and returns. Pictures are drawn and JPEG-encoded in the HTTP threads, at
most ``max_fps`` times per second per source and only while a client watches; every viewer of a
source shares the same encoded picture.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import quote, unquote, urlsplit

import cv2
import numpy as np
from pydantic import Field

from edgepipe.draw import PALETTE, draw_detections, picture
from edgepipe.messages import Frame, detection_message, replace
from edgepipe.stage import StageConfig, StageContext, StageError

from .._common import DeliveringSink
from .overlay import TRAIL_POINTS, draw_overlay

__all__ = ["PreviewConfig", "PreviewSink"]

PAGE = Path(__file__).with_name("page.html")
BOUNDARY = "edgepipe-frame"
# A picture of an unwatched source is refreshed this often, so a new viewer sees one at once.
IDLE_REFRESH_S = 1.0
RECENT_EVENTS = 12  # events per source shown on the page
TRAIL_FORGET_FRAMES = 30  # a track not seen for this many frames of its source loses its trail
_LOOPBACK = ("127.", "::1", "localhost")


class PreviewConfig(StageConfig):
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the page listens on. Loopback by default: the page has no "
        "authentication, so exposing it (e.g. 0.0.0.0) must be asked for here explicitly.",
    )
    port: int = Field(
        8080, ge=0, le=65535, description="TCP port of the page; 0 picks a free port (logged)."
    )
    max_fps: float = Field(
        10.0,
        gt=0,
        le=60,
        description="Most pictures per second per source that are drawn, JPEG-encoded and "
        "streamed (only while someone watches).",
    )
    jpeg_quality: int = Field(80, ge=10, le=100, description="JPEG quality of streamed pictures.")
    max_width: int = Field(
        1280,
        ge=0,
        description="Streamed pictures wider than this are scaled down to it (0: never), which "
        "keeps encoding and bandwidth bounded for big cameras.",
    )
    stats_window: float = Field(
        5.0,
        gt=0,
        le=300,
        description="Seconds over which fps, detections/s and stage latencies are averaged.",
    )


def _rate(amount: float, t0: float, now: float) -> float:
    """``amount`` per second since ``t0``. Callers leave out what came with the frame at ``t0``
    (it starts the clock), and the rate falls towards 0 while no new frame comes."""
    return round(amount / (now - t0), 2) if now > t0 else 0.0


class _SourceState:
    """What the HTTP side knows about one source. Guarded by the hub's condition lock, except the
    JPEG cache, which ``encode_lock`` serialises."""

    def __init__(self, name: str, window: float):
        self.name = name
        self.latest: Optional[Frame] = None  # newest frame, without pictures
        self.frames = 0
        self.picture: Optional[Frame] = None  # newest frame whose picture was copied
        self.picture_seq = 0
        self.picture_at = -1e9  # monotonic time of the last picture copy
        self.watchers = 0
        self.encode_lock = threading.Lock()
        self.jpeg: Optional[bytes] = None
        self.jpeg_seq = 0
        self.jpeg_at = -1e9
        # (monotonic arrival, number of detections, frame age in seconds, stage timings)
        self.recent: Deque[Tuple[float, int, float, Dict[str, float]]] = collections.deque()
        self.window = window
        self.events: Deque[Dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self.trails: Dict[int, Deque[List[float]]] = {}  # track id -> recent box centres
        self.trail_seen: Dict[int, int] = {}  # track id -> self.frames when last seen

    def prune(self, now: float) -> None:
        while self.recent and now - self.recent[0][0] > self.window:
            self.recent.popleft()


class _Hub:
    """Hands the newest frame of each source from the pipeline thread to the HTTP threads."""

    def __init__(self, config: PreviewConfig):
        self.config = config
        self.cond = threading.Condition()
        self.sources: Dict[str, _SourceState] = {}
        self.closing = threading.Event()
        self.encoded = 0  # JPEG encodes since start (all sources)

    # -- pipeline side -------------------------------------------------------------------------

    def put(self, frame: Frame, now: float, wall: float) -> None:
        dets = frame.detections
        dets = np.zeros((0, 6), np.float32) if dets is None else np.array(dets, np.float32)
        with self.cond:
            st = self.sources.get(frame.source)
            if st is None:
                st = self.sources[frame.source] = _SourceState(frame.source, self.config.stats_window)
            st.frames += 1
            st.latest = replace(
                frame, image=None, original=None, candidates=None, detections=dets,
                timing=dict(frame.timing), meta=dict(frame.meta), events=list(frame.events),
                track_ids=None if frame.track_ids is None else list(frame.track_ids),
            )
            st.events.extend(frame.events)
            self._trails(st, dets, frame.track_ids)
            st.recent.append((now, len(dets), wall - frame.timestamp, st.latest.timing))
            st.prune(now)
            if st.watchers or now - st.picture_at >= IDLE_REFRESH_S:
                has_picture = frame.original is not None or frame.image is not None
                st.picture = replace(
                    st.latest,
                    meta=dict(st.latest.meta, _trails={t: list(p) for t, p in st.trails.items()}),
                    original=None if frame.original is None else np.array(frame.original),
                    image=None if frame.original is not None or frame.image is None
                    else np.array(frame.image),
                ) if has_picture else None
                st.picture_seq += 1
                st.picture_at = now
                self.cond.notify_all()

    @staticmethod
    def _trails(st: _SourceState, dets: np.ndarray, track_ids: Optional[List[Optional[int]]]) -> None:
        if track_ids is None:
            return
        for det, tid in zip(dets.tolist(), track_ids):
            if tid is None:
                continue
            trail = st.trails.get(tid)
            if trail is None:
                trail = st.trails[tid] = collections.deque(maxlen=TRAIL_POINTS)
            trail.append([round((det[0] + det[2]) / 2, 1), round((det[1] + det[3]) / 2, 1)])
            st.trail_seen[tid] = st.frames
        for tid in [t for t, n in st.trail_seen.items() if st.frames - n > TRAIL_FORGET_FRAMES]:
            del st.trails[tid], st.trail_seen[tid]

    # -- HTTP side -----------------------------------------------------------------------------

    def first_source(self, timeout: float) -> Optional[str]:
        with self.cond:
            self.cond.wait_for(lambda: self.sources or self.closing.is_set(), timeout)
            return next(iter(self.sources), None)

    @contextlib.contextmanager
    def watching(self, source: str) -> Iterator[_SourceState]:
        with self.cond:
            st = self.sources[source]
            st.watchers += 1
        try:
            yield st
        finally:
            with self.cond:
                st.watchers -= 1

    def next_jpeg(self, st: _SourceState, after: int, timeout: float) -> Optional[Tuple[bytes, int]]:
        """The JPEG of a picture newer than sequence ``after``, or None after ``timeout`` s or on
        close. Encodes at most ``max_fps`` times per second per source, shared by all viewers."""
        with self.cond:
            if not self.cond.wait_for(
                lambda: st.picture_seq > after or self.closing.is_set(), timeout
            ) or self.closing.is_set():
                return None
        with st.encode_lock:
            if st.jpeg is not None and st.jpeg_seq > after:
                return st.jpeg, st.jpeg_seq  # another viewer encoded it meanwhile
            wait = st.jpeg_at + 1.0 / self.config.max_fps - time.monotonic()
            if wait > 0 and self.closing.wait(wait):
                return None
            with self.cond:
                picture, seq = st.picture, st.picture_seq  # newest again: the wait may have brought one
            jpeg = self._encode(picture)
            st.jpeg_at = time.monotonic()
            if jpeg is None:
                st.jpeg, st.jpeg_seq = None, seq  # a source without pictures: nothing to stream
                return None
            st.jpeg, st.jpeg_seq = jpeg, seq
            self.encoded += 1
            return jpeg, seq

    def _encode(self, frame: Optional[Frame]) -> Optional[bytes]:
        found = picture(frame) if frame is not None else None
        if found is None or frame is None:
            return None
        image, dets = found
        draw_detections(image, dets, frame.names)
        draw_overlay(image, frame, frame.meta.get("_trails"))
        h, w = image.shape[:2]
        if self.config.max_width and w > self.config.max_width:
            size = (self.config.max_width, max(1, round(h * self.config.max_width / w)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        # 4:4:4 keeps the thin coloured box lines coloured; 4:2:0 would smear them into the gray.
        params = [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality,
                  cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        ok, buf = cv2.imencode(".jpg", image, params)
        return buf.tobytes() if ok else None

    def latest(self, stage: str) -> Dict[str, Any]:
        """The ``/api/latest`` document: every source's newest detection message and stats."""
        now, wall = time.monotonic(), time.time()
        sources: List[Dict[str, Any]] = []
        timings: Dict[str, List[float]] = {}
        since: Dict[str, float] = {}  # stage -> arrival of the oldest frame in the window
        with self.cond:
            for st in self.sources.values():
                st.prune(now)
                n = len(st.recent)
                for arrived, _, _, timing in st.recent:
                    for name, seconds in timing.items():
                        timings.setdefault(name, []).append(seconds)
                        since[name] = min(since.get(name, arrived), arrived)
                t0 = st.recent[0][0] if n else now
                latest = st.latest
                sources.append(
                    {
                        "source": st.name,
                        "stream": "/stream/" + quote(st.name, safe=""),
                        "has_picture": st.picture is not None,
                        "frames": st.frames,
                        "fps": _rate(max(n - 1, 0), t0, now),
                        "detections_per_s": _rate(sum(r[1] for r in list(st.recent)[1:]), t0, now),
                        "age_ms": round(1000 * sum(r[2] for r in st.recent) / n, 1) if n else None,
                        "watchers": st.watchers,
                        "message": detection_message(latest, wall) if latest is not None else None,
                        "zones": (latest.meta.get("zones") if latest is not None else None) or None,
                        "events": list(st.events),
                    }
                )
        stages = [
            {
                "stage": name,
                "fps": _rate(len(values) - 1, since[name], now),
                "mean_ms": round(1000 * float(np.mean(values)), 2),
                "p95_ms": round(1000 * float(np.percentile(values, 95)), 2),
            }
            for name, values in timings.items()
        ]
        return {
            "stage": stage,
            "time": wall,
            "max_fps": self.config.max_fps,
            "stats_window": self.config.stats_window,
            "palette": [f"#{r:02x}{g:02x}{b:02x}" for b, g, r in PALETTE],
            "sources": sources,
            "stages": stages,
        }


class _Server(ThreadingHTTPServer):
    # Request threads are joined by server_close(); stop() first closes their sockets so none
    # of them can hang on a slow client.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], sink: PreviewSink):
        self.sink = sink
        self.connections: Set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    def close_connections(self) -> None:
        with self.connections_lock:
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10.0  # a client that stops reading is dropped after this many seconds
    server_version = "edgepipe-preview"

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base class signature)
        self.server.sink.log.debug("Preview request: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 (base class naming)
        path = urlsplit(self.path).path
        sink = self.server.sink
        try:
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", sink.page)
            elif path == "/api/latest":
                body = json.dumps(sink.hub.latest(sink.name), allow_nan=False).encode()
                self._send(200, "application/json", body)
            elif path == "/stream" or path.startswith("/stream/"):
                self._stream(unquote(path[len("/stream/"):]) if path != "/stream" else None)
            else:
                self._send(404, "text/plain; charset=utf-8", f"no page {path!r}\n".encode())
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            self.close_connection = True  # the viewer went away or stop() closed the socket

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, source: Optional[str]) -> None:
        hub = self.server.sink.hub
        if source is None:
            source = hub.first_source(timeout=30.0)
        with hub.cond:
            known = list(hub.sources)
        if source is None or source not in known:
            msg = f"no source {source!r}; sources seen so far: {known}\n"
            self._send(404, "text/plain; charset=utf-8", msg.encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        seq = 0
        with hub.watching(source) as st:
            while not hub.closing.is_set():
                got = hub.next_jpeg(st, seq, timeout=1.0)
                if got is None:
                    continue
                jpeg, seq = got
                head = (
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {len(jpeg)}\r\n\r\n"
                ).encode()
                self.wfile.write(head + jpeg + b"\r\n")
                self.wfile.flush()


def _preview_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "api/latest", timeout=2.0) as resp:
            return str(resp.headers.get("Server", "")).startswith(_Handler.server_version)
    except (OSError, ValueError):
        return False


class PreviewSink(DeliveringSink):
    """Live web page on loopback: annotated MJPEG stream, per-stage stats, latest detections."""

    Config = PreviewConfig
    needs_original = True
    config: PreviewConfig

    def __init__(self, config: PreviewConfig, context: StageContext):
        super().__init__(config, context)
        self.hub = _Hub(config)
        self.page = b""
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """The page's address (the real port once started, also when ``port`` is 0)."""
        host, port = self.config.host, self.config.port
        if self._server is not None:
            port = self._server.server_address[1]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def addresses(self) -> Dict[str, str]:
        return {"live preview": self.url}

    def _listen(self) -> _Server:
        try:
            return _Server((self.config.host, self.config.port), self)
        except OSError as exc:
            raise StageError(
                f"preview: cannot listen on {self.config.host}:{self.config.port}: "
                f"{exc.strerror or exc}"
            ) from None

    def check(self) -> None:
        if not PAGE.is_file():
            raise StageError(f"preview: page file {str(PAGE)!r} is missing from the installation")
        if not self.config.port:
            return
        # A taken port stops `edgepipe run` before any worker starts, unless a preview page holds
        # it: then this is a reload check while our own worker still serves.
        try:
            self._listen().server_close()
        except StageError:
            if not _preview_answers(self.url):
                raise

    def start(self) -> None:
        self.page = PAGE.read_bytes()
        self._server = self._listen()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
            name=f"preview-{self.name}", daemon=True,
        )
        self._thread.start()
        if not self.config.host.startswith(_LOOPBACK):
            self.log.warning(
                "Preview page listens on %r, beyond loopback, without authentication", self.config.host
            )
        self.log.info("Preview page at %s", self.url)

    def process(self, frames: List[Frame]) -> None:
        now, wall = time.monotonic(), time.time()
        for frame in frames:
            self.hub.put(frame, now, wall)
            # "Published" here means: handed to the page (what a viewer would see next).
            self.delivered(frame, wall)

    def stop(self) -> None:
        self.hub.closing.set()
        with self.hub.cond:
            self.hub.cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()  # joins the request threads
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
