"""What the supervisor knows of each stage, fed by the workers' heartbeats: its metrics across
worker incarnations (counters never go back), whether it ended, whose end markers it got, since
when input waits for it and whether it is held up by its consumer, how many frames a finite
source will deliver and where a stage can be reached. The HTTP thread reads it (``/metrics``,
``/healthz``) while the main loop writes it, so every access takes the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, List, Optional, Set

from edgepipe.daemon.exposition import PipelineView
from edgepipe.daemon.health import Observation
from edgepipe.daemon.process import WorkerProcess
from edgepipe.graph import Pipeline
from edgepipe.metrics import StageMetrics, StageTotals, check_series

__all__ = ["StageBook"]

log = logging.getLogger("edgepipe.supervisor")


class StageBook:
    def __init__(self, pipeline: Pipeline) -> None:
        self.lock = threading.Lock()
        self.totals: Dict[str, StageTotals] = {}
        self.ended: Set[str] = set()
        self.eos_from: Dict[str, Set[str]] = {}  # stage -> upstream stages whose end marker it got
        self.activity: Dict[str, Any] = {}  # stage -> (work_since, blocked)
        self.expected: Dict[str, int] = {}  # finite source -> frames it delivers in all
        self.addresses: Dict[str, Dict[str, str]] = {}  # stage -> label -> address
        self.reset(pipeline)

    def reset(self, p: Pipeline) -> None:
        """Follow a (re)loaded pipeline: new stages start at zero, removed ones are forgotten."""
        with self.lock:
            for name, spec in p.specs.items():
                if name not in self.totals:
                    self.totals[name] = StageTotals(name, spec.kind)
            for name in list(self.totals):
                if name not in p.specs:
                    del self.totals[name]
            self.ended &= set(p.specs)

    # -- from the workers -------------------------------------------------------------------

    def heartbeat(self, worker: str, stages: List[str], body: Dict[str, Any]) -> List[str]:
        """Take a heartbeat's stage states; the stages that ended with it."""
        newly_ended = []
        with self.lock:
            for name, st in (body.get("stages") or {}).items():
                if name not in stages or name not in self.totals:
                    continue
                try:
                    self.totals[name].update(st["metrics"])
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("Bad metrics snapshot from worker %r: %s", worker, exc)
                    continue
                self.eos_from[name] = set(st.get("eos_from") or [])
                self.activity[name] = (float(st.get("work_since") or 0.0), bool(st.get("blocked")))
                if st.get("ended") and name not in self.ended:
                    self.ended.add(name)
                    newly_ended.append(name)
        return newly_ended

    def ready(self, stages: List[str], body: Dict[str, Any]) -> None:
        """What READY says of each stage: where it can be reached, how long a source is."""
        with self.lock:
            for name in stages:
                addresses = (body.get("addresses") or {}).get(name) or {}
                self.addresses[name] = {str(k): str(v) for k, v in addresses.items()} if isinstance(addresses, dict) else {}
                expected = (body.get("expected") or {}).get(name)
                if isinstance(expected, int) and expected > 0:
                    self.expected[name] = expected

    def series_clash(self, stages: List[str], series: Dict[str, Any]) -> Optional[str]:
        """The first clash between the series these stages declare and those the other
        stages declared (see :func:`edgepipe.metrics.check_series`), or None."""
        declared: Dict[str, Any] = {}
        with self.lock:
            for name, t in self.totals.items():
                if name not in stages:
                    declared[name] = [s.spec() for s in t.current().series.values()]
        for name in stages:
            if isinstance(series.get(name), list):
                declared[name] = series[name]
        try:
            errors = check_series(declared)
        except (AttributeError, KeyError, TypeError):
            return "sent a malformed list of declared series"
        mine = [e for e in errors if any(e.startswith(f"stage {n!r}") for n in stages)]
        return mine[0] if mine else None

    def worker_exited(self, stages: List[str]) -> None:
        with self.lock:
            for name in stages:
                self.activity.pop(name, None)
                if name in self.totals:
                    self.totals[name].worker_exited()

    def may_exit(self, p: Pipeline, worker: str, up: Dict[str, bool]) -> bool:
        """A finished worker may exit once every consumer in another running worker got its end
        markers (a consumer not running can receive nothing more anyway)."""
        with self.lock:
            for stage in p.workers()[worker]:
                for consumer in p.consumers(stage):
                    other = p.worker_of(consumer)
                    if other != worker and up.get(other) and stage not in self.eos_from.get(consumer, set()) \
                            and consumer not in self.ended:
                        return False
        return True

    # -- for the outputs --------------------------------------------------------------------

    def current(self) -> Dict[str, StageMetrics]:
        with self.lock:
            return {name: t.current() for name, t in self.totals.items()}

    def view(self, p: Pipeline, workers: Dict[str, WorkerProcess], version: str) -> PipelineView:
        """One scrape's worth, consistent across stages and workers."""
        up = {n: w.ready for n, w in workers.items()}
        current = self.current()
        return PipelineView([(m, up.get(p.worker_of(n), False)) for n, m in current.items()],
                            [w.view for w in workers.values()], version)

    def observations(
        self, p: Pipeline, workers: Dict[str, WorkerProcess], silent_after: float, run_started: float
    ) -> Dict[str, Observation]:
        """Per stage, what health is judged on (see :mod:`edgepipe.daemon.health`)."""
        mono = time.monotonic()
        current = self.current()
        out = {}
        with self.lock:
            for name, m in current.items():
                w = workers.get(p.worker_of(name))
                work_since, blocked = self.activity.get(name, (0.0, False))
                out[name] = Observation(
                    kind=m.kind, up=bool(w and w.ready), ended=name in self.ended,
                    last_progress=m.last_progress.value, ready_at=w.ready_at if w else 0.0,
                    run_started=run_started, work_since=work_since, blocked=blocked,
                    silent=bool(w and mono - w.last_heartbeat > silent_after),
                    stall_timeout=p.specs[name].config.stall_timeout, problem=m.problem,
                )
        return out

    def states(self, observations: Dict[str, Observation]) -> Dict[str, str]:
        from edgepipe.daemon.health import classify

        now = time.time()
        return {n: classify(o, now)[0] for n, o in observations.items()}
