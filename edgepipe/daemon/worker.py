"""A worker process: runs one or more stages, links them over ZeroMQ, reports to the supervisor.

Started by the supervisor as ``python -m edgepipe.daemon.worker`` (a spawned interpreter, never a
fork) with its :class:`~edgepipe.daemon.plan.WorkerPlan` as JSON on stdin. It ignores SIGINT,
SIGTERM and SIGHUP: only the supervisor acts on signals, so a Ctrl-C or a systemd stop that
reaches the whole process group still drains in order. Its life:

1. Validate the plan, build every stage (settings validated by the registry) and call
   ``start()`` on each (devices opened, models warmed), bind inputs, connect outputs, then send
   READY on the control channel (a DEALER to the supervisor's ROUTER, see
   :mod:`edgepipe.daemon.control`) with the series each stage declared, where each can be
   reached and how many frames each finite source will deliver. A ``start()`` failure is sent as
   FAILED with the one-line reason.
2. Loop on one thread: serve control messages (RUN lets sources read, STOP drains, RECONFIGURE
   applies new settings, ENDED tells of upstream stages that finished), step each stage
   (:class:`~edgepipe.daemon.runner.StageRunner`), and every ``heartbeat_interval`` send
   HEARTBEAT with each stage's metrics and state.
3. A stage ends when it is a source that ran out (or was told to stop) or when every one of its
   upstream stages sent an end marker: it is flushed, forwards the end marker, and is done. When
   all its stages are done the worker waits for the supervisor's EXIT (its consumers in other
   processes have its end markers: ZeroMQ drops what a receiver has not read once the sender
   is gone), calls ``stop()`` on each, sends FINISHED and exits 0.

Exit codes: 0 finished; 1 crashed (uncaught error, or a stage raised StageError while running);
3 a stage failed to start. The worker also exits when its supervisor is gone.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

import zmq

from edgepipe.daemon.control import Control, ControlError, identity, pack, unpack
from edgepipe.daemon.plan import WorkerPlan
from edgepipe.daemon.runner import IDLE_WAIT_S, Host, StageRunner, one_line
from edgepipe.metrics import StageMetrics
from edgepipe.registry import Registry
from edgepipe.runtime import PositionFile, configure_logging
from edgepipe.stage import Source, StageContext
from edgepipe.transport import Input, Output

__all__ = ["EXIT_CRASHED", "EXIT_FINISHED", "EXIT_START_FAILED", "Worker", "main"]

log = logging.getLogger("edgepipe.worker")

EXIT_FINISHED = 0
EXIT_CRASHED = 1
EXIT_START_FAILED = 3
INPROC_HWM = 1000  # same-thread links: drained every loop turn, so this is never reached in practice
SOURCE_SPIN_WAIT_S = 0.01


class Worker(Host):
    """The worker loop (see the module docstring)."""

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.name = plan.worker
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, identity(self.name, plan.incarnation))
        self.control.setsockopt(zmq.LINGER, 1000)
        self.control.setsockopt(zmq.SNDHWM, 100)
        self.control.connect(plan.control)
        self.runners: List[StageRunner] = []
        self.running = False  # sources read only after the supervisor's RUN
        self.exit_allowed = False  # the supervisor's EXIT: our consumers have our end markers
        self.killed = False  # supervisor gone: give up waiting on links
        self.next_heartbeat = time.monotonic() + plan.heartbeat_interval
        self.parent = plan.supervisor_pid
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.registry = Registry.discover()

    # -- control channel -------------------------------------------------------------------

    def send(self, kind: Control, body: Optional[Dict[str, Any]] = None) -> None:
        try:
            self.control.send_multipart(pack(kind, body), zmq.NOBLOCK)
        except zmq.Again:
            pass  # supervisor busy or gone; heartbeats are periodic, the next one will do

    def heartbeat(self) -> None:
        self.send(Control.HEARTBEAT, {"stages": {r.name: r.state() for r in self.runners}})

    def heartbeat_soon(self) -> None:
        self.next_heartbeat = 0.0

    def service(self) -> None:
        """Answer control messages, send a heartbeat when due, notice a dead supervisor.
        Called every loop turn and while a blocking send waits."""
        while True:
            try:
                parts = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                kind, body = unpack(parts)
            except ControlError as exc:
                log.warning("Ignoring a control message: %s", exc)
                continue
            self.handle(kind, body)
        if time.monotonic() >= self.next_heartbeat:
            self.next_heartbeat = time.monotonic() + self.plan.heartbeat_interval
            self.heartbeat()
        if os.getppid() != self.parent:
            if not self.killed:
                log.warning("Supervisor is gone; stopping")
            self.killed = True
            for r in self.runners:
                r.stop_requested = True

    def handle(self, kind: Control, body: Dict[str, Any]) -> None:
        if kind == Control.RUN:
            self.running = True
        elif kind == Control.EXIT:
            self.exit_allowed = True
        elif kind == Control.STOP:
            for r in self.runners:
                r.stop_requested = True
        elif kind == Control.ENDED:  # upstream stages that finished (their end marker may be lost)
            for r in self.runners:
                r.hint_ended([str(s) for s in body.get("stages") or []])
        elif kind == Control.RECONFIGURE:
            self.send(Control.RECONFIGURED, {"stages": self.reconfigure(body.get("stages") or {})})
        else:
            log.warning("Ignoring control message %s, meant for the supervisor", kind.value)

    def reconfigure(self, settings: Dict[str, Dict[str, Any]]) -> Dict[str, bool]:
        applied = {}
        for r in self.runners:
            if r.name not in settings:
                continue
            try:
                new = self.registry.validate(r.plan.type, settings[r.name])
                ok = bool(r.stage.reconfigure(new))
            except Exception as exc:  # a stage refusing: restart it with the new settings
                log.warning("Stage %r could not reconfigure in place: %s", r.name, one_line(exc))
                ok = False
            if ok:
                r.stage.config = new
                log.info("Stage %r reconfigured in place", r.name)
            applied[r.name] = ok
        return applied

    def failed(self, what: str, exc: BaseException) -> None:
        """Log a fatal error and tell the supervisor the reason (one line)."""
        reason = one_line(exc)
        log.error("%s: %s", what, reason)
        log.debug("%s", traceback.format_exc())
        self.send(Control.FAILED, {"reason": reason})

    # -- start -------------------------------------------------------------------------------

    def build(self) -> None:
        for spec in self.plan.stages:
            cls = self.registry.get(spec.type)
            settings = self.registry.validate(spec.type, spec.settings)
            context = StageContext(
                spec.name, StageMetrics(spec.name, cls.kind), self.plan.runtime_dir, spec.resume,
                pipeline=self.plan.pipeline,
            )
            self.runners.append(StageRunner(spec, cls(settings, context), self))

    def start(self) -> None:
        for r in self.runners:
            log.debug("Starting stage %r", r.name)
            r.stage.start()
            r.metrics.last_progress.set(time.time())
            if r.is_source and r.plan.position:
                r.position = PositionFile(r.plan.position, r.resume)
        for r in self.runners:
            if r.plan.input is not None:
                endpoints = r.plan.input.endpoints
                local_only = all(e.startswith("inproc://") for e in endpoints)
                r.input = Input(self.ctx, endpoints, r.plan.input.policy, r.metrics,
                                hwm=INPROC_HWM if local_only else None)
                self.poller.register(r.input.pollable, zmq.POLLIN)
        for r in self.runners:
            for out in r.plan.outputs:
                inproc = out.endpoint.startswith("inproc://")
                r.outputs.append(Output(self.ctx, out.endpoint, out.policy, out.consumer,
                                        hwm=INPROC_HWM if inproc else None))

    def ready(self) -> None:
        """READY, with what the supervisor needs to know of each started stage."""
        self.send(Control.READY, {
            "pid": os.getpid(),
            # The series each stage declared, for the supervisor to refuse clashes between stages.
            "series": {r.name: [s.spec() for s in r.metrics.series.values()] for r in self.runners},
            "addresses": {r.name: _call(r.stage.addresses, {}) for r in self.runners},
            "expected": {r.name: _call(r.stage.expected_frames, None) for r in self.runners
                         if isinstance(r.stage, Source)},
        })
        self.heartbeat()

    # -- loop --------------------------------------------------------------------------------

    def wait_time(self) -> float:
        sources = [r for r in self.runners if r.is_source and not r.done]
        if self.running and sources:
            # Sources wait inside read(); one that returns at once with nothing gets a short
            # pause here instead of a busy loop.
            return SOURCE_SPIN_WAIT_S if all(r.spinning for r in sources) else 0.0
        now = time.monotonic()
        waits = [w for w in (r.batch_wait(now) for r in self.runners) if w is not None]
        return min([IDLE_WAIT_S, max(0.0, self.next_heartbeat - now)] + waits)

    def loop(self) -> None:
        while not all(r.done for r in self.runners):
            self.service()
            for r in self.runners:
                if r.done:
                    continue
                if r.is_source:
                    r.step_source()
                else:
                    # Keep at it while frames come (same-worker links stay short), but never
                    # past a heartbeat: a busy stage must still look alive.
                    for _ in range(64):
                        if r.done or not r.step_processor():
                            break
                        if time.monotonic() >= self.next_heartbeat:
                            self.service()
            if self.killed:
                break
            self.poller.poll(int(self.wait_time() * 1000))

    def wait_for_exit(self) -> None:
        """Stay until the supervisor says our consumers in other processes got our end markers."""
        remote = any(o.endpoint.startswith("ipc://") for r in self.runners for o in r.outputs)
        if not remote:
            return
        self.heartbeat()
        self.send(Control.FINISHED)
        while not self.exit_allowed and not self.killed:
            self.control.poll(int(IDLE_WAIT_S * 1000))
            self.service()

    def close(self) -> None:
        for r in self.runners:
            try:
                r.stage.stop()
            except Exception as exc:
                log.warning("Stage %r failed to stop cleanly: %s", r.name, one_line(exc))
        linger = 0 if self.killed else None
        for r in self.runners:
            if r.position is not None:
                r.position.close()
            for out in r.outputs:
                out.close(linger)
            if r.input is not None:
                r.input.close()


def _call(method: Any, default: Any) -> Any:
    """A stage's optional report (addresses, expected frames); a plugin bug there costs only
    the report."""
    try:
        return method()
    except Exception as exc:
        log.warning("Ignoring %s: %s", getattr(method, "__qualname__", method), one_line(exc))
        return default


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
    try:
        plan = WorkerPlan.model_validate_json(sys.stdin.read())
    except Exception as exc:  # a supervisor of another version: say so, do not guess
        sys.stderr.write(f"edgepipe worker: error: the plan on stdin is not valid: {one_line(exc)}\n")
        return EXIT_START_FAILED
    sys.stdin.close()
    _die_with_parent()
    if os.getppid() != plan.supervisor_pid:
        return EXIT_CRASHED  # the supervisor died before the request above took effect
    configure_logging(plan.log_level, plan.worker)
    _set_title(f"edgepipe: {plan.pipeline}/{plan.worker}")
    worker = Worker(plan)
    try:
        worker.build()
        worker.start()
    except Exception as exc:
        worker.failed("Failed to start", exc)
        worker.control.close(linger=1000)
        return EXIT_START_FAILED
    worker.ready()
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
        worker.send(Control.FINISHED)
    worker.control.close(linger=1000)
    worker.ctx.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
