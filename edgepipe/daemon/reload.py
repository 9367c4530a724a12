"""What a SIGHUP changes, as a pure function of the old and new pipelines and worker plans.

A reload keeps what did not change and touches as little as possible: a worker whose plan is the
same keeps running; one whose plan differs only in stage settings is sent those settings to apply
in place (a stage that cannot change in place is restarted then); a worker whose structure
changed (stages added, removed or relinked, batching changed) is restarted with its new plan;
workers no longer in the config are stopped and new ones started. ``name``, ``metrics`` and
``runtime`` stay as they are until the daemon restarts. A source whose settings changed starts its
frame ids afresh; one that was removed forgets its position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Set, Tuple

from edgepipe.config import ConfigError, load_config
from edgepipe.daemon.plan import WorkerPlan
from edgepipe.graph import Pipeline
from edgepipe.runtime import RuntimeDir, RuntimeDirError

__all__ = ["Refused", "ReloadDiff", "changed_stages", "diff", "load"]


class Refused(Exception):
    """The new config cannot replace the running one; the message is the one-line reason."""


def load(old: Pipeline, rundir: RuntimeDir) -> Tuple[Pipeline, List[str]]:
    """The new pipeline from ``old``'s file, checked as far as it can be without touching the
    running one (valid, its ipc paths fit, the changed stages pass their pre-flight), with the
    ``name``, ``metrics`` and ``runtime`` sections of ``old`` (a restart applies those), and the
    sections that changed and wait for that restart; :class:`Refused` otherwise."""
    assert old.path is not None
    try:
        new = load_config(old.path)
        rundir.check_lengths(new.specs)
    except ConfigError as exc:
        raise Refused(exc.errors[0] + (f" (and {len(exc.errors) - 1} more)" if len(exc.errors) > 1 else "")) from None
    except RuntimeDirError as exc:
        raise Refused(f"runtime.dir: {exc}") from None
    problems = new.preflight(changed_stages(old, new))
    if problems:
        raise Refused(problems[0])
    sections = ("name", "metrics", "runtime")
    waiting = [s for s in sections if getattr(new.config, s) != getattr(old.config, s)]
    new.config = new.config.model_copy(update={s: getattr(old.config, s) for s in sections})
    return new, waiting


@dataclass
class ReloadDiff:
    keep: List[str] = field(default_factory=list)  # workers left as they are
    reconfigure: Dict[str, Dict[str, Dict[str, Any]]] = field(default_factory=dict)  # worker -> stage -> settings
    restart: List[str] = field(default_factory=list)  # running workers to replace with their new plan
    start: List[str] = field(default_factory=list)  # workers the new config adds
    stop: List[str] = field(default_factory=list)  # workers the new config no longer has
    fresh_sources: Set[str] = field(default_factory=set)  # sources whose settings changed
    removed_sources: Set[str] = field(default_factory=set)

    def summary(self) -> str:
        return (
            f"{len(self.keep)} worker(s) unchanged, {len(self.reconfigure)} reconfiguring, "
            f"{len(self.restart) + len(self.start) + len(self.stop)} restarted"
        )


def changed_stages(old: Pipeline, new: Pipeline) -> List[str]:
    """Stages of ``new`` whose settings (as written) differ from ``old``'s, or that are new."""
    return [n for n, s in new.specs.items() if n not in old.specs or old.specs[n].settings != s.settings]


def diff(
    old: Pipeline,
    new: Pipeline,
    old_plans: Dict[str, WorkerPlan],
    new_plans: Dict[str, WorkerPlan],
    live: Set[str],
) -> ReloadDiff:
    """The changes (see the module docstring). ``old_plans`` are the plans the running workers
    were started with, ``new_plans`` those ``new`` gives every worker, ``live`` the workers
    running and ready (only those can change settings in place)."""
    out = ReloadDiff()
    changed = set(changed_stages(old, new))
    out.fresh_sources = {n for n in changed if new.kind(n) == "source" and n in old.specs}
    out.removed_sources = {n for n in old.specs if n not in new.specs and old.kind(n) == "source"}
    out.stop = [w for w in old_plans if w not in new_plans]
    for worker, plan in new_plans.items():
        before = old_plans.get(worker)
        if before is None:
            out.start.append(worker)
        elif before.structure() != plan.structure():
            out.restart.append(worker)
        else:
            settings = {s.name: s.settings for s, o in zip(plan.stages, before.stages) if s.settings != o.settings}
            if not settings:
                out.keep.append(worker)
            elif worker in live:
                out.reconfigure[worker] = settings
            else:
                out.restart.append(worker)
    return out
