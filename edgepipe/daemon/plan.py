"""The worker plan: everything one worker process needs to run its stages, as a typed model.

The supervisor builds it (:func:`build_plan`) from the validated :class:`edgepipe.graph.Pipeline`
and sends it as JSON on the worker's stdin; the worker validates it with the same model before
anything else, so a plan that does not fit is refused in one line instead of failing somewhere
inside the loop. For each stage, in data-flow order: its type and settings (validated again by
the worker against the plugin's model), where its input binds and with which policy, one output
per consumer (inproc:// inside the worker, ipc:// to another worker), the upstream stages (and
those known to have ended), batching, and for sources the position file and the frame id to
resume at.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Set

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Literal

from edgepipe.graph import Pipeline
from edgepipe.runtime import RuntimeDir
from edgepipe.stage import Processor
from edgepipe.transport import inproc_endpoint

__all__ = ["BatchPlan", "InputPlan", "OutputPlan", "StagePlan", "WorkerPlan", "build_plan"]

Policy = Literal["latest", "block"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputPlan(_Strict):
    endpoints: List[str] = Field(..., min_length=1, description="Where the stage's PULL socket binds.")
    policy: Policy


class OutputPlan(_Strict):
    consumer: str
    endpoint: str = Field(..., description="The consumer's input: inproc:// in this worker, else ipc://.")
    policy: Policy


class BatchPlan(_Strict):
    max_batch: int = Field(..., ge=1)
    max_wait_ms: float = Field(..., ge=0)


class StagePlan(_Strict):
    name: str
    type: str
    settings: Dict[str, Any] = Field(..., description="As validated (JSON mode); the worker validates again.")
    upstream: List[str] = Field(default_factory=list)
    ended_upstream: List[str] = Field(default_factory=list, description="Upstream stages that already ended.")
    input: Optional[InputPlan] = None
    outputs: List[OutputPlan] = Field(default_factory=list)
    batch: Optional[BatchPlan] = None
    position: Optional[str] = Field(None, description="Sources: the file holding the next frame id.")
    resume: int = Field(0, ge=0, description="Sources: the id of the first frame.")


class WorkerPlan(_Strict):
    pipeline: str
    worker: str
    incarnation: int = Field(..., ge=1)
    control: str = Field(..., description="The supervisor's ROUTER endpoint.")
    supervisor_pid: int
    runtime_dir: str
    log_level: str = "info"
    heartbeat_interval: float = Field(0.5, gt=0)
    stages: List[StagePlan] = Field(..., min_length=1)

    def structure(self) -> str:
        """The plan without what may change in place (settings, ended upstreams, resume ids,
        incarnation): workers whose structure is unchanged can be reconfigured in place."""
        bare = self.model_dump(mode="json")
        bare["incarnation"] = 0
        for s in bare["stages"]:
            s.update(settings=None, ended_upstream=None, resume=0)
        return json.dumps(bare, sort_keys=True)

    def settings(self) -> Dict[str, Dict[str, Any]]:
        return {s.name: s.settings for s in self.stages}


def build_plan(
    p: Pipeline,
    rundir: RuntimeDir,
    worker: str,
    incarnation: int,
    ended: Set[str],
    resume: Optional[Dict[str, int]] = None,
    log_level: Optional[str] = None,
) -> WorkerPlan:
    """What ``worker`` runs (see the module docstring); ``resume`` maps a source to its first
    frame id (default 0)."""
    stages = []
    for name in p.flow_order():
        spec = p.specs[name]
        if spec.worker != worker:
            continue
        cfg = spec.config
        local = [i for i in cfg.inputs if p.worker_of(i) == worker]
        plan: Dict[str, Any] = {
            "name": name,
            "type": spec.type,
            "settings": cfg.model_dump(mode="json"),
            "upstream": list(cfg.inputs),
            "ended_upstream": sorted(set(cfg.inputs) & ended),
        }
        if spec.kind == "source":
            plan["position"] = rundir.position_path(name)
            plan["resume"] = (resume or {}).get(name, 0)
        if cfg.inputs:
            endpoints = []
            if len(local) < len(cfg.inputs):
                endpoints.append(rundir.input_endpoint(name))
            if local:
                endpoints.append(inproc_endpoint(name))
            plan["input"] = {"endpoints": endpoints, "policy": spec.policy}
        plan["outputs"] = [
            {
                "consumer": consumer,
                "endpoint": inproc_endpoint(consumer) if p.worker_of(consumer) == worker else rundir.input_endpoint(consumer),
                "policy": p.specs[consumer].policy,
            }
            for consumer in p.consumers(name)
        ]
        fields = type(cfg).model_fields
        if issubclass(spec.cls, Processor) and "max_batch" in fields and "max_wait_ms" in fields:
            plan["batch"] = {
                "max_batch": int(getattr(cfg, "max_batch")),  # noqa: B009 - plugin-defined field
                "max_wait_ms": float(getattr(cfg, "max_wait_ms")),  # noqa: B009
            }
        stages.append(plan)
    rt = p.config.runtime
    return WorkerPlan.model_validate(
        {
            "pipeline": p.name,
            "worker": worker,
            "incarnation": incarnation,
            "control": rundir.control_endpoint,
            "supervisor_pid": os.getpid(),
            "runtime_dir": rundir.path,
            "log_level": log_level or rt.log_level,
            "heartbeat_interval": rt.heartbeat_interval,
            "stages": stages,
        }
    )
