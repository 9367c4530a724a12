"""A worker process: runs one or more stages, links them over ZeroMQ, reports to the supervisor.

Started by the supervisor as ``python -m edgepipe.worker`` (a spawned interpreter, never a fork)
with its plan as JSON on stdin (see :func:`plan_worker` in the supervisor). It ignores SIGINT,
SIGTERM and SIGHUP: only the supervisor acts on signals, so a Ctrl-C or a systemd stop that
reaches the whole process group still drains in order. Its life:

1. Build every stage of its plan and call ``start()`` on each (devices opened, models warmed),
   bind inputs, connect outputs, then send READY on the control channel (a DEALER to the
   supervisor's ROUTER). A ``start()`` failure is sent as FAILED with the one-line reason.
2. Loop on one thread: serve control messages (RUN lets sources read, STOP drains, RECONFIGURE
   applies new settings), read sources, receive inputs per link policy, gather batches, call the
   stages, send what they return, and every ``heartbeat_interval`` send HEARTBEAT with each
   stage's metrics snapshot, progress time, whether it has ended, since when input has been
   waiting for it and whether it waits for room downstream (for /healthz).
3. A stage ends when it is a source that ran out (or was told to stop) or when every one of its
   upstream stages sent an end marker: it is flushed, forwards the end marker, and is done. When
   all its stages are done the worker calls ``stop()`` on each, sends FINISHED and exits 0.

Exit codes: 0 finished; 1 crashed (uncaught error, or a stage raised StageError while running);
3 a stage failed to start. The worker also exits when its supervisor is gone.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import msgpack
import zmq

from edgepipe.messages import EndMarker, Frame, encode, frame_problem
from edgepipe.metrics import MetricsError, StageMetrics
from edgepipe.ratelimit import CauseLog
from edgepipe.registry import Registry
from edgepipe.runtime import PositionFile, configure_logging
from edgepipe.stage import EndOfStream, Processor, Source, Stage, StageContext, StageError
from edgepipe.transport import Input, Output

__all__ = ["EXIT_CRASHED", "EXIT_FINISHED", "EXIT_START_FAILED", "main"]

log = logging.getLogger("edgepipe.worker")

EXIT_FINISHED = 0
EXIT_CRASHED = 1
EXIT_START_FAILED = 3
INPROC_HWM = 1000  # same-thread links: drained every loop turn, so this is never reached in practice
IDLE_WAIT_S = 0.1
ERROR_LOG_INTERVAL_S = 10.0
END_HINT_QUIET_S = 1.0
SOURCE_SPIN_S = 0.001
SOURCE_SPIN_WAIT_S = 0.01


class StageRunner:
    """One stage inside the worker loop, with its links and pending frames."""

    def __init__(self, spec: Dict[str, Any], stage: Stage) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.stage = stage
        self.metrics: StageMetrics = stage.metrics
        self.is_source = isinstance(stage, Source)
        self.upstream: Set[str] = set(spec.get("upstream", []))
        self.ended_upstream: Set[str] = set()
        # Upstream stages the supervisor says have ended, whose end marker this incarnation may
        # have missed (it restarted meanwhile). Frames may still be on the way, so a hint only
        # counts once the input has been quiet for END_HINT_QUIET_S.
        self.end_hints: Dict[str, float] = {}
        self.last_input = time.monotonic()
        self.hint_ended(spec.get("ended_upstream", []))
        batch = spec.get("batch")
        self.max_batch: int = int(batch["max_batch"]) if batch else 1
        self.max_wait: float = float(batch["max_wait_ms"]) / 1000.0 if batch else 0.0
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
        self.resume: int = int(spec.get("resume") or 0)
        self.position: Optional[PositionFile] = None  # sources: the next frame id, for restarts
        self.checked_resume = self.resume == 0

    @property
    def policy(self) -> str:
        return self.input.policy if self.input is not None else "block"

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

    @property
    def upstream_ended(self) -> bool:
        return self.ended_upstream >= self.upstream


class Worker:
    """The worker loop (see the module docstring)."""

    def __init__(self, plan: Dict[str, Any]) -> None:
        self.plan = plan
        self.name: str = plan["worker"]
        self.heartbeat_interval: float = float(plan.get("heartbeat_interval", 0.5))
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, f"{self.name}:{plan['incarnation']}".encode())
        self.control.setsockopt(zmq.LINGER, 1000)
        self.control.setsockopt(zmq.SNDHWM, 100)
        self.control.connect(plan["control"])
        self.runners: List[StageRunner] = []
        self.running = False  # sources read only after the supervisor's RUN
        self.exit_allowed = False  # the supervisor's EXIT: our consumers have our end markers
        self.killed = False  # supervisor gone: give up waiting on links
        self.next_heartbeat = 0.0
        self.parent = int(plan.get("supervisor_pid") or os.getppid())
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.registry = Registry.discover()

    # -- control channel -------------------------------------------------------------------

    def send(self, kind: str, body: Optional[Dict[str, Any]] = None) -> None:
        try:
            self.control.send_multipart(
                [kind.encode(), msgpack.packb(body or {}, use_bin_type=True)], zmq.NOBLOCK
            )
        except zmq.Again:
            pass  # supervisor busy or gone; heartbeats are periodic, the next one will do

    def heartbeat(self) -> None:
        now = time.time()
        stages = {}
        for r in self.runners:
            if r.is_source:
                r.fps_window.append((now, r.metrics.frames_read.value))
                r.fps_window = [p for p in r.fps_window if now - p[0] <= 2.0]
                (t0, n0), (t1, n1) = r.fps_window[0], r.fps_window[-1]
                r.metrics.fps.set((n1 - n0) / (t1 - t0) if t1 > t0 else 0.0)
            stages[r.name] = {
                "metrics": r.metrics.snapshot(),
                "ended": r.done,
                "eos_from": sorted(r.ended_upstream),
                "work_since": r.work_since,
                "blocked": r.blocked,
            }
        self.send("HEARTBEAT", {"stages": stages})

    def service(self) -> None:
        """Answer control messages, send a heartbeat when due, notice a dead supervisor.
        Called every loop turn and while a blocking send waits."""
        while True:
            try:
                parts = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.handle(parts)
        if time.monotonic() >= self.next_heartbeat:
            self.next_heartbeat = time.monotonic() + self.heartbeat_interval
            self.heartbeat()
        if os.getppid() != self.parent:
            if not self.killed:
                log.warning("Supervisor is gone; stopping")
            self.killed = True
            for r in self.runners:
                r.stop_requested = True

    def handle(self, parts: List[bytes]) -> None:
        kind = parts[0].decode(errors="replace")
        body = msgpack.unpackb(parts[1], raw=False) if len(parts) > 1 else {}
        if kind == "RUN":
            self.running = True
        elif kind == "EXIT":
            self.exit_allowed = True
        elif kind == "STOP":
            for r in self.runners:
                r.stop_requested = True
        elif kind == "ENDED":  # upstream stages that finished (their end marker may be lost)
            for r in self.runners:
                r.hint_ended(list(body.get("stages", [])))
        elif kind == "RECONFIGURE":
            self.send("RECONFIGURED", {"stages": self.reconfigure(body.get("stages", {}))})
        else:
            log.warning("Ignoring unknown control message %r", kind)

    def reconfigure(self, settings: Dict[str, Dict[str, Any]]) -> Dict[str, bool]:
        applied = {}
        for r in self.runners:
            if r.name not in settings:
                continue
            try:
                new = self.registry.plugins[r.spec["type"]].settings_model().model_validate(
                    settings[r.name]
                )
                ok = bool(r.stage.reconfigure(new))
            except Exception as exc:  # a stage refusing: restart it with the new settings
                log.warning("Stage %r could not reconfigure in place: %s", r.name, _one_line(exc))
                ok = False
            if ok:
                r.stage.config = new
                log.info("Stage %r reconfigured in place", r.name)
            applied[r.name] = ok
        return applied

    def abort(self) -> bool:
        return self.killed

    def failed(self, what: str, exc: BaseException) -> None:
        """Log a fatal error and tell the supervisor the reason (one line)."""
        reason = _one_line(exc)
        log.error("%s: %s", what, reason)
        log.debug("%s", traceback.format_exc())
        self.send("FAILED", {"reason": reason})

    # -- start -------------------------------------------------------------------------------

    def build(self) -> None:
        for spec in self.plan["stages"]:
            cls = self.registry.get(spec["type"])
            settings = self.registry.plugins[spec["type"]].settings_model().model_validate(
                spec["settings"]
            )
            metrics = StageMetrics(spec["name"], cls.kind)
            context = StageContext(
                spec["name"], metrics, self.plan.get("runtime_dir"), int(spec.get("resume") or 0),
                pipeline=str(self.plan.get("pipeline") or "edgepipe"),
            )
            self.runners.append(StageRunner(spec, cls(settings, context)))

    def start(self) -> None:
        for r in self.runners:
            log.debug("Starting stage %r", r.name)
            r.stage.start()
            r.metrics.last_progress.set(time.time())
            if r.is_source and r.spec.get("position"):
                r.position = PositionFile(r.spec["position"], r.resume)
        for r in self.runners:
            if r.spec.get("input"):
                inp = r.spec["input"]
                local_only = all(e.startswith("inproc://") for e in inp["endpoints"])
                r.input = Input(self.ctx, inp["endpoints"], inp["policy"], r.metrics,
                                hwm=INPROC_HWM if local_only else None)
                self.poller.register(r.input.pollable, zmq.POLLIN)
        for r in self.runners:
            for out in r.spec.get("outputs", []):
                inproc = out["endpoint"].startswith("inproc://")
                r.outputs.append(Output(self.ctx, out["endpoint"], out["policy"], out["consumer"],
                                        hwm=INPROC_HWM if inproc else None))

    # -- loop --------------------------------------------------------------------------------

    def waiting_downstream(self, r: StageRunner) -> Callable[[], None]:
        """The idle callback of a blocking send: serve the supervisor, and mark ``r`` as held up
        by its consumer (backpressure is not a stall of this stage)."""

        def idle() -> None:
            r.blocked = True
            self.service()

        return idle

    def emit(self, r: StageRunner, frames: List[Frame]) -> None:
        idle = self.waiting_downstream(r)
        try:
            for f in frames:
                parts = encode(f)
                for out in r.outputs:
                    out.send_frame(parts, idle, self.abort, r.metrics)
                r.metrics.sent.inc()
        finally:
            r.blocked = False

    def finish(self, r: StageRunner) -> None:
        """End of stream for this stage: flush, forward the end marker, done."""
        if r.done:
            return
        try:
            self.emit(r, list(r.stage.flush() or []))
        except StageError:
            raise
        except Exception as exc:
            self.count_error(r, "process", exc, 0)
        idle = self.waiting_downstream(r)
        for out in r.outputs:
            if not out.send_eos(r.name, idle, self.abort):
                log.warning("End marker of %r to %r not delivered", r.name, out.consumer)
        r.blocked = False
        r.done = True
        r.metrics.last_progress.set(time.time())
        log.debug("Stage %r ended", r.name)

    def count_error(self, r: StageRunner, kind: str, exc: Union[BaseException, str], dropped: int) -> None:
        """Count an error of ``kind`` (and ``dropped`` frames); one log line per cause and
        interval. ``exc`` is the exception, or the reason as text."""
        r.metrics.errors.labels(kind).inc()
        if dropped:
            r.metrics.dropped.labels("error").inc(dropped)
        text = exc if isinstance(exc, str) else _one_line(exc)
        if r.error_log.log(logging.ERROR, f"Stage {r.name!r} {kind} error: {text}") and not isinstance(exc, str):
            log.debug("%s", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    def step_source(self, r: StageRunner) -> None:
        if r.stop_requested:
            self.finish(r)
            return
        if not self.running:
            return
        t0 = time.monotonic()
        try:
            frame = r.stage.read()  # type: ignore[attr-defined]
        except EndOfStream:
            self.finish(r)
            return
        except StageError:
            raise
        except Exception as exc:
            self.count_error(r, "source", exc, 0)
            time.sleep(IDLE_WAIT_S)  # do not spin on a source that keeps failing
            return
        dt = time.monotonic() - t0
        r.spinning = frame is None and dt < SOURCE_SPIN_S
        if frame is None:
            return
        problem = frame_problem(frame)
        if problem:  # not a picture the pipeline can work on: refused where it enters
            self.count_error(r, "source", problem, 1)
            return
        m = r.metrics
        m.processing_seconds.observe(dt)
        m.busy_seconds.inc(dt)
        m.frames_read.inc()
        m.last_frame_timestamp.set(frame.timestamp)
        m.last_progress.set(time.time())
        if frame.source == r.name:
            if not r.checked_resume:
                r.checked_resume = True
                if frame.frame_id < r.resume:
                    log.warning(
                        "Source %r ignores its resume id: restarted at frame id %d instead of %d, "
                        "so ids repeat downstream", r.name, frame.frame_id, r.resume,
                    )
            if r.position is not None:
                r.position.set(frame.frame_id + 1)  # before it leaves: a kill now loses, never repeats
        self.emit(r, [frame])

    def step_processor(self, r: StageRunner) -> bool:
        """Receive, and process what is due; True when it did any work."""
        assert r.input is not None
        worked = False
        items = r.input.recv(max(1, r.max_batch - len(r.pending)) if r.policy == "block" else 0)
        frames = []
        for item in items:
            if isinstance(item, EndMarker):
                if item.source in r.upstream:
                    r.ended_upstream.add(item.source)
                    r.end_hints.pop(item.source, None)
                    self.next_heartbeat = 0.0  # tell the supervisor soon: the producer waits on it
            else:
                frames.append(item)
        if items:
            r.last_input = time.monotonic()
        elif r.end_hints and not r.pending:
            r.apply_end_hints()
        if frames:
            r.add(frames)
        while r.pending:
            batching = r.max_batch > 1
            due = (
                not batching
                or len(r.pending) >= r.max_batch
                or time.monotonic() - r.pending_since >= r.max_wait
                or r.upstream_ended
                # 'latest' holds one frame per source: with every source in, none can join.
                or (r.policy == "latest" and len(r.pending) >= len(r.sources))
            )
            if not due:
                break
            batch, r.pending = r.pending[: r.max_batch], r.pending[r.max_batch :]
            if r.pending:
                r.pending_since = time.monotonic()
            self.run_batch(r, batch)
            worked = True
        if not r.pending:
            r.work_since = 0.0
        if r.upstream_ended and not r.pending:
            self.finish(r)
            worked = True
        return worked or bool(items)

    def run_batch(self, r: StageRunner, batch: List[Frame]) -> None:
        t0 = time.monotonic()
        try:
            out = r.stage.process(batch)  # type: ignore[attr-defined]
        except StageError:
            raise
        except Exception as exc:
            self.count_error(r, "process", exc, len(batch))
            out = None
        dt = time.monotonic() - t0
        m = r.metrics
        m.processing_seconds.observe(dt)
        m.busy_seconds.inc(dt)
        m.last_progress.set(time.time())
        if not isinstance(r.stage, Processor):
            m.detections_seen.inc(sum(0 if f.detections is None else len(f.detections) for f in batch))
        if out and isinstance(r.stage, Processor):
            for f in out:
                f.timing[r.name] = f.timing.get(r.name, 0.0) + dt / max(1, len(batch))
            self.emit(r, list(out))

    def wait_time(self) -> float:
        sources = [r for r in self.runners if r.is_source and not r.done]
        if self.running and sources:
            # Sources wait inside read(); one that returns at once with nothing gets a short
            # pause here instead of a busy loop.
            return SOURCE_SPIN_WAIT_S if all(r.spinning for r in sources) else 0.0
        wait = IDLE_WAIT_S
        now = time.monotonic()
        for r in self.runners:
            if r.pending and r.max_batch > 1:
                wait = min(wait, max(0.0, r.pending_since + r.max_wait - now))
        return min(wait, max(0.0, self.next_heartbeat - now))

    def loop(self) -> None:
        while not all(r.done for r in self.runners):
            self.service()
            for r in self.runners:
                if r.done:
                    continue
                if r.is_source:
                    self.step_source(r)
                else:
                    # Keep at it while frames come (same-worker links stay short), but never
                    # past a heartbeat: a busy stage must still look alive.
                    for _ in range(64):
                        if r.done or not self.step_processor(r):
                            break
                        if time.monotonic() >= self.next_heartbeat:
                            self.service()
            if self.killed:
                break
            self.poller.poll(int(self.wait_time() * 1000))

    def wait_for_exit(self) -> None:
        """Stay until the supervisor says our consumers in other processes got our end markers.

        A ZeroMQ receiver drops what is still in the socket buffers when the sending process
        goes away, so a producer that exited right after its last send would lose frames."""
        remote = any(o.endpoint.startswith("ipc://") for r in self.runners for o in r.outputs)
        if not remote:
            return
        self.heartbeat()
        self.send("FINISHED")
        while not self.exit_allowed and not self.killed:
            self.control.poll(int(IDLE_WAIT_S * 1000))
            self.service()

    def close(self) -> None:
        for r in self.runners:
            try:
                r.stage.stop()
            except Exception as exc:
                log.warning("Stage %r failed to stop cleanly: %s", r.name, _one_line(exc))
        linger = 0 if self.killed else None
        for r in self.runners:
            if r.position is not None:
                r.position.close()
            for out in r.outputs:
                out.close(linger)
            if r.input is not None:
                r.input.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (StageError, MetricsError)):  # those name what failed themselves
        text = f"{type(exc).__name__}: {text}"
    return text


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker if the supervisor dies (kill -9, OOM), even while
    a stage is busy in a long call; the loop's parent check covers other systems."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _set_title(name: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(name)


def main() -> int:
    # Signals first: the supervisor spawned us with SIGINT/SIGTERM blocked, so ignoring them now
    # and then unblocking leaves no window where a group-wide signal kills a worker mid-start.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    faulthandler.enable()
    plan = json.load(sys.stdin)
    sys.stdin.close()
    _die_with_parent()
    if os.getppid() != plan.get("supervisor_pid", os.getppid()):
        return EXIT_CRASHED  # the supervisor died before the request above took effect
    configure_logging(plan.get("log_level", "info"), plan["worker"])
    _set_title(f"edgepipe: {plan['pipeline']}/{plan['worker']}")
    worker = Worker(plan)
    worker.next_heartbeat = time.monotonic() + worker.heartbeat_interval
    try:
        worker.build()
        worker.start()
    except Exception as exc:
        worker.failed("Failed to start", exc)
        worker.control.close(linger=1000)
        return EXIT_START_FAILED
    # The series each stage declared, for the supervisor to refuse clashes between stages.
    series = {r.name: [s.spec() for s in r.metrics.series.values()] for r in worker.runners}
    worker.send("READY", {"pid": os.getpid(), "series": series})
    worker.heartbeat()
    code = EXIT_FINISHED
    try:
        worker.loop()
        worker.wait_for_exit()
    except Exception as exc:
        worker.failed("Crashed", exc)
        code = EXIT_CRASHED
    worker.close()
    if code == EXIT_FINISHED:
        worker.heartbeat()
        worker.send("FINISHED")
    worker.control.close(linger=1000)
    worker.ctx.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
