"""The daemon's parts without a daemon: the worker plan, health classification, the reload diff,
the control framing and the worker lifecycle's decisions. No process is started here; the same
parts are exercised end to end by test_runtime.py and the fault suite."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

import pytest
from pydantic import ValidationError

from edgepipe.config import parse_config
from edgepipe.daemon.control import Control, ControlError, identity, pack, parse_identity, unpack
from edgepipe.daemon.health import Observation, classify, report, watchdog_ok
from edgepipe.daemon.plan import WorkerPlan, build_plan
from edgepipe.daemon.process import Exit, RestartPolicy, State, WorkerProcess
from edgepipe.daemon.reload import changed_stages, diff
from edgepipe.graph import Pipeline
from edgepipe.registry import Registry
from edgepipe.runtime import open_runtime_dir
from edgepipe.transport import inproc_endpoint

REGISTRY = Registry.discover()
BASE: Dict[str, Any] = {
    "name": "parts",
    "stages": {
        "cam": {"type": "synthetic", "width": 64, "height": 64, "fps": 5},
        "clip": {"type": "synthetic", "width": 64, "height": 64, "count": 10},
        "prep": {"type": "letterbox", "inputs": ["cam", "clip"], "imgsz": 64, "worker": "front"},
        "det": {"type": "yolov5", "inputs": ["prep"], "cfg": "yolov5n", "imgsz": 64, "worker": "front"},
        "post": {"type": "nms", "inputs": ["det"]},
        "out": {"type": "jsonl", "inputs": ["post"], "path": "/tmp/parts.jsonl"},
    },
}


def pipeline(changes: Any = None) -> Pipeline:
    data = copy.deepcopy(BASE)
    for name, settings in (changes or {}).items():
        if settings is None:
            del data["stages"][name]
        else:
            data["stages"][name] = dict(data["stages"].get(name, {}), **settings)
    return parse_config(data, REGISTRY, {})


@pytest.fixture(scope="module")
def rundir(tmp_path_factory):
    d = open_runtime_dir(str(tmp_path_factory.mktemp("rd")), "parts")
    yield d
    d.close()


# -- the plan ---------------------------------------------------------------------------------

def test_plan_links_stages_in_and_across_workers(rundir):
    p = pipeline()
    front = build_plan(p, rundir, "front", 3, ended={"clip"}, resume={})
    assert [s.name for s in front.stages] == ["prep", "det"]  # data-flow order
    prep, det = front.stages
    # prep's input: other processes over ipc, nothing local; it feeds det inside the worker.
    assert prep.input is not None and prep.input.endpoints == [rundir.input_endpoint("prep")]
    assert prep.input.policy == "latest"  # a live source feeds it
    assert prep.ended_upstream == ["clip"] and sorted(prep.upstream) == ["cam", "clip"]
    assert [(o.consumer, o.endpoint) for o in prep.outputs] == [("det", inproc_endpoint("det"))]
    assert det.input is not None and all(e.startswith("inproc://") for e in det.input.endpoints)
    assert det.batch is not None and det.batch.max_batch == 8  # yolov5 batches
    assert det.outputs[0].endpoint == rundir.input_endpoint("post")  # another worker
    assert front.incarnation == 3 and front.pipeline == "parts"
    cam = build_plan(p, rundir, "cam", 1, ended=set(), resume={"cam": 41})
    assert cam.stages[0].resume == 41 and cam.stages[0].position == rundir.position_path("cam")
    assert cam.stages[0].input is None and cam.stages[0].batch is None


def test_a_plan_round_trips_as_json_and_refuses_what_does_not_fit(rundir):
    plan = build_plan(pipeline(), rundir, "front", 1, set(), {})
    assert WorkerPlan.model_validate_json(plan.model_dump_json()) == plan
    data = plan.model_dump(mode="json")
    data["stages"][0]["input"]["policy"] = "newest"
    with pytest.raises(ValidationError):
        WorkerPlan.model_validate(data)
    data = plan.model_dump(mode="json")
    data["surprise"] = 1
    with pytest.raises(ValidationError):
        WorkerPlan.model_validate(data)


def test_structure_ignores_settings_and_incarnation(rundir):
    a = build_plan(pipeline(), rundir, "front", 1, set(), {})
    b = build_plan(pipeline({"det": {"conf_thres": 0.5}}), rundir, "front", 7, {"clip"}, {})
    c = build_plan(pipeline({"det": {"max_batch": 2}}), rundir, "front", 1, set(), {})
    assert a.structure() == b.structure() and a.settings() != b.settings()
    assert a.structure() != c.structure()  # batching changes how the worker runs


# -- the reload diff ---------------------------------------------------------------------------

def plans(p: Pipeline, rundir) -> Dict[str, WorkerPlan]:
    return {w: build_plan(p, rundir, w, 1, set(), {}) for w in p.workers()}


def test_reload_diff_keeps_reconfigures_restarts_starts_and_stops(rundir):
    old = pipeline()
    new = pipeline({
        "det": {"conf_thres": 0.5},  # a setting: in place
        "post": {"max_det": 50},  # a setting, but its worker is not running: restart
        "clip": {"count": 20},  # a source's settings: its ids start afresh
        "out": None,  # removed
        "log": {"type": "jsonl", "inputs": ["post"], "path": "/tmp/other.jsonl"},  # added
    })
    change = diff(old, new, plans(old, rundir), plans(new, rundir), live={"front", "cam", "clip", "out"})
    assert change.reconfigure == {
        "front": {"det": new.specs["det"].config.model_dump(mode="json")},
        "clip": {"clip": new.specs["clip"].config.model_dump(mode="json")},
    }
    assert change.restart == ["post"] and change.start == ["log"] and change.stop == ["out"]
    assert change.keep == ["cam"]
    assert change.fresh_sources == {"clip"} and change.removed_sources == set()
    assert changed_stages(old, new) == ["clip", "det", "post", "log"]
    assert change.summary() == "1 worker(s) unchanged, 2 reconfiguring, 3 restarted"


def test_reload_diff_of_an_unchanged_config_keeps_everything(rundir):
    p = pipeline()
    change = diff(p, pipeline(), plans(p, rundir), plans(p, rundir), live=set(p.workers()))
    assert sorted(change.keep) == sorted(p.workers()) and not (change.reconfigure or change.restart or change.start or change.stop)


def test_reload_diff_restarts_a_relinked_worker(rundir):
    old = pipeline()
    new = pipeline({"prep": {"inputs": ["cam"]}, "clip": None})
    change = diff(old, new, plans(old, rundir), plans(new, rundir), live=set(old.workers()))
    assert "front" in change.restart and change.stop == ["clip"] and change.removed_sources == {"clip"}


# -- health -----------------------------------------------------------------------------------

def obs(**kw: Any) -> Observation:
    base = dict(kind="processor", up=True, ended=False, last_progress=100.0, ready_at=50.0, run_started=60.0,
                work_since=0.0, blocked=False, silent=False, stall_timeout=10.0, problem=None)
    base.update(kw)
    return Observation(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("o, now, state", [
    (obs(), 105.0, "ok"),
    (obs(), 120.0, "idle"),  # nothing to do for 20 s: not a stall
    (obs(work_since=101.0), 120.0, "stalled"),  # input waits 19 s and no progress
    (obs(work_since=115.0), 120.0, "ok"),  # input waits only 5 s
    (obs(silent=True), 120.0, "stalled"),  # no heartbeats: stuck in a call
    (obs(blocked=True, work_since=101.0), 120.0, "blocked"),  # held up by its consumer
    (obs(blocked=True, silent=True), 120.0, "stalled"),  # held up, but also frozen
    (obs(kind="source"), 108.0, "ok"),
    (obs(kind="source"), 115.0, "stalled"),  # a source always has work
    (obs(kind="source", last_progress=0.0, ready_at=110.0), 115.0, "ok"),  # counted from READY
    (obs(up=False), 101.0, "down"),
    (obs(ended=True, up=False), 500.0, "ended"),
    (obs(problem="broker unreachable"), 105.0, "failing"),
    (obs(problem="broker unreachable"), 120.0, "failing"),  # idle but failing
    (obs(kind="source", problem="lost the camera"), 120.0, "stalled"),  # a stall wins over a report
    (obs(up=False, problem="lost the camera"), 101.0, "down"),
])
def test_classify(o: Observation, now: float, state: str):
    assert classify(o, now)[0] == state


def test_report_names_the_stage_that_holds_the_pipeline_up():
    observations = {"cam": obs(kind="source"), "det": obs(), "pub": obs(kind="sink", problem="no broker")}
    ok, body = report(observations, 105.0, started=True)
    assert not ok and body["status"] == "failing" and body["failing"] == ["pub"] and body["stalled"] == []
    assert body["stages"]["pub"]["reason"] == "no broker" and body["stages"]["pub"]["state"] == "failing"
    assert watchdog_ok(body)  # a failing sink keeps the watchdog fed: a restart would not help
    observations["cam"] = obs(kind="source", last_progress=10.0, ready_at=10.0, run_started=10.0)
    ok, body = report(observations, 105.0, started=True)
    assert body["status"] == "stalled" and body["stalled"] == ["cam"] and not watchdog_ok(body)
    ok, body = report({"cam": obs(kind="source")}, 101.0, started=False)
    assert not ok and body["status"] == "starting" and not watchdog_ok(body)
    assert report({"cam": obs(kind="source")}, 101.0, started=True)[0]


# -- control framing --------------------------------------------------------------------------

def test_control_messages_round_trip_and_refuse_garbage():
    kind, body = unpack(pack(Control.RECONFIGURE, {"stages": {"det": {"conf_thres": 0.5}}}))
    assert kind is Control.RECONFIGURE and body == {"stages": {"det": {"conf_thres": 0.5}}}
    assert unpack(pack(Control.RUN)) == (Control.RUN, {})
    assert parse_identity(identity("front", 12)) == ("front", 12)
    for bad, message in [
        ([b"HELLO", b"\x80"], "unknown control message 'HELLO'"),
        ([b"RUN", b"\xc1"], "RUN: body is not msgpack"),
        ([b"RUN", b"\x93\x01\x02\x03"], "RUN: body is a list, not a map"),
        ([b"a", b"b", b"c"], "3 frames, expected 2"),
    ]:
        with pytest.raises(ControlError, match=message):
            unpack(bad)
    with pytest.raises(ControlError):
        parse_identity(b"no-incarnation")


# -- the worker lifecycle's decisions -----------------------------------------------------------

def test_worker_exits_mean_what_the_state_says(tmp_path: Path):
    w = WorkerProcess("det", ["det"], RestartPolicy(limit=3, window=60.0, first=0.5, most=30.0))
    w.state = State.FINISHED
    assert w.on_exit(0, running=True, stopping=False) == (Exit.ENDED, 0.0) and w.settled
    w.state = State.STARTING
    assert w.on_exit(1, running=False, stopping=False)[0] is Exit.FAILED_START
    w.state = State.READY
    assert w.on_exit(-9, running=True, stopping=False) == (Exit.RESTART, 0.5) and w.state is State.BACKOFF
    assert not w.settled and not w.due(w.restart_at - 0.1) and w.due(w.restart_at)  # type: ignore[operator]
    w.state = State.READY
    assert w.on_exit(-9, running=True, stopping=False) == (Exit.RESTART, 1.0)  # backoff doubles
    w.state = State.READY
    assert w.on_exit(-9, running=True, stopping=False)[0] is Exit.GIVE_UP and w.state is State.GAVE_UP
    w.state = State.REPLACING
    assert w.on_exit(-9, running=True, stopping=False)[0] is Exit.REPLACED
    w.state = State.READY
    assert w.on_exit(-9, running=True, stopping=True)[0] is Exit.STOPPED
