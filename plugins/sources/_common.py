"""Pieces the first-party sources share: frame numbering, pacing, and a capture thread.

Every source numbers its frames 0, 1, 2, ... per source (from its ``resume`` id after a restart)
and stamps them with the capture time; :class:`NumberedSource` does that in one place. :class:`Pacer` spaces frames at a fixed rate
without drift (real-time files, synthetic scenes, image folders). :class:`CaptureThread` runs an
OpenCV capture (V4L2 camera, RTSP stream) in a background thread that keeps only the newest frame,
so a slow pipeline never reads stale frames out of the driver's buffer, and reopens the capture
with exponential backoff when it fails.

A capture that keeps failing must not flood the journal: FFmpeg prints its own line for every
failed connection ("[tcp @ 0x...] Connection to tcp://... failed") and OpenCV a warning for every
failed open ("[ WARN:0@...] cap.cpp ... can't be used to capture by name"), next to the one line
per attempt the capture thread logs itself. :func:`quiet_native_logs` turns both off in the
source's worker before the first capture opens (measured: three lines per retry became one).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Optional, Tuple

import numpy as np

from edgepipe.messages import Frame
from edgepipe.stage import Source, StageConfig, StageContext, StageError

# How long read() may block waiting for a frame, so the worker can serve control messages.
READ_WAIT_S = 0.1


def quiet_native_logs() -> None:
    """Silence FFmpeg's and OpenCV's own stderr lines in this process, unless the user asked
    for them (OPENCV_FFMPEG_LOGLEVEL, OPENCV_LOG_LEVEL set in the environment).

    OpenCV reads OPENCV_FFMPEG_LOGLEVEL when its FFmpeg backend is first used and hands it to
    FFmpeg's ``av_log_set_level`` (-8 is AV_LOG_QUIET; OpenCV's default shows errors, such as a
    refused connection); so this must run before the first capture of the process. OpenCV's own
    log level can change any time; ERROR keeps real errors and drops the warnings that repeat a
    failed open.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if "OPENCV_LOG_LEVEL" not in os.environ:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class NumberedSource(Source):
    """A source that hands out frame ids in the order read() returns frames: 0, 1, 2, ..., or
    after a restart :attr:`resume`, resume + 1, ...

    Every first-party source keeps ``edgepipe_source_reconnects_total`` (``self.reconnects``),
    at 0 for those that never reconnect, so dashboards see one series per source."""

    def __init__(self, config: StageConfig, context: StageContext):
        super().__init__(config, context)
        self._next_id = self.resume
        self.reconnects = self.metrics.counter(
            "edgepipe_source_reconnects_total", "Times a source reconnected to its device or stream."
        )

    def _emit(self, image: np.ndarray, timestamp: float, **meta: Any) -> Frame:
        frame = Frame(
            source=self.name, frame_id=self._next_id, timestamp=timestamp, image=image, meta=meta
        )
        self._next_id += 1
        return frame


class CaptureSource(NumberedSource):
    """A source read by a :class:`CaptureThread` (``self._capture``, made in ``start()``, with
    ``self.reconnects.inc`` and ``self.capture_health`` as its callbacks)."""

    _capture: Optional[CaptureThread] = None
    _stop_timeout = 5.0  # seconds stop() waits for the thread (a read blocked in the driver)

    def capture_health(self, problem: Optional[str]) -> None:
        """The capture thread's ``on_health``: lost (the reason) or back (None)."""
        # The capture thread logs "Cannot connect", "Lost" and "Reconnected" itself.
        if problem is None:
            self.report_healthy(log=False)
        else:
            self.report_unhealthy(problem, log=False)

    def read(self) -> Optional[Frame]:
        assert self._capture is not None, "read() before start()"
        got = self._capture.latest()
        if got is None:
            return None
        image, timestamp = got
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return self._emit(image, timestamp)

    def stop(self) -> None:
        if self._capture is not None:
            self._capture.stop(timeout=self._stop_timeout)
            self._capture = None


class Pacer:
    """Releases ticks at ``fps`` on a fixed schedule (no drift when a tick is served late).

    ``ready()`` returns True when the next tick is due and then schedules the one after it; when
    the tick is not due yet it sleeps at most ``READ_WAIT_S`` and returns False, also when the
    tick came due during that sleep: the next call returns True at once, so the ``read()`` that
    produces a frame does not include the wait (the status and the processing-time metrics show
    the source's own work, not its pacing). A consumer that falls more than one period behind
    skips ahead instead of bursting to catch up.
    """

    def __init__(self, fps: Optional[float]):
        self.period = 1.0 / fps if fps else 0.0
        self._due: Optional[float] = None

    def ready(self) -> bool:
        if not self.period:
            return True
        now = time.monotonic()
        if self._due is None:
            self._due = now
        wait = self._due - now
        if wait > 0:
            time.sleep(min(wait, READ_WAIT_S))
            return False
        self._due = max(self._due + self.period, now - self.period)
        return True


