"""One stage inside a worker: its links, the frames waiting for it, and one step of its work.

A :class:`StageRunner` reads its source or its input link, gathers batches (``max_batch`` frames,
waiting at most ``max_wait_ms``; under a 'latest' link one pending frame per source, a newer one
replacing it and counted as skipped), calls the stage, counts what happened (frames, drops,
errors, time, progress) and sends what the stage returns. At end of stream it flushes the stage
and forwards the end marker. A blocking send (a 'block' link that is full) keeps the worker
serving its supervisor through the host's ``service`` callback, and marks the stage as held up
by its consumer, which /healthz then does not call a stall of this stage.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Dict, List, Optional, Set, Tuple, Union

from edgepipe.daemon.plan import StagePlan
from edgepipe.messages import EndMarker, Frame, encode, frame_problem
from edgepipe.metrics import MetricsError, StageMetrics
from edgepipe.ratelimit import CauseLog
from edgepipe.runtime import PositionFile
from edgepipe.stage import EndOfStream, Processor, Source, Stage, StageError
from edgepipe.transport import Input, Output

__all__ = ["Host", "StageRunner", "one_line"]

log = logging.getLogger("edgepipe.worker")

ERROR_LOG_INTERVAL_S = 10.0
END_HINT_QUIET_S = 1.0
SOURCE_SPIN_S = 0.001
IDLE_WAIT_S = 0.1


class Host:
    """What a runner needs from its worker (the worker is one)."""

    running = False  # the supervisor said RUN: sources may read
    killed = False  # the supervisor is gone: give up waiting on links

    def service(self) -> None:
        """Serve the control channel (called while a blocking send waits)."""

    def heartbeat_soon(self) -> None:
        """Send the next heartbeat at once (an end marker arrived)."""


class StageRunner:
    """One stage inside the worker loop, with its links and pending frames."""

    def __init__(self, plan: StagePlan, stage: Stage, host: Host) -> None:
        self.plan = plan
        self.name = plan.name
        self.stage = stage
        self.host = host
        self.metrics: StageMetrics = stage.metrics
        self.is_source = isinstance(stage, Source)
        self.upstream: Set[str] = set(plan.upstream)
        self.ended_upstream: Set[str] = set()
        # Upstream stages the supervisor says have ended, whose end marker this incarnation may
        # have missed (it restarted meanwhile). Frames may still be on the way, so a hint only
        # counts once the input has been quiet for END_HINT_QUIET_S.
        self.end_hints: Dict[str, float] = {}
        self.last_input = time.monotonic()
        self.hint_ended(plan.ended_upstream)
        self.max_batch = plan.batch.max_batch if plan.batch else 1
        self.max_wait = plan.batch.max_wait_ms / 1000.0 if plan.batch else 0.0
        self.input: Optional[Input] = None
        self.outputs: List[Output] = []
        self.pending: List[Frame] = []
        self.pending_since = 0.0
        self.sources: Set[str] = set()  # every source whose frames reached this stage
        # For /healthz: since when (unix time) input has been waiting here (0: idle), and
        # whether the stage is waiting for room on a downstream link (then it is not the stall).
        self.work_since = 0.0
        self.blocked = False
        self.done = False
        self.stop_requested = False
        self.error_log = CauseLog(log, ERROR_LOG_INTERVAL_S)  # one line per cause and interval
        self.fps_window: List[Tuple[float, float]] = []
        self.spinning = False  # a source whose read() returned None without waiting
        self.resume = plan.resume
        self.position: Optional[PositionFile] = None  # sources: the next frame id, for restarts
        self.checked_resume = self.resume == 0

    @property
    def policy(self) -> str:
        return self.input.policy if self.input is not None else "block"

    @property
    def upstream_ended(self) -> bool:
        return self.ended_upstream >= self.upstream

    # -- input ------------------------------------------------------------------------------

    def add(self, frames: List[Frame]) -> None:
        """Queue received frames; under 'latest' a newer frame replaces a pending one of the
        same source (counted as skipped), so the pending list stays one frame per source."""
        for f in frames:
            self.sources.add(f.source)
            if self.policy == "latest":
                before = len(self.pending)
                self.pending = [p for p in self.pending if p.source != f.source]
                if len(self.pending) != before:
                    self.metrics.dropped.labels("skipped").inc(before - len(self.pending))
            if not self.pending:
                self.pending_since = time.monotonic()
                self.work_since = self.work_since or time.time()
            self.pending.append(f)

    def hint_ended(self, stages: List[str]) -> None:
        now = time.monotonic()
        for name in stages:
            if name in self.upstream and name not in self.ended_upstream:
                self.end_hints.setdefault(name, now)

    def apply_end_hints(self) -> None:
        now = time.monotonic()
        for name, t in list(self.end_hints.items()):
            if now - max(t, self.last_input) >= END_HINT_QUIET_S:
                self.ended_upstream.add(name)
                del self.end_hints[name]

    # -- output -----------------------------------------------------------------------------

    def _idle(self) -> None:
        """While a blocking send waits: serve the supervisor; held up by the consumer."""
        self.blocked = True
        self.host.service()

    def _abort(self) -> bool:
        return self.host.killed

    def emit(self, frames: List[Frame]) -> None:
        try:
            for f in frames:
                parts = encode(f)
                for out in self.outputs:
                    out.send_frame(parts, self._idle, self._abort, self.metrics)
                self.metrics.sent.inc()
        finally:
            self.blocked = False

    def finish(self) -> None:
        """End of stream for this stage: flush, forward the end marker, done."""
        if self.done:
            return
        try:
            self.emit(list(self.stage.flush() or []))
        except StageError:
            raise
        except Exception as exc:
            self.count_error("process", exc, 0)
        for out in self.outputs:
            if not out.send_eos(self.name, self._idle, self._abort):
                log.warning("End marker of %r to %r not delivered", self.name, out.consumer)
        self.blocked = False
        self.done = True
        self.metrics.last_progress.set(time.time())
        log.debug("Stage %r ended", self.name)

    def count_error(self, kind: str, exc: Union[BaseException, str], dropped: int) -> None:
        """Count an error of ``kind`` (and ``dropped`` frames); one log line per cause and
        interval. ``exc`` is the exception, or the reason as text."""
        self.metrics.errors.labels(kind).inc()
        if dropped:
            self.metrics.dropped.labels("error").inc(dropped)
        text = exc if isinstance(exc, str) else one_line(exc)
        if self.error_log.log(logging.ERROR, f"Stage {self.name!r} {kind} error: {text}") and not isinstance(exc, str):
            log.debug("%s", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    # -- work -------------------------------------------------------------------------------

    def step_source(self) -> None:
        if self.stop_requested:
            self.finish()
            return
        if not self.host.running:
            return
        t0 = time.monotonic()
        try:
            frame = self.stage.read()  # type: ignore[attr-defined]
        except EndOfStream:
            self.finish()
            return
        except StageError:
            raise
        except Exception as exc:
            self.count_error("source", exc, 0)
            time.sleep(IDLE_WAIT_S)  # do not spin on a source that keeps failing
            return
        dt = time.monotonic() - t0
        self.spinning = frame is None and dt < SOURCE_SPIN_S
        if frame is None:
            return
        problem = frame_problem(frame)
        if problem:  # not a picture the pipeline can work on: refused where it enters
            self.count_error("source", problem, 1)
            return
        m = self.metrics
        m.processing_seconds.observe(dt)
        m.busy_seconds.inc(dt)
        m.frames_read.inc()
        m.last_frame_timestamp.set(frame.timestamp)
        m.last_progress.set(time.time())
        if frame.source == self.name:
            if not self.checked_resume:
                self.checked_resume = True
                if frame.frame_id < self.resume:
                    log.warning(
                        "Source %r ignores its resume id: restarted at frame id %d instead of %d, "
                        "so ids repeat downstream", self.name, frame.frame_id, self.resume,
                    )
            if self.position is not None:
                self.position.set(frame.frame_id + 1)  # before it leaves: a kill now loses, never repeats
        self.emit([frame])

    def step_processor(self) -> bool:
        """Receive, and process what is due; True when it did any work."""
        assert self.input is not None
        worked = False
        items = self.input.recv(max(1, self.max_batch - len(self.pending)) if self.policy == "block" else 0)
        frames = []
        for item in items:
            if isinstance(item, EndMarker):
                if item.source in self.upstream:
                    self.ended_upstream.add(item.source)
                    self.end_hints.pop(item.source, None)
                    self.host.heartbeat_soon()  # tell the supervisor soon: the producer waits on it
            else:
                frames.append(item)
        if items:
            self.last_input = time.monotonic()
        elif self.end_hints and not self.pending:
            self.apply_end_hints()
        if frames:
            self.add(frames)
        while self.pending and self.batch_due():
            batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            if self.pending:
                self.pending_since = time.monotonic()
            self.run_batch(batch)
            worked = True
        if not self.pending:
            self.work_since = 0.0
        if self.upstream_ended and not self.pending:
            self.finish()
            worked = True
        return worked or bool(items)

    def batch_due(self) -> bool:
        return (
            self.max_batch <= 1
            or len(self.pending) >= self.max_batch
            or time.monotonic() - self.pending_since >= self.max_wait
            or self.upstream_ended
            # 'latest' holds one frame per source: with every source in, none can join.
            or (self.policy == "latest" and len(self.pending) >= len(self.sources))
        )

    def run_batch(self, batch: List[Frame]) -> None:
        t0 = time.monotonic()
        try:
            out = self.stage.process(batch)  # type: ignore[attr-defined]
        except StageError:
            raise
        except Exception as exc:
            self.count_error("process", exc, len(batch))
            out = None
        dt = time.monotonic() - t0
        m = self.metrics
        m.processing_seconds.observe(dt)
        m.busy_seconds.inc(dt)
        m.last_progress.set(time.time())
        if not isinstance(self.stage, Processor):
            m.detections_seen.inc(sum(0 if f.detections is None else len(f.detections) for f in batch))
        if out and isinstance(self.stage, Processor):
            for f in out:
                f.timing[self.name] = f.timing.get(self.name, 0.0) + dt / max(1, len(batch))
            self.emit(list(out))

    def batch_wait(self, now: float) -> Optional[float]:
        """Seconds until a pending batch is due, or None when none waits."""
        if self.pending and self.max_batch > 1:
            return max(0.0, self.pending_since + self.max_wait - now)
        return None

    def state(self) -> Dict[str, object]:
        """What a heartbeat reports of this stage (its metrics and where it is)."""
        now = time.time()
        if self.is_source:
            self.fps_window.append((now, self.metrics.frames_read.value))
            self.fps_window = [p for p in self.fps_window if now - p[0] <= 2.0]
            (t0, n0), (t1, n1) = self.fps_window[0], self.fps_window[-1]
            self.metrics.fps.set((n1 - n0) / (t1 - t0) if t1 > t0 else 0.0)
        return {
            "metrics": self.metrics.snapshot(),
            "ended": self.done,
            "eos_from": sorted(self.ended_upstream),
            "work_since": self.work_since,
            "blocked": self.blocked,
        }


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (StageError, MetricsError)):  # those name what failed themselves
        text = f"{type(exc).__name__}: {text}"
    return text


