"""The supervisor: starts the workers, watches them, serves metrics, and alone handles signals.

``run_daemon(pipeline)`` is ``edgepipe run``. In order: each stage's ``check()`` (pre-flight: a
missing camera or weights file fails here, before any process starts); the runtime directory and
the metrics endpoint (a taken port fails here too, naming the setting to change); one
:class:`~edgepipe.daemon.process.WorkerProcess` per stage or per ``worker:`` group, each with its
typed :class:`~edgepipe.daemon.plan.WorkerPlan`; wait until every worker is READY (models loaded
and warmed), then RUN (sources start reading), say where to look, and tell systemd READY=1.

The main loop (one thread; signal handlers only set flags, :meth:`Supervisor.handle_signals`
acts on them) then: reads the workers' control messages (:mod:`edgepipe.daemon.control`);
restarts a worker that died or hung, with backoff, and gives up (exit 1) on a crash loop (the
worker object decides, :meth:`WorkerProcess.on_exit`); SIGTERM/SIGINT drains (STOP: sources end,
end markers carry the in-flight frames through the sinks; what is left after
``runtime.stop_timeout`` is killed and the exit code is 1), a second SIGINT kills at once (130);
SIGHUP reloads (:mod:`edgepipe.daemon.reload`: whatever goes wrong, the running pipeline goes on
and one line says why); when every finite source ended and everything drained: a summary, exit
0. Health (:mod:`edgepipe.daemon.health`) feeds ``/healthz`` and the systemd watchdog; the
status output is :mod:`edgepipe.daemon.status`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import zmq

import edgepipe
from edgepipe.daemon import health, reload, status
from edgepipe.daemon.control import Control, ControlError, identity, pack, parse_identity, unpack
from edgepipe.daemon.exposition import MetricsServer, PipelineView
from edgepipe.daemon.plan import WorkerPlan, build_plan
from edgepipe.daemon.process import Exit, RestartPolicy, State, WorkerProcess, exit_text
from edgepipe.daemon.stages import StageBook
from edgepipe.daemon.worker import EXIT_CRASHED, EXIT_START_FAILED
from edgepipe.graph import Pipeline
from edgepipe.runtime import (
    RuntimeDir,
    RuntimeDirError,
    configure_logging,
    open_runtime_dir,
    read_position,
    running_daemons,
)
from edgepipe.systemd import Notifier

__all__ = ["StartError", "Supervisor", "run_daemon"]

log = logging.getLogger("edgepipe.supervisor")

EXIT_OK, EXIT_FAILED, EXIT_FORCED = 0, 1, 130
SAID_WHY = (EXIT_CRASHED, EXIT_START_FAILED)  # a worker exiting so has sent FAILED first
REASON_WAIT_S = 0.5  # how long its exit waits for that message
RECONFIGURE_TIMEOUT_S = 10.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StartError(Exception):
    """The daemon cannot start; one line naming the setting and the reason."""


class Supervisor:
    """One daemon run (see the module docstring); :meth:`run` returns the exit code."""

    def __init__(self, pipeline: Pipeline, status_stream: Any = None) -> None:
        self.p = pipeline
        self.rt = pipeline.config.runtime
        self.stream = status_stream or sys.stderr
        self.notifier = Notifier(unset_environment=True)
        self.book = StageBook(pipeline)
        self.policy = RestartPolicy(self.rt.restart_limit, self.rt.restart_window)
        self.workers: Dict[str, WorkerProcess] = {}
        self.fresh: set = set()  # sources whose settings a reload changed: resume at 0
        self.signals: List[int] = []
        self.sigints = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.started = False  # every worker was READY once
        self.run_started = self.run_started_wall = 0.0
        self.rundir: Optional[RuntimeDir] = None
        self.server: Optional[MetricsServer] = None
        self.ctx = zmq.Context()
        self.router: Optional[zmq.Socket] = None
        self.status = status.StatusOutput(self.stream, self.rt.status_interval, self.notifier)
        self.next_watchdog = 0.0

    # -- set-up ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Runtime dir, metrics endpoint and control socket; StartError naming what failed."""
        try:
            self.rundir = open_runtime_dir(self.rt.dir, self.p.name)
            self.rundir.check_lengths(self.p.specs)
        except RuntimeDirError as exc:
            raise StartError(f"runtime.dir: {exc}") from None
        m = self.p.config.metrics
        if m.enabled:
            try:
                self.server = MetricsServer(m.listen, self.view, self.health, m.auth)
            except (OSError, ValueError) as exc:
                text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                in_use = isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
                raise StartError(
                    f"metrics.listen: cannot listen on {m.listen!r}: {text}"
                    + (in_use_hint(self.p, "metrics.listen") if in_use else "")
                ) from None
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.router.bind(self.rundir.control_endpoint)

    # -- metrics and health (also called from the HTTP thread) ----------------------------------

    def up(self) -> Dict[str, bool]:
        return {n: w.ready for n, w in self.workers.items()}

    def view(self) -> PipelineView:
        return self.book.view(self.p, dict(self.workers), edgepipe.__version__)

    def observations(self) -> Dict[str, health.Observation]:
        silent_after = max(1.0, 3 * self.rt.heartbeat_interval)
        return self.book.observations(self.p, dict(self.workers), silent_after, self.run_started_wall)

    def health(self) -> Tuple[bool, Dict[str, Any]]:
        return health.report(self.observations(), time.time(), self.started)

    # -- workers ---------------------------------------------------------------------------------

    def plan_for(self, w: WorkerProcess, p: Optional[Pipeline] = None, incarnation: Optional[int] = None) -> WorkerPlan:
        assert self.rundir is not None
        p = p or self.p
        # A restarted source continues its frame ids (and a finite one its position) where the
        # previous incarnation left them; a source whose settings changed starts afresh.
        resume = {s: 0 if s in self.fresh else read_position(self.rundir.position_path(s))
                  for s in w.stages if p.kind(s) == "source"}
        return build_plan(p, self.rundir, w.name, incarnation or w.incarnation or 1, self.book.ended, resume)

    def spawn(self, w: WorkerProcess) -> None:
        plan = self.plan_for(w, incarnation=w.next_incarnation())
        self.fresh -= set(w.stages)
        w.spawn(plan)

    def send(self, w: WorkerProcess, kind: Control, body: Optional[Dict[str, Any]] = None) -> None:
        assert self.router is not None
        try:
            self.router.send_multipart([identity(w.name, w.incarnation), *pack(kind, body)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("Control message %s to %r not sent: %s", kind.value, w.name, exc)

    def on_message(self, parts: List[bytes]) -> None:
        try:
            name, incarnation = parse_identity(parts[0])
            kind, body = unpack(parts[1:])
        except (ControlError, IndexError) as exc:
            log.warning("Malformed control message: %s", exc)
            return
        w = self.workers.get(name)
        if w is None or w.incarnation != incarnation:
            return  # a previous incarnation's last words
        w.last_heartbeat = time.monotonic()
        if kind == Control.HEARTBEAT:
            ended = self.book.heartbeat(w.name, w.stages, body)
            if ended:  # a consumer restarted after the end marker was sent would wait forever
                for other in self.workers.values():
                    if other is not w and other.ready:
                        self.send(other, Control.ENDED, {"stages": ended})
        elif kind == Control.READY:
            self.on_ready(w, body)
        elif kind == Control.FAILED:
            w.reason = str(body.get("reason", "unknown"))
        elif kind == Control.FINISHED:
            w.on_finished()  # it waits for EXIT (see may_exit)
        elif kind == Control.RECONFIGURED:
            self.on_reconfigured(w, body.get("stages") or {})

    def on_ready(self, w: WorkerProcess, body: Dict[str, Any]) -> None:
        clash = self.book.series_clash(w.stages, body.get("series") or {})
        if clash:  # refused like a failed start: the exit logs the reason
            w.kill(clash)
            return
        w.on_ready()
        self.book.ready(w.stages, body)
        if self.book.ended:
            self.send(w, Control.ENDED, {"stages": sorted(self.book.ended)})
        if self.stopping:
            self.send(w, Control.STOP)
        elif self.started:
            self.send(w, Control.RUN)
            log.info("Worker %r is up again (stages %s)", w.name, ", ".join(w.stages))

    def on_exit(self, w: WorkerProcess, code: int) -> None:
        self.book.worker_exited(w.stages)
        why = w.reason or exit_text(code)
        was_ready = w.state in (State.READY, State.FINISHED)
        outcome, delay = w.on_exit(code, self.started, self.stopping)
        if outcome == Exit.REPLACED:
            self.spawn(w)
            w.view.restarts += 1
        elif outcome == Exit.ENDED:
            with self.book.lock:
                self.book.ended.update(w.stages)
            log.info("Worker %r finished", w.name)
        elif outcome == Exit.FAILED_START:
            in_use = "already in use" in why.lower()
            log.error("Worker %r failed to start: %s%s", w.name, why, in_use_hint(self.p, w.stages) if in_use else "")
            self.abort(EXIT_FAILED)
        elif outcome == Exit.GIVE_UP:
            log.error("Giving up: worker %r (stages %s) failed %d times within %.0f s; last: %s",
                      w.name, ", ".join(w.stages), len(w.crashes), self.rt.restart_window, why)
            self.begin_stop(EXIT_FAILED)
        elif outcome == Exit.RESTART:
            state = "" if was_ready else " before it was ready"
            log.warning("Worker %r died%s (%s); restarting in %.1f s", w.name, state, why, delay)

    def on_reconfigured(self, w: WorkerProcess, applied: Dict[str, bool]) -> None:
        w.reconfigure_deadline = None
        self.fresh -= {n for n, ok in applied.items() if ok}  # changed in place: keeps its position
        refused = [n for n, ok in applied.items() if not ok]
        if refused:
            log.info("Restarting worker %r: %s cannot change in place", w.name, ", ".join(refused))
            self.replace(w)

    def replace(self, w: WorkerProcess) -> None:
        """Replace the worker's process (new plan), without end markers: it is not a crash."""
        if w.replace():
            self.spawn(w)

    def read_messages(self, timeout_ms: int) -> None:
        """Handle the control messages that arrive within ``timeout_ms`` (all that are queued)."""
        assert self.router is not None
        if self.router.poll(timeout_ms, zmq.POLLIN):
            while True:
                try:
                    self.on_message(self.router.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break

    def check_workers(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            code = w.poll()
            if code is not None:
                # It sent FAILED with the reason before it exited; the message can still be on
                # its way when the exit is seen (a busy machine).
                until = time.monotonic() + REASON_WAIT_S
                while code in SAID_WHY and w.reason is None and time.monotonic() < until:
                    self.read_messages(max(1, int(1000 * (until - time.monotonic()))))
                self.on_exit(w, code)
                continue
            if w.alive:
                if w.state == State.FINISHED and not w.exit_sent and self.book.may_exit(self.p, w.name, self.up()):
                    w.exit_sent = True
                    self.send(w, Control.EXIT)
                why = w.overdue(now, self.rt.start_timeout, self.rt.hang_timeout)
                if why and w.state == State.STARTING:
                    log.warning("Worker %r was not ready within %.0f s; killing it", w.name, self.rt.start_timeout)
                    w.kill(why)
                elif why:
                    log.warning("Worker %r sent no heartbeat for %.0f s; killing it", w.name, now - w.last_heartbeat)
                    w.kill(why)
                elif w.reconfigure_deadline is not None and now > w.reconfigure_deadline:
                    log.warning("Worker %r did not answer a reconfigure; restarting it", w.name)
                    self.replace(w)
            elif w.due(now) and not self.stopping:
                w.view.restarts += 1
                self.spawn(w)

    # -- stopping --------------------------------------------------------------------------------

    def begin_stop(self, code: int = EXIT_OK) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.exit_code = max(self.exit_code, code)
        self.stop_deadline = time.monotonic() + self.rt.stop_timeout
        self.notifier.stopping()
        log.info("Stopping: draining in-flight frames (at most %g s)", self.rt.stop_timeout)
        for w in self.workers.values():
            w.cancel_restart()
            if w.alive:
                self.send(w, Control.STOP)

    def abort(self, code: int) -> None:
        """Kill every worker now (failed start-up, forced stop)."""
        self.stopping = True
        self.exit_code = max(self.exit_code, code)
        for w in self.workers.values():
            w.cancel_restart()
            w.kill()
        self.stop_deadline = time.monotonic() + self.rt.stop_timeout

    def kill_stragglers(self) -> None:
        """The drain timed out: kill what is left. In-flight frames are lost, so the daemon exits
        1 (systemd records a failed stop) unless it was already exiting with another code."""
        left = [w for w in self.workers.values() if w.alive]
        if left:
            log.error(
                "Drain incomplete: killed %d worker(s) that did not drain within %g s: %s; "
                "frames still in flight were lost",
                len(left), self.rt.stop_timeout, ", ".join(w.name for w in left),
            )
            self.exit_code = max(self.exit_code, EXIT_FAILED)
        for w in left:
            w.kill()

    # -- reload ----------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP. Whatever the new file holds, and whatever goes wrong while it is loaded,
        checked or compared, the running pipeline goes on and one line says why."""
        self.notifier.reloading()
        try:
            self._reload()
        except Exception as exc:  # noqa: BLE001 - a reload must never take the daemon down
            refused(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            log.debug("Reload failure", exc_info=True)
        finally:
            self.notifier.ready()

    def _reload(self) -> None:
        assert self.rundir is not None
        try:
            new, waiting = reload.load(self.p, self.rundir)
        except reload.Refused as exc:
            return refused(str(exc))
        for section in waiting:
            log.warning("Reload: %r changes need a restart; keeping the running ones", section)
        groups = new.workers()
        old_plans = {n: w.plan for n, w in self.workers.items() if w.plan is not None}
        new_plans = {n: self.plan_for(WorkerProcess(n, stages, self.policy), new, self.workers[n].incarnation
                                      if n in self.workers else 1) for n, stages in groups.items()}
        change = reload.diff(self.p, new, old_plans, new_plans, {n for n, w in self.workers.items() if w.ready})
        self.p = new
        self.book.reset(new)
        self.fresh |= change.fresh_sources
        for name in change.removed_sources:
            try:
                os.unlink(self.rundir.position_path(name))  # a later stage of that name starts at 0
            except OSError:
                pass
        for name in change.stop:
            w = self.workers.pop(name)
            w.cancel_restart()
            if w.alive:
                w.replace()
                w.wait()
        for name in change.start:
            self.workers[name] = WorkerProcess(name, groups[name], self.policy)
            self.spawn(self.workers[name])
        for name, w in self.workers.items():
            w.stages = groups[name]
            if name in change.reconfigure:
                w.plan = new_plans[name]
                w.reconfigure_deadline = time.monotonic() + RECONFIGURE_TIMEOUT_S
                self.send(w, Control.RECONFIGURE, {"stages": change.reconfigure[name]})
            elif name in change.restart:
                self.replace(w)
        log.info("Reloaded %r: %s", self.p.path, change.summary())

    # -- status ----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Periodic work: /proc samples, status output, systemd status and watchdog."""
        for w in self.workers.values():
            w.view.sample()
        title = (f"edgepipe {self.p.name}: {len(self.p.specs)} stages, running "
                 f"{status.duration(time.monotonic() - self.run_started)}")
        self.status.tick(title, self.book.current(), lambda: self.book.states(self.observations()),
                         self.book.expected, self.unhealthy)
        interval = self.notifier.watchdog_interval
        if interval and time.monotonic() >= self.next_watchdog and health.watchdog_ok(self.health()[1]):
            self.notifier.watchdog()
            self.next_watchdog = time.monotonic() + interval

    def unhealthy(self) -> List[str]:
        """``stage state (reason)`` of each stalled, down or failing stage."""
        _, body = self.health()
        return [f"{n} {st['state']}" + (f" ({st['reason']})" if st.get("reason") else "")
                for n, st in body["stages"].items() if n in body["stalled"] + body["failing"]]

    # -- main ------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # the main loop acts on it

    def handle_signals(self) -> bool:
        """Act on pending signals; False when the daemon must exit now (forced)."""
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGHUP:
                if not self.stopping:
                    log.info("SIGHUP: reloading %r", self.p.path)
                    self.reload()
                continue
            if sig == signal.SIGINT:
                self.sigints += 1
                if self.sigints >= 2:
                    log.warning("Second SIGINT: killing every worker now; frames in flight are lost "
                                "and files being written end where they are")
                    self.abort(EXIT_FORCED)
                    return False
                if self.status.tty:
                    log.info("Ctrl-C again kills every worker at once: frames in flight are lost")
            log.info("%s: stopping", signal.Signals(sig).name)
            self.begin_stop()
        return True

    def run(self) -> int:
        assert self.router is not None
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        if self.server is not None:
            self.server.start()
        for name, stages in self.p.workers().items():
            self.workers[name] = WorkerProcess(name, stages, self.policy)
            self.spawn(self.workers[name])
        while self.handle_signals():
            self.read_messages(100)
            self.check_workers()
            if not self.started and not self.stopping and all(w.ready for w in self.workers.values()):
                self.go()
            if self.started or self.stopping:
                self.tick()
            if all(w.settled for w in self.workers.values()):
                if not self.stopping:
                    self.status.close()
                    log.info("%s", status.summary(self.book.current(), time.monotonic() - self.run_started))
                break
            if self.stopping and time.monotonic() >= self.stop_deadline:
                self.kill_stragglers()
                for w in self.workers.values():
                    code = w.wait()
                    if code is not None:
                        self.on_exit(w, code)
                break
        if self.exit_code == EXIT_OK and self.stopping:
            log.info("Stopped")
        return self.exit_code

    def go(self) -> None:
        self.started = True
        self.run_started, self.run_started_wall = time.monotonic(), time.time()
        for w in self.workers.values():
            self.send(w, Control.RUN)
        where = f", metrics on http://{self.server.address}/metrics" if self.server else ""
        log.info("Ready: %d stages in %d workers%s", len(self.p.specs), len(self.workers), where)
        for stage, addresses in self.book.addresses.items():
            for label, address in addresses.items():
                log.info("%s: %s (stage %r)", label[:1].upper() + label[1:], address, stage)
        self.notifier.ready("Running")
        self.status.start(self.book.current())

    def close(self) -> None:
        for w in self.workers.values():
            w.kill()
            w.wait()
        self.status.close()
        if self.server is not None:
            self.server.close()
        if self.router is not None:
            self.router.close(linger=0)
        self.ctx.term()
        if self.rundir is not None:
            self.rundir.close()
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def in_use_hint(p: Pipeline, where: Any) -> str:
    """What to do about an address in use: the setting (and the variable it came from) to
    change, and the other daemon of this name that holds it, if one runs. ``where`` is the
    setting, or the stages whose start failed (their settings that came from variables are
    named, else the stages)."""
    others = running_daemons(p.name)
    settings = [where] if isinstance(where, str) else p.variable_settings(where) or [f"stages.{s}" for s in where]
    hint = "; change " + " or ".join(s + p.hint(s) for s in settings)
    if others:
        hint += f"; another edgepipe daemon named {p.name!r} is running (pid {', '.join(map(str, others))})"
    return hint


def refused(reason: str) -> None:
    log.error("Reload refused, still running the previous config: %s", reason)


def run_daemon(pipeline: Pipeline) -> int:
    """``edgepipe run``: pre-flight, start, supervise, stop; the process exit code."""
    configure_logging(pipeline.config.runtime.log_level, "supervisor")
    try:
        import setproctitle

        setproctitle.setproctitle(f"edgepipe: {pipeline.name} supervisor")
    except ImportError:
        pass
    errors = pipeline.preflight()
    if errors:
        for line in errors:
            stage = line.split(":", 1)[0][len("stages."):] if line.startswith("stages.") else None
            if stage in pipeline.specs and "already in use" in line.lower():
                line += in_use_hint(pipeline, [stage])
            sys.stderr.write(f"edgepipe: error: {line}\n")
        return EXIT_FAILED
    sup = Supervisor(pipeline)
    try:
        sup.open()
    except StartError as exc:
        sys.stderr.write(f"edgepipe: error: {exc}\n")
        sup.close()
        return EXIT_FAILED
    try:
        return sup.run()
    finally:
        sup.close()
