"""Health: which stage holds the pipeline up, as a pure function of what the supervisor observed.

Each stage is in one state:

- ``ended``: it finished (a finite source ran out and everything after it drained);
- ``down``: its worker is not running and ready (counts as stalled);
- ``blocked``: waiting for room on a downstream link, so the stall, if any, is downstream;
- ``idle``: a processor or sink with no input waiting and no progress for its ``stall_timeout``:
  nothing to progress on, as behind a source outage;
- ``stalled``: it has work and made no progress for ``stall_timeout``. A source always has work
  (it should produce); a processor or sink has work while input waits for it, or while its
  worker sends no heartbeats (stuck in a call, or frozen);
- ``failing``: running, but the stage reports that it cannot do its job (a broker it cannot
  reach), with its reason;
- ``ok``.

Time counts from the stage's last progress, but never from before its worker became ready, the
pipeline started running, or its input started waiting: a stage that became ready while a slow
detector was still loading is not stalled. ``/healthz`` answers 503 while a stage is stalled,
down or failing; the systemd watchdog is fed unless one is stalled or down (a restart cannot
bring back a broker, and would turn an outage into a crash loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Observation", "classify", "report"]


@dataclass(frozen=True)
class Observation:
    """What the supervisor knows of one stage at one moment (times are unix seconds)."""

    kind: str  # source, processor, sink
    up: bool  # its worker runs and is ready
    ended: bool
    last_progress: float
    ready_at: float  # its worker's last READY (0: never)
    run_started: float  # when the pipeline started running (0: not yet)
    work_since: float  # since when input has been waiting for it (0: none)
    blocked: bool  # waiting for room downstream
    silent: bool  # its worker sent no heartbeat for a while
    stall_timeout: float
    problem: Optional[str] = None  # what the stage reports it cannot do


def classify(o: Observation, now: float) -> Tuple[str, float]:
    """(state, seconds since progress) of one stage; see the module docstring."""
    since = max(o.last_progress, o.ready_at, o.run_started)
    if o.kind == "source":
        waiting: Optional[float] = now - since
    elif o.silent or o.work_since:
        waiting = now - max(since, o.work_since)
    else:
        waiting = None
    if o.ended:
        state = "ended"
    elif not o.up:
        state = "down"
    elif o.blocked and not o.silent:
        state = "blocked"
    elif waiting is None:
        state = "ok" if now - since <= o.stall_timeout else "idle"
    else:
        state = "stalled" if waiting > o.stall_timeout else "ok"
    if o.up and o.problem and state in ("ok", "idle"):
        state = "failing"
    return state, now - since


def report(observations: Dict[str, Observation], now: float, started: bool) -> Tuple[bool, Dict[str, Any]]:
    """``(healthy, body)`` for /healthz: ``status`` (starting, ok, stalled or failing),
    ``stalled`` (stalled or down stages), ``failing`` (stages reporting a problem) and each
    stage's ``state``, ``reason``, ``up``, ``ended``, ``seconds_since_progress`` and
    ``stall_timeout``."""
    stages: Dict[str, Any] = {}
    stalled: List[str] = []
    failing: List[str] = []
    for name, o in observations.items():
        state, quiet = classify(o, now)
        if state in ("down", "stalled"):
            stalled.append(name)
        elif state == "failing":
            failing.append(name)
        stages[name] = {
            "state": state,
            "reason": o.problem if o.up else None,
            "up": o.up,
            "ended": o.ended,
            "seconds_since_progress": round(quiet, 3),
            "stall_timeout": o.stall_timeout,
        }
    body = {"stalled": stalled, "failing": failing, "stages": stages}
    if not started:
        return False, {"status": "starting", **body}
    status = "stalled" if stalled else ("failing" if failing else "ok")
    return status == "ok", {"status": status, **body}


def watchdog_ok(body: Dict[str, Any]) -> bool:
    """Whether the systemd watchdog may be fed: running, and nothing stalled or down."""
    return body["status"] != "starting" and not body["stalled"]
