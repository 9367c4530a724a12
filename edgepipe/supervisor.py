"""The supervisor: starts the workers, watches them, serves metrics, and alone handles signals.

``run_daemon(pipeline)`` is ``edgepipe run``. In order: each stage's ``check()`` (pre-flight: a
missing camera or weights file fails here, before any process starts); the runtime directory and
the metrics endpoint (a taken port fails here too); one worker process per stage or per
``worker:`` group, spawned with ``python -m edgepipe.worker`` and its plan on stdin; wait until
every worker is READY (models loaded and warmed), then RUN (sources start reading) and tell
systemd READY=1.

The main loop (one thread; signal handlers only set flags) then:

- restarts a worker that died or hung (no heartbeat for ``runtime.hang_timeout`` s) with
  exponential backoff, and gives up, exiting 1 with the reason, when one worker needed
  ``runtime.restart_limit`` restarts within ``runtime.restart_window`` s;
- SIGTERM/SIGINT: STOP to every worker: sources end, the end markers drain the in-flight frames
  through the sinks, workers exit; exit 0. What is left after ``runtime.stop_timeout`` is killed
  and the exit code is 1 (a drain that lost frames is a failure).
  A second SIGINT kills everything at once (exit 130);
- SIGHUP: re-read the config file; an invalid one is logged and the running pipeline keeps going;
  otherwise unchanged workers keep running, stages whose settings changed get ``reconfigure()``
  in place, and workers whose stages were added, removed, relinked, or refused to reconfigure are
  restarted with the new plan;
- when every source is finite and has ended and everything drained: a one-line summary, exit 0;
- keeps the per-stage metrics from the heartbeats (monotonic across restarts), samples each
  worker's RSS and CPU time from /proc, serves ``/metrics`` and ``/healthz``, pings the systemd
  watchdog only while no stage is stalled (see :meth:`Supervisor.health`: a stage with nothing
  to do is idle, not stalled), and shows a live status (in place on a terminal,
  one log line every ``runtime.status_interval`` s otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import msgpack
import zmq

import edgepipe
from edgepipe.config import ConfigError, Pipeline, load_config
from edgepipe.metrics import MetricsServer, PipelineView, StageTotals, WorkerView, check_series
from edgepipe.runtime import (
    RuntimeDir,
    RuntimeDirError,
    configure_logging,
    open_runtime_dir,
    read_position,
)
from edgepipe.stage import Processor, StageError
from edgepipe.systemd import Notifier
from edgepipe.transport import inproc_endpoint

__all__ = ["Supervisor", "plan_worker", "run_daemon"]

log = logging.getLogger("edgepipe.supervisor")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_FORCED = 130
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
RECONFIGURE_TIMEOUT_S = 10.0
SYSTEMD_STATUS_INTERVAL_S = 5.0
TTY_REFRESH_S = 1.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def plan_worker(
    p: Pipeline,
    rundir: RuntimeDir,
    worker: str,
    incarnation: int,
    ended: Set[str],
    resume: Optional[Dict[str, int]] = None,
) -> Dict[str, Any]:
    """What a worker runs, as JSON-able data (sent on its stdin): its stages in data-flow order
    with their settings, input endpoints and policy, outputs (one per consumer), upstream stages
    (those already ended listed apart), batching, and for sources the position file and the frame
    id to resume at (``resume``: source -> id, default 0)."""
    groups = p.workers()
    mine = groups[worker]
    where = {s: w for w, ss in groups.items() for s in ss}
    order = [n for n in p.flow_order() if n in mine]
    stages = []
    for name in order:
        cfg = p.stages[name]
        cls = p.classes[name]
        local = [i for i in cfg.inputs if where[i] == worker]
        spec: Dict[str, Any] = {
            "name": name,
            "type": p.types[name],
            "settings": cfg.model_dump(mode="json"),
            "upstream": list(cfg.inputs),
            "ended_upstream": sorted(set(cfg.inputs) & ended),
            "input": None,
            "outputs": [],
            "batch": None,
        }
        if p.kind(name) == "source":
            spec["position"] = rundir.position_path(name)
            spec["resume"] = (resume or {}).get(name, 0)
        if cfg.inputs:
            endpoints = []
            if len(local) < len(cfg.inputs):
                endpoints.append(rundir.input_endpoint(name))
            if local:
                endpoints.append(inproc_endpoint(name))
            spec["input"] = {"endpoints": endpoints, "policy": p.policies[name]}
        for consumer in p.consumers(name):
            same = where[consumer] == worker
            spec["outputs"].append(
                {
                    "consumer": consumer,
                    "endpoint": inproc_endpoint(consumer) if same else rundir.input_endpoint(consumer),
                    "policy": p.policies[consumer],
                }
            )
        fields = type(cfg).model_fields
        if issubclass(cls, Processor) and "max_batch" in fields and "max_wait_ms" in fields:
            spec["batch"] = {
                "max_batch": int(getattr(cfg, "max_batch")),  # noqa: B009 - plugin-defined field
                "max_wait_ms": float(getattr(cfg, "max_wait_ms")),  # noqa: B009
            }
        stages.append(spec)
    rt = p.config.runtime
    return {
        "pipeline": p.config.name,
        "worker": worker,
        "incarnation": incarnation,
        "control": rundir.control_endpoint,
        "supervisor_pid": os.getpid(),
        "runtime_dir": rundir.path,
        "log_level": rt.log_level,
        "heartbeat_interval": rt.heartbeat_interval,
        "stages": stages,
    }


def _structure(plan: Dict[str, Any]) -> str:
    """A plan without stage settings: equal structures can be reconfigured in place."""
    stages = [dict(s, settings=None, ended_upstream=None, resume=None) for s in plan["stages"]]
    bare = dict(plan, incarnation=0, stages=stages)
    return json.dumps(bare, sort_keys=True)


class WorkerState:
    """The supervisor's record of one worker (its current process and history)."""

    def __init__(self, name: str, stages: List[str]) -> None:
        self.name = name
        self.stages = stages
        self.proc: Optional[subprocess.Popen] = None
        self.plan: Dict[str, Any] = {}
        self.incarnation = 0
        self.ready = False
        self.ready_wall = 0.0  # unix time of the last READY
        self.started_at = 0.0
        self.last_heartbeat = 0.0
        self.finished = False  # all its stages ended; it exits on its own
        self.exit_sent = False
        self.exiting = False  # told to exit (reload restart), not a crash
        self.crashes: List[float] = []
        self.restart_at: Optional[float] = None
        self.reason: Optional[str] = None
        self.reconfigure_deadline: Optional[float] = None
        self.view = WorkerView(name)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """One daemon run (see the module docstring); :meth:`run` returns the exit code."""

    def __init__(self, pipeline: Pipeline, status_stream: Any = None) -> None:
        self.p = pipeline
        self.rt = pipeline.config.runtime
        self.stream = status_stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.notifier = Notifier(unset_environment=True)
        self.lock = threading.Lock()
        self.workers: Dict[str, WorkerState] = {}
        self.totals: Dict[str, StageTotals] = {}
        self.ended: Set[str] = set()
        self.eos_from: Dict[str, Set[str]] = {}  # stage -> upstream stages whose end marker it got
        self.activity: Dict[str, Tuple[float, bool]] = {}  # stage -> (work_since, blocked), see health()
        self.fresh: Set[str] = set()  # sources whose settings a reload changed: resume at 0
        self.signals: List[int] = []
        self.sigints = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.started = False  # every worker was READY once
        self.run_started = 0.0
        self.run_started_wall = 0.0
        self.rundir: Optional[RuntimeDir] = None
        self.server: Optional[MetricsServer] = None
        self.ctx = zmq.Context()
        self.router: Optional[zmq.Socket] = None
        self.board: Optional[StatusBoard] = None
        self.status_prev: Dict[str, Tuple[float, Dict[str, Tuple[float, ...]]]] = {}
        self.next_status = 0.0
        self.next_systemd_status = 0.0
        self.next_watchdog = 0.0
        self._reset_stages()

    # -- set-up ----------------------------------------------------------------------------------

    def _reset_stages(self) -> None:
        for name in self.p.stages:
            if name not in self.totals:
                self.totals[name] = StageTotals(name, self.p.classes[name].kind)
        for name in list(self.totals):
            if name not in self.p.stages:
                del self.totals[name]

    def open(self) -> None:
        """Runtime dir, metrics endpoint and control socket; StartError naming what failed."""
        try:
            self.rundir = open_runtime_dir(self.rt.dir, self.p.config.name)
            self.rundir.check_lengths(self.p.stages)
        except RuntimeDirError as exc:
            raise StartError(f"runtime.dir: {exc}") from None
        m = self.p.config.metrics
        if m.enabled:
            try:
                self.server = MetricsServer(m.listen, self.view, self.health, m.auth)
            except (OSError, ValueError) as exc:
                text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise StartError(f"metrics.listen: cannot listen on {m.listen!r}: {text}") from None
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.router.bind(self.rundir.control_endpoint)

    # -- metrics and health (called from the HTTP thread) ---------------------------------------

    def view(self) -> PipelineView:
        with self.lock:
            stages = []
            for name, t in self.totals.items():
                w = self.workers.get(self.worker_of(name))
                stages.append((t.current(), bool(w and w.ready and w.alive)))
            workers = [w.view for w in self.workers.values()]
            return PipelineView(stages, workers, edgepipe.__version__)

    def worker_of(self, stage: str) -> str:
        settings = self.p.stages.get(stage)
        return (settings.worker if settings is not None else None) or stage

    def health(self) -> Tuple[bool, Dict[str, Any]]:
        """``(healthy, body)`` for /healthz and the watchdog: healthy while no stage is stalled.

        Each stage's state: ``ended``; ``down`` (its worker is not running and ready: stalled);
        ``blocked`` (waiting for room on a downstream link: the stall, if any, is downstream);
        ``idle`` (a processor or sink with no input waiting and no progress for
        ``stall_timeout``: nothing to progress on, as behind a source outage); ``stalled`` when it has work and made no progress for ``stall_timeout``;
        else ``ok``. A source always has work (it should produce); a processor or sink has work
        while input waits for it, or when its worker has sent no heartbeat for a while (stuck in
        a call, or frozen). Time counts from the stage's last progress, but never from before
        its worker became ready, the pipeline started running, or its input started waiting:
        a stage that became ready while a slow detector was still loading is not stalled."""
        now = time.time()
        mono = time.monotonic()
        silent_after = max(1.0, 3 * self.rt.heartbeat_interval)
        with self.lock:
            stages: Dict[str, Any] = {}
            stalled: List[str] = []
            failing: List[str] = []
            for name, t in self.totals.items():
                w = self.workers.get(self.worker_of(name))
                up = bool(w and w.ready and w.alive)
                since = max(t.current().last_progress.value, w.ready_wall if w else 0.0, self.run_started_wall)
                work_since, blocked = self.activity.get(name, (0.0, False))
                silent = w is not None and mono - w.last_heartbeat > silent_after
                timeout = self.p.stages[name].stall_timeout
                if self.p.kind(name) == "source":
                    waiting = now - since
                elif silent or work_since:
                    waiting = now - max(since, work_since)
                else:
                    waiting = None
                problem = t.current().problem if up else None
                if name in self.ended:
                    state = "ended"
                elif not up:
                    state = "down"
                elif blocked and not silent:
                    state = "blocked"
                elif waiting is None:
                    state = "ok" if now - since <= timeout else "idle"
                else:
                    state = "stalled" if waiting > timeout else "ok"
                if problem and state in ("ok", "idle"):
                    state = "failing"  # running, but it says it cannot do its job
                if state in ("down", "stalled"):
                    stalled.append(name)
                elif state == "failing":
                    failing.append(name)
                stages[name] = {
                    "state": state,
                    "reason": problem,
                    "up": up,
                    "ended": name in self.ended,
                    "seconds_since_progress": round(now - since, 3),
                    "stall_timeout": timeout,
                }
        body = {"stalled": stalled, "failing": failing, "stages": stages}
        if not self.started:
            return False, {"status": "starting", **body}
        status = "stalled" if stalled else ("failing" if failing else "ok")
        return status == "ok", {"status": status, **body}

    # -- workers ---------------------------------------------------------------------------------

    def spawn(self, w: WorkerState) -> None:
        assert self.rundir is not None
        w.incarnation += 1
        # A restarted source continues its frame ids (and a finite one its position) where the
        # previous incarnation left them; a source whose settings changed starts afresh.
        resume = {
            s: 0 if s in self.fresh else read_position(self.rundir.position_path(s))
            for s in w.stages
            if self.p.kind(s) == "source"
        }
        self.fresh -= set(w.stages)
        w.plan = plan_worker(self.p, self.rundir, w.name, w.incarnation, self.ended, resume)
        # Workers inherit a blocked SIGINT/SIGTERM/SIGHUP and ignore them before unblocking, so
        # a group-wide signal cannot kill one while it starts; ours arrive once unblocked here.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(_SIGNALS))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgepipe.worker"], stdin=subprocess.PIPE, close_fds=True
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(w.plan).encode())
            proc.stdin.close()
        except OSError:
            pass  # it died at once; the exit is handled like any other
        with self.lock:
            w.proc = proc
            w.restart_at = None
            w.ready = False
            w.finished = False
            w.exit_sent = False
            w.exiting = False
            w.reason = None
            w.started_at = time.monotonic()
            w.last_heartbeat = w.started_at
            w.view.pid = proc.pid
            w.view.up = False
        log.debug("Started worker %r (pid %d, stages %s)", w.name, proc.pid, ", ".join(w.stages))

    def send(self, w: WorkerState, kind: str, body: Optional[Dict[str, Any]] = None) -> None:
        assert self.router is not None
        ident = f"{w.name}:{w.incarnation}".encode()
        try:
            self.router.send_multipart(
                [ident, kind.encode(), msgpack.packb(body or {}, use_bin_type=True)], zmq.NOBLOCK
            )
        except zmq.ZMQError as exc:
            log.debug("Control message %s to %r not sent: %s", kind, w.name, exc)

    def on_message(self, parts: List[bytes]) -> None:
        if len(parts) < 2:
            return
        ident = parts[0].decode(errors="replace")
        name, _, inc = ident.rpartition(":")
        w = self.workers.get(name)
        if w is None or str(w.incarnation) != inc:
            return  # a previous incarnation's last words
        kind = parts[1].decode(errors="replace")
        try:
            body = msgpack.unpackb(parts[2], raw=False) if len(parts) > 2 else {}
        except Exception:
            log.warning("Malformed control message %r from worker %r", kind, name)
            return
        w.last_heartbeat = time.monotonic()
        if kind == "HEARTBEAT":
            self.on_heartbeat(w, body)
        elif kind == "READY":
            self.on_ready(w, body)
        elif kind == "FAILED":
            w.reason = str(body.get("reason", "unknown"))
        elif kind == "FINISHED":
            w.finished = True  # it waits for EXIT (see may_exit)
        elif kind == "RECONFIGURED":
            self.on_reconfigured(w, body.get("stages", {}))

    def on_heartbeat(self, w: WorkerState, body: Dict[str, Any]) -> None:
        newly_ended = []
        with self.lock:
            for name, st in (body.get("stages") or {}).items():
                if name not in w.stages or name not in self.totals:
                    continue
                try:
                    self.totals[name].update(st["metrics"])
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("Bad metrics snapshot from worker %r: %s", w.name, exc)
                    continue
                self.eos_from[name] = set(st.get("eos_from") or [])
                self.activity[name] = (float(st.get("work_since") or 0.0), bool(st.get("blocked")))
                if st.get("ended") and name not in self.ended:
                    self.ended.add(name)
                    newly_ended.append(name)
        if newly_ended:
            # A consumer restarted after the end marker was sent would wait forever without this.
            for other in self.workers.values():
                if other is not w and other.alive and other.ready:
                    self.send(other, "ENDED", {"stages": newly_ended})

    def on_ready(self, w: WorkerState, body: Dict[str, Any]) -> None:
        clash = self.series_clash(w, body.get("series") or {})
        if clash:  # refused like a failed start: on_exit logs the reason
            w.reason = clash
            assert w.proc is not None
            w.proc.kill()
            return
        with self.lock:
            w.ready = True
            w.ready_wall = time.time()
            w.view.up = True
        log.debug("Worker %r ready", w.name)
        if self.ended:
            self.send(w, "ENDED", {"stages": sorted(self.ended)})
        if self.stopping:
            self.send(w, "STOP")
        elif self.started:
            self.send(w, "RUN")
            log.info("Worker %r is up again (stages %s)", w.name, ", ".join(w.stages))

    def series_clash(self, w: WorkerState, series: Dict[str, Any]) -> Optional[str]:
        """The first clash between the series this worker's stages declare and those the other
        stages declared (see :func:`edgepipe.metrics.check_series`), or None."""
        declared: Dict[str, Any] = {}
        with self.lock:
            for name, t in self.totals.items():
                if name not in w.stages:
                    declared[name] = [s.spec() for s in t.current().series.values()]
        for name in w.stages:
            if isinstance(series.get(name), list):
                declared[name] = series[name]
        try:
            errors = check_series(declared)
        except (AttributeError, KeyError, TypeError):
            return "sent a malformed list of declared series"
        mine = [e for e in errors if any(e.startswith(f"stage {n!r}") for n in w.stages)]
        return mine[0] if mine else None

    def on_exit(self, w: WorkerState, code: int) -> None:
        with self.lock:
            for name in w.stages:
                self.activity.pop(name, None)
                if name in self.totals:
                    self.totals[name].worker_exited()
            w.view.exited()
            w.proc = None
            was_ready = w.ready
            w.ready = False
        if self.stopping:
            return
        if w.exiting:
            self.spawn(w)  # a planned restart (reload)
            with self.lock:
                w.view.restarts += 1
            return
        if code == 0 and w.finished:
            with self.lock:
                self.ended.update(w.stages)
            log.info("Worker %r finished", w.name)
            return
        why = w.reason or _exit_text(code)
        if not self.started:
            log.error("Worker %r failed to start: %s", w.name, why)
            self.abort(EXIT_FAILED)
            return
        now = time.monotonic()
        w.crashes = [t for t in w.crashes if now - t <= self.rt.restart_window] + [now]
        if len(w.crashes) >= self.rt.restart_limit:
            log.error(
                "Giving up: worker %r (stages %s) failed %d times within %.0f s; last: %s",
                w.name, ", ".join(w.stages), len(w.crashes), self.rt.restart_window, why,
            )
            self.begin_stop(EXIT_FAILED)
            return
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (len(w.crashes) - 1))
        state = "" if was_ready else " before it was ready"
        log.warning("Worker %r died%s (%s); restarting in %.1f s", w.name, state, why, delay)
        w.restart_at = now + delay

    def on_reconfigured(self, w: WorkerState, applied: Dict[str, bool]) -> None:
        w.reconfigure_deadline = None
        self.fresh -= {n for n, ok in applied.items() if ok}  # changed in place: keeps its position
        refused = [n for n, ok in applied.items() if not ok]
        if refused:
            log.info("Restarting worker %r: %s cannot change in place", w.name, ", ".join(refused))
            self.restart_planned(w)

    def restart_planned(self, w: WorkerState) -> None:
        """Replace the worker's process (new plan), without end markers: it is not a crash."""
        if w.alive:
            w.exiting = True
            assert w.proc is not None
            w.proc.kill()
        else:
            self.spawn(w)

    def may_exit(self, w: WorkerState) -> bool:
        """A finished worker may exit once every consumer in another process got its end
        markers (or is not running, so nothing more can reach it)."""
        for stage in w.stages:
            for consumer in self.p.consumers(stage):
                cw = self.workers.get(self.worker_of(consumer))
                if cw is None or cw is w or not (cw.alive and cw.ready):
                    continue
                if stage not in self.eos_from.get(consumer, set()) and consumer not in self.ended:
                    return False
        return True

    def check_workers(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.proc is not None:
                code = w.proc.poll()
                if code is not None:
                    self.on_exit(w, code)
                    continue
                if w.finished and not w.exit_sent and self.may_exit(w):
                    w.exit_sent = True
                    self.send(w, "EXIT")
                if w.ready and now - w.last_heartbeat > self.rt.hang_timeout:
                    w.reason = f"no heartbeat for {now - w.last_heartbeat:.0f} s (hung)"
                    log.warning("Worker %r sent no heartbeat for %.0f s; killing it", w.name, now - w.last_heartbeat)
                    w.proc.kill()
                elif not w.ready and now - w.started_at > self.rt.start_timeout:
                    w.reason = f"not ready within runtime.start_timeout={self.rt.start_timeout:g} s"
                    log.warning("Worker %r was not ready within %.0f s; killing it", w.name, self.rt.start_timeout)
                    w.proc.kill()
                elif w.reconfigure_deadline is not None and now > w.reconfigure_deadline:
                    w.reconfigure_deadline = None
                    log.warning("Worker %r did not answer a reconfigure; restarting it", w.name)
                    self.restart_planned(w)
            elif w.restart_at is not None and now >= w.restart_at and not self.stopping:
                w.restart_at = None
                with self.lock:
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
            w.restart_at = None
            if w.alive:
                self.send(w, "STOP")

    def abort(self, code: int) -> None:
        """Kill every worker now (failed start-up, forced stop)."""
        self.stopping = True
        self.exit_code = max(self.exit_code, code)
        for w in self.workers.values():
            w.restart_at = None
            if w.alive:
                assert w.proc is not None
                w.proc.kill()
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
            assert w.proc is not None
            w.proc.kill()

    # -- reload ----------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP. Whatever the new file holds, and whatever goes wrong while it is loaded,
        checked or compared, the running pipeline goes on and one line says why."""
        self.notifier.reloading()
        try:
            self._reload()
        except Exception as exc:  # noqa: BLE001 - a reload must never take the daemon down
            log.error(
                "Reload refused, still running the previous config: %s: %s",
                type(exc).__name__, " ".join(str(exc).split())[:300],
            )
            log.debug("Reload failure", exc_info=True)
        finally:
            self.notifier.ready()

    def _reload(self) -> None:
        assert self.p.path is not None and self.rundir is not None
        try:
            new = load_config(self.p.path)
        except ConfigError as exc:
            log.error(
                "Reload refused, still running the previous config: %s%s",
                exc.errors[0], f" (and {len(exc.errors) - 1} more)" if len(exc.errors) > 1 else "",
            )
            return
        changed = [n for n in new.stages if self.p.settings.get(n) != new.settings.get(n)]
        problems = preflight(new, changed)
        if problems:
            log.error("Reload refused, still running the previous config: %s", problems[0])
            return
        for section in ("name", "metrics", "runtime"):
            if getattr(new.config, section) != getattr(self.p.config, section):
                log.warning("Reload: %r changes need a restart; keeping the running ones", section)
        new.config = new.config.model_copy(
            update={"name": self.p.config.name, "metrics": self.p.config.metrics, "runtime": self.p.config.runtime}
        )
        try:
            self.rundir.check_lengths(new.stages)
        except RuntimeDirError as exc:
            log.error("Reload refused, still running the previous config: runtime.dir: %s", exc)
            return
        old_plans = {n: w.plan for n, w in self.workers.items()}
        old_p = self.p
        with self.lock:
            self.p = new
            self._reset_stages()
            self.ended &= set(new.stages)
        self.fresh |= {n for n in changed if new.kind(n) == "source"}
        for name in set(old_p.stages) - set(new.stages):
            if old_p.kind(name) == "source":
                try:
                    os.unlink(self.rundir.position_path(name))  # a later stage of that name starts at 0
                except OSError:
                    pass
        groups = new.workers()
        kept = reconfigured = restarted = 0
        for name in list(self.workers):
            if name not in groups:
                w = self.workers.pop(name)
                w.restart_at = None
                if w.alive:
                    assert w.proc is not None
                    w.exiting = True
                    w.proc.kill()
                    w.proc.wait()
                restarted += 1
        for name, stages in groups.items():
            if name not in self.workers:
                self.workers[name] = WorkerState(name, stages)
                self.spawn(self.workers[name])
                restarted += 1
                continue
            w = self.workers[name]
            w.stages = stages
            plan = plan_worker(new, self.rundir, name, w.incarnation, self.ended)
            old = old_plans.get(name)
            if old is not None and _structure(old) == _structure(plan):
                diff = {
                    s["name"]: s["settings"]
                    for s, o in zip(plan["stages"], old["stages"])
                    if s["settings"] != o["settings"]
                }
                if not diff:
                    kept += 1
                    continue
                if w.alive and w.ready:
                    w.plan = plan
                    w.reconfigure_deadline = time.monotonic() + RECONFIGURE_TIMEOUT_S
                    self.send(w, "RECONFIGURE", {"stages": diff})
                    reconfigured += 1
                    continue
            self.restart_planned(w)
            restarted += 1
        del old_p
        log.info(
            "Reloaded %r: %d worker(s) unchanged, %d reconfiguring, %d restarted",
            self.p.path, kept, reconfigured, restarted,
        )

    # -- status ----------------------------------------------------------------------------------

    def rates(self, key: str) -> Dict[str, Dict[str, float]]:
        """Per stage since the previous call with the same ``key`` (each status output keeps its
        own interval): fps, mean processing latency (s), drops; and totals of frames and
        detections."""
        now = time.monotonic()
        prev_t, prev = self.status_prev.get(key, (0.0, {}))
        out: Dict[str, Dict[str, float]] = {}
        cur: Dict[str, Tuple[float, ...]] = {}
        with self.lock:
            for name, t in self.totals.items():
                m = t.current()
                frames = m.frames_read.value if m.kind == "source" else m.received.value
                drops = sum(c.value for c in m.dropped.children.values())
                h = m.processing_seconds
                cur[name] = (frames, drops, h.sum, float(h.count))
                f0, d0, s0, c0 = prev.get(name, (0.0, 0.0, 0.0, 0.0))
                dt = now - prev_t if prev_t else 0.0
                out[name] = {
                    "fps": (frames - f0) / dt if dt > 0 else 0.0,
                    "latency": (h.sum - s0) / (h.count - c0) if h.count > c0 else 0.0,
                    "drops": drops - d0,
                    "frames": frames,
                    "detections": m.detections_seen.value,
                    "kind_sink": 1.0 if m.kind == "sink" else 0.0,
                }
        self.status_prev[key] = (now, cur)
        return out

    def status_line(self, key: str) -> str:
        parts = []
        for name, r in self.rates(key).items():
            text = f"{name} {r['fps']:.1f} fps"
            if r["latency"]:
                text += f" {r['latency'] * 1000:.1f} ms"
            if r["drops"]:
                text += f" {r['drops']:.0f} dropped"
            if r["kind_sink"]:
                text += f" {r['detections']:.0f} detections"
            parts.append(text)
        return "; ".join(parts)

    def summary(self) -> str:
        elapsed = max(1e-6, time.monotonic() - self.run_started)
        parts = []
        with self.lock:
            for name, t in self.totals.items():
                m = t.current()
                frames = m.frames_read.value if m.kind == "source" else m.received.value
                text = f"{name} {frames:.0f} frames ({frames / elapsed:.1f} fps)"
                if m.kind == "sink":
                    text += f", {m.detections_seen.value:.0f} detections"
                parts.append(text)
        return f"Finished in {elapsed:.1f} s: " + "; ".join(parts)

    def tick(self) -> None:
        """Periodic work: /proc samples, status output, systemd status and watchdog."""
        now = time.monotonic()
        with self.lock:
            for w in self.workers.values():
                w.view.sample()
        if self.tty and self.board is not None and now >= self.next_status:
            self.next_status = now + TTY_REFRESH_S
            self.board.draw(self.board_lines())
        elif not self.tty and now >= self.next_status:
            self.next_status = now + self.rt.status_interval
            log.info("Status: %s", self.status_line("log"))
        if self.notifier.enabled and now >= self.next_systemd_status:
            self.next_systemd_status = now + SYSTEMD_STATUS_INTERVAL_S
            _, body = self.health()
            problems = [f"{n} {st['state']}" + (f" ({st['reason']})" if st.get("reason") else "")
                        for n, st in body["stages"].items() if n in body["stalled"] + body["failing"]]
            prefix = f"Unhealthy: {'; '.join(problems)} | " if problems else ""
            self.notifier.status(prefix + self.status_line("systemd"))
        interval = self.notifier.watchdog_interval
        if interval and now >= self.next_watchdog:
            ok, body = self.health()
            # A stage that reports a problem (a broker it cannot reach) keeps the watchdog fed:
            # the process is alive, and a restart would not bring the broker back.
            if ok or (self.started and not body["stalled"]):
                self.notifier.watchdog()
                self.next_watchdog = now + interval

    def board_lines(self) -> List[str]:
        lines = [f"edgepipe {self.p.config.name}: {len(self.p.stages)} stages"]
        for name, r in self.rates("board").items():
            w = self.workers.get(self.worker_of(name))
            state = "ended" if name in self.ended else ("up" if w and w.ready and w.alive else "down")
            extra = f"{r['detections']:>8.0f} det" if r["kind_sink"] else ""
            lines.append(
                f"  {name:<16} {self.p.kind(name):<9} {state:<5} {r['fps']:7.1f} fps "
                f"{r['latency'] * 1000:8.1f} ms {r['drops']:6.0f} drop {extra}"
            )
        return lines

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
                    log.warning("Second SIGINT: killing every worker now")
                    self.abort(EXIT_FORCED)
                    return False
            log.info("%s: stopping", signal.Signals(sig).name)
            self.begin_stop()
        return True

    def run(self) -> int:
        assert self.router is not None
        for sig in _SIGNALS:
            signal.signal(sig, self._on_signal)
        if self.server is not None:
            self.server.start()
        groups = self.p.workers()
        for name, stages in groups.items():
            self.workers[name] = WorkerState(name, stages)
            self.spawn(self.workers[name])
        if self.tty:
            self.board = StatusBoard(self.stream)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while True:
            if not self.handle_signals():
                break
            if poller.poll(100):
                while True:
                    try:
                        parts = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.on_message(parts)
            self.check_workers()
            if not self.started and not self.stopping and all(w.ready for w in self.workers.values()):
                self.go()
            if self.started or self.stopping:
                self.tick()
            if all(w.proc is None and w.restart_at is None for w in self.workers.values()):
                if not self.stopping:
                    log.info("%s", self.summary())
                break
            if self.stopping and time.monotonic() >= self.stop_deadline:
                self.kill_stragglers()
                for w in self.workers.values():
                    if w.proc is not None:
                        w.proc.wait()
                        self.on_exit(w, w.proc.returncode if w.proc else -9)
                break
        if self.exit_code == EXIT_OK and self.stopping:
            log.info("Stopped")
        return self.exit_code

    def go(self) -> None:
        self.started = True
        self.run_started = time.monotonic()
        self.run_started_wall = time.time()
        for w in self.workers.values():
            self.send(w, "RUN")
        where = f", metrics on http://{self.server.address}/metrics" if self.server else ""
        log.info(
            "Ready: %d stages in %d workers%s", len(self.p.stages), len(self.workers), where
        )
        self.status_line("log")  # start the intervals
        self.status_line("systemd")
        self.notifier.ready("Running")
        self.next_status = time.monotonic() + (TTY_REFRESH_S if self.tty else self.rt.status_interval)

    def close(self) -> None:
        for w in self.workers.values():
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
            if w.proc is not None:
                w.proc.wait()
        if self.board is not None:
            self.board.close()
        if self.server is not None:
            self.server.close()
        if self.router is not None:
            self.router.close(linger=0)
        self.ctx.term()
        if self.rundir is not None:
            self.rundir.close()
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


class StartError(Exception):
    """The daemon cannot start; one line naming the setting and the reason."""


def preflight(p: Pipeline, names: Optional[List[str]] = None) -> List[str]:
    """Each stage's ``check()`` (or only those in ``names``): one line per failure."""
    errors = []
    for name, stage in p.instances.items():
        if names is not None and name not in names:
            continue
        try:
            stage.check()
        except StageError as exc:
            errors.append(f"stages.{name}: {' '.join(str(exc).split())}")
        except Exception as exc:  # a plugin bug: still one line, naming the stage
            errors.append(f"stages.{name}: check failed: {type(exc).__name__}: {exc}")
    return errors


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class StatusBoard:
    """A few lines redrawn in place on a terminal; log records print above them."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lines: List[str] = []
        self.handler = _BoardLogHandler(self)
        root = logging.getLogger()
        self.previous = list(root.handlers)
        if self.previous:
            self.handler.setFormatter(self.previous[0].formatter)
            self.handler.setLevel(self.previous[0].level)
        for h in self.previous:
            root.removeHandler(h)
        root.addHandler(self.handler)

    def clear(self) -> None:
        if self.lines:
            self.stream.write(f"\x1b[{len(self.lines)}F\x1b[J")

    def draw(self, lines: List[str]) -> None:
        self.clear()
        self.lines = lines
        self.stream.write("".join(line + "\x1b[K\n" for line in lines))
        self.stream.flush()

    def close(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        for h in self.previous:
            root.addHandler(h)


class _BoardLogHandler(logging.Handler):
    def __init__(self, board: StatusBoard) -> None:
        super().__init__()
        self.board = board

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            self.board.clear()
            self.board.stream.write(msg + "\n")
            self.board.stream.write("".join(line + "\x1b[K\n" for line in self.board.lines))
            self.board.stream.flush()
        except Exception:
            self.handleError(record)


def run_daemon(pipeline: Pipeline) -> int:
    """``edgepipe run``: pre-flight, start, supervise, stop; the process exit code."""
    configure_logging(pipeline.config.runtime.log_level, "supervisor")
    try:
        import setproctitle

        setproctitle.setproctitle(f"edgepipe: {pipeline.config.name} supervisor")
    except ImportError:
        pass
    errors = preflight(pipeline)
    if errors:
        for line in errors:
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
