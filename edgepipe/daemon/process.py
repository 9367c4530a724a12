"""One object per worker process: it spawns the child, knows its state, and decides what its exit
means (finished, replaced, restart after a backoff, give up). The supervisor asks; the worker
object knows. (The shape follows uvicorn's ``supervisors/multiprocess.py`` Process.)

States::

    NEW --spawn--> STARTING --READY--> READY --FINISHED--> FINISHED --exit 0--> ENDED
                      |                  |                                  \\
                      +------ exit ------+---> BACKOFF --due--> STARTING      (REPLACING: a planned
                                         |                                   restart with a new
                                         +---> GAVE_UP (too many crashes)    plan, from any state)

A crash before the pipeline first ran is a failed start (the daemon fails); afterwards each crash
is restarted after a backoff (``BACKOFF_FIRST_S``, doubling up to ``BACKOFF_MAX_S``) until
``restart_limit`` crashes fall within ``restart_window`` seconds, when the worker gives up.
"""

from __future__ import annotations

import enum
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from edgepipe.daemon.exposition import WorkerView
from edgepipe.daemon.plan import WorkerPlan

__all__ = ["BACKOFF_FIRST_S", "BACKOFF_MAX_S", "Exit", "RestartPolicy", "State", "WorkerProcess", "exit_text"]

log = logging.getLogger("edgepipe.supervisor")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WORKER_MODULE = "edgepipe.daemon.worker"


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    FINISHED = "finished"  # every stage ended; it waits for EXIT before it goes
    REPLACING = "replacing"  # killed on purpose, to come back with a new plan
    BACKOFF = "backoff"  # crashed; restarts at restart_at
    ENDED = "ended"  # finished and exited 0
    GAVE_UP = "gave up"
    STOPPED = "stopped"  # exited while the daemon stops


class Exit(enum.Enum):
    """What an exit means to the supervisor."""

    ENDED = "ended"
    REPLACED = "replaced"  # respawn now with the new plan
    RESTART = "restart"  # a crash: respawn after the backoff
    FAILED_START = "failed start"  # before the pipeline ever ran: the daemon fails
    GIVE_UP = "give up"
    STOPPED = "stopped"


@dataclass(frozen=True)
class RestartPolicy:
    limit: int = 5
    window: float = 60.0
    first: float = BACKOFF_FIRST_S
    most: float = BACKOFF_MAX_S


class WorkerProcess:
    """A worker: its stages, its current process and plan, and its history."""

    def __init__(self, name: str, stages: List[str], policy: RestartPolicy) -> None:
        self.name = name
        self.stages = stages
        self.policy = policy
        self.state = State.NEW
        self.proc: Optional[subprocess.Popen] = None
        self.plan: Optional[WorkerPlan] = None
        self.incarnation = 0
        self.ready_at = 0.0  # unix time of the last READY
        self.started_at = 0.0  # monotonic
        self.last_heartbeat = 0.0  # monotonic
        self.reason: Optional[str] = None  # why the current process failed, if it said
        self.crashes: List[float] = []
        self.restart_at: Optional[float] = None
        self.exit_sent = False
        self.reconfigure_deadline: Optional[float] = None
        self.view = WorkerView(name)

    # -- what it is ------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready(self) -> bool:
        return self.state in (State.READY, State.FINISHED) and self.alive

    @property
    def settled(self) -> bool:
        """No process and none coming: ended, gave up, stopped (or never started)."""
        return self.proc is None and self.state != State.BACKOFF

    def next_incarnation(self) -> int:
        self.incarnation += 1
        return self.incarnation

    # -- life -----------------------------------------------------------------------------

    def spawn(self, plan: WorkerPlan) -> None:
        """Start a process running ``plan`` (its incarnation is the plan's)."""
        # Workers inherit a blocked SIGINT/SIGTERM/SIGHUP and ignore them before unblocking, so
        # a group-wide signal cannot kill one while it starts; ours arrive once unblocked here.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
        try:
            proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE, close_fds=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        assert proc.stdin is not None
        try:
            proc.stdin.write(plan.model_dump_json().encode())
            proc.stdin.close()
        except OSError:
            pass  # it died at once; the exit is handled like any other
        self.proc, self.plan, self.incarnation = proc, plan, plan.incarnation
        self.state = State.STARTING
        self.restart_at = self.reason = self.reconfigure_deadline = None
        self.exit_sent = False
        self.started_at = self.last_heartbeat = time.monotonic()
        self.view.pid, self.view.up = proc.pid, False
        log.debug("Started worker %r (pid %d, stages %s)", self.name, proc.pid, ", ".join(self.stages))

    def on_ready(self) -> None:
        self.state = State.READY
        self.ready_at = time.time()
        self.view.up = True

    def on_finished(self) -> None:
        self.state = State.FINISHED

    def replace(self) -> bool:
        """Planned restart with a new plan: kill the process if it runs (its exit is then
        :attr:`Exit.REPLACED`); True when there is nothing to wait for (spawn now)."""
        if self.alive:
            self.state = State.REPLACING
            assert self.proc is not None
            self.proc.kill()
            return False
        self.restart_at = None
        return True

    def kill(self, reason: Optional[str] = None) -> None:
        if reason:
            self.reason = reason
        if self.alive:
            assert self.proc is not None
            self.proc.kill()

    def wait(self) -> Optional[int]:
        return self.proc.wait() if self.proc is not None else None

    def poll(self) -> Optional[int]:
        """The exit code once the process has exited (it stays known until :meth:`on_exit`)."""
        return self.proc.poll() if self.proc is not None else None

    def on_exit(self, code: int, running: bool, stopping: bool) -> Tuple[Exit, float]:
        """Account for the exit of the current process; what it means, and for a restart the
        backoff in seconds. ``running``: the pipeline has run (all workers were ready once)."""
        was = self.state
        self.proc = None
        self.view.exited()
        self.reconfigure_deadline = None
        if stopping:
            self.state = State.STOPPED
            return Exit.STOPPED, 0.0
        if was == State.REPLACING:
            self.state = State.NEW
            return Exit.REPLACED, 0.0
        if code == 0 and was == State.FINISHED:
            self.state = State.ENDED
            return Exit.ENDED, 0.0
        if not running:
            self.state = State.GAVE_UP
            return Exit.FAILED_START, 0.0
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t <= self.policy.window] + [now]
        if len(self.crashes) >= self.policy.limit:
            self.state = State.GAVE_UP
            return Exit.GIVE_UP, 0.0
        delay = min(self.policy.most, self.policy.first * 2 ** (len(self.crashes) - 1))
        self.state = State.BACKOFF
        self.restart_at = now + delay
        return Exit.RESTART, delay

    def due(self, now: float) -> bool:
        """A crashed worker whose backoff is over."""
        return self.state == State.BACKOFF and self.restart_at is not None and now >= self.restart_at

    def cancel_restart(self) -> None:
        if self.state == State.BACKOFF:
            self.state = State.STOPPED
        self.restart_at = None

    def overdue(self, now: float, start_timeout: float, hang_timeout: float) -> Optional[str]:
        """Why the running process must be killed (hung, or not ready in time), or None."""
        if not self.alive:
            return None
        if self.state in (State.READY, State.FINISHED) and now - self.last_heartbeat > hang_timeout:
            return f"no heartbeat for {now - self.last_heartbeat:.0f} s (hung)"
        if self.state == State.STARTING and now - self.started_at > start_timeout:
            return f"not ready within runtime.start_timeout={start_timeout:g} s"
        return None


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