class CaptureThread:
    """Reads an OpenCV capture in a thread; keeps the newest frame; reopens with backoff.

    ``open_capture()`` returns an opened ``cv2.VideoCapture`` or raises :class:`StageError`.
    After a failed open or read the thread waits ``backoff`` seconds (1 s, doubling up to
    ``max_backoff``) before it tries again, counts every attempt in ``on_reconnect`` and logs one
    line per attempt: "Cannot <opening> ..." until the capture has opened once (a camera that
    is not there at start was never lost), "Lost ..." after that; ``on_health`` hears the reason
    when the capture is lost or cannot be opened and None when it is back (the source reports it
    with :meth:`edgepipe.stage.Stage.report_unhealthy`). After ``max_reconnects``
    consecutive failed attempts it gives up and
    :meth:`latest` raises the reason. A successful read resets the backoff. A read that took
    ``read_timeout`` seconds or more counts as failed even when it returned a frame: FFmpeg hands
    back an old picture when its timeout interrupts a stalled stream, which must not pass for a
    new capture.
    """

    def __init__(
        self,
        what: str,
        open_capture: Callable[[], Any],
        log: Any,
        on_reconnect: Callable[[], None],
        on_health: Optional[Callable[[Optional[str]], None]] = None,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_reconnects: Optional[int] = None,
        read_timeout: Optional[float] = None,
        opening: str = "open",
    ):
        self.what = what
        self._opening = opening
        self._open = open_capture
        self._log = log
        self._on_reconnect = on_reconnect
        self._on_health = on_health or (lambda problem: None)
        self._backoff0 = backoff
        self._max_backoff = max_backoff
        self._max_reconnects = max_reconnects
        self._read_timeout = read_timeout
        self._cond = threading.Condition()
        self._frame: Optional[Tuple[np.ndarray, float]] = None
        self._seq = 0  # bumped per captured frame; latest() returns each frame once
        self._taken = 0
        self._failure: Optional[str] = None
        self._stopping = threading.Event()
        self._cap: Any = None
        self._thread = threading.Thread(target=self._run, name=f"capture {what}", daemon=True)

    def start(self) -> None:
        quiet_native_logs()
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self._thread.join(timeout)
        cap, self._cap = self._cap, None
        if cap is not None and not self._thread.is_alive():
            cap.release()

    def latest(self, wait: float = READ_WAIT_S) -> Optional[Tuple[np.ndarray, float]]:
        """The newest frame not returned before and its capture time, or None after ``wait`` s."""
        with self._cond:
            if self._seq == self._taken and self._failure is None:
                self._cond.wait(wait)
            if self._failure is not None:
                raise StageError(self._failure)
            if self._seq == self._taken or self._frame is None:
                return None
            self._taken = self._seq
            return self._frame

    def _run(self) -> None:
        backoff = self._backoff0
        attempts = 0  # consecutive failed attempts since the last good frame
        first = True
        opened = False  # the capture opened at least once
        while not self._stopping.is_set():
            reason = ""
            try:
                if not first:
                    self._on_reconnect()
                first = False
                self._cap = self._open()
                opened = True
                if attempts:
                    self._log.info("Reconnected to %r after %d attempt(s)", self.what, attempts)
                    self._on_health(None)
                while not self._stopping.is_set():
                    started = time.monotonic()
                    ok, image = self._cap.read()
                    if not ok or image is None:
                        reason = "the stream returned no frame (ended or timed out)"
                        break
                    if self._read_timeout is not None and time.monotonic() - started >= self._read_timeout:
                        reason = f"no new frame within read_timeout={self._read_timeout:g} s (stalled)"
                        break
                    with self._cond:
                        self._frame = (image, time.time())
                        self._seq += 1
                        self._cond.notify_all()
                    attempts, backoff = 0, self._backoff0
            except StageError as exc:
                reason = str(exc)
            except Exception as exc:  # a driver error must not kill the thread silently
                reason = f"{type(exc).__name__}: {exc}"
            if self._cap is not None:
                self._cap.release()
                self._cap = None
            if self._stopping.is_set():
                return
            attempts += 1
            if self._max_reconnects is not None and attempts > self._max_reconnects:
                self._log.error(
                    "Giving up on %r after %d failed attempts: %s", self.what, attempts, reason
                )
                with self._cond:
                    self._failure = f"{self.what!r}: gave up after {attempts} failed attempts ({reason})"
                    self._cond.notify_all()
                return
            self._on_health(f"{'lost' if opened else 'cannot ' + self._opening} {self.what!r}: {reason}")
            if opened:
                self._log.warning(
                    "Lost %r (%s); reconnecting in %g s (attempt %d)", self.what, reason, backoff, attempts
                )
            else:
                self._log.warning(
                    "Cannot %s %r (retrying in %g s, attempt %d): %s",
                    self._opening, self.what, backoff, attempts, reason,
                )
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff)

