"""A third party's plugin package, pip-installed, is discovered and runs in a pipeline exactly
like the first-party stages; broken plugins are reported by name without breaking the others."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
from helpers.daemon import Daemon, install_test_plugins, read_jsonl

from edgepipe.config import ConfigError, parse_config
from edgepipe.registry import Plugin, PluginError, Registry


@pytest.fixture(scope="module", autouse=True)
def _installed() -> None:
    install_test_plugins()


def edgepipe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True, timeout=120)


def test_installed_package_registers_its_stages():
    dist = importlib.metadata.distribution("edgepipe-testplugins")
    assert {ep.name for ep in dist.entry_points if ep.group == "edgepipe.stages"} == {"counter", "passthrough", "record"}
    r = edgepipe_cli("plugins", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["counter"]["kind"] == "source" and rows["counter"]["distribution"] == "edgepipe-testplugins"
    assert rows["counter"]["description"].startswith("Numbered test frames")
    assert rows["passthrough"]["kind"] == "processor" and rows["record"]["kind"] == "sink"
    assert rows["counter"]["error"] is None
    # First-party stages come through the same group.
    assert rows["yolov5"]["distribution"] == "edgepipe" and rows["yolov5"]["kind"] == "processor"
    text = edgepipe_cli("plugins")
    line = next(x for x in text.stdout.splitlines() if x.startswith("counter "))
    assert line.split()[1] == "source"


def test_thirdparty_stages_in_the_config_schema():
    r = edgepipe_cli("schema", "config")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    mapping = schema["properties"]["stages"]["additionalProperties"]["discriminator"]["mapping"]
    assert {"counter", "passthrough", "record", "yolov5", "nms"} <= set(mapping)


def test_thirdparty_pipeline_runs(tmp_path):
    config = {
        "name": "third",
        "stages": {
            "count": {"type": "counter", "count": 25},
            "tag": {"type": "passthrough", "inputs": ["count"], "tag": "third-party"},
            "rec": {"type": "record", "inputs": ["tag"], "path": str(tmp_path / "rec.jsonl")},
        },
    }
    r = edgepipe_cli("validate", str(_write(tmp_path, config)))
    assert r.returncode == 0 and "OK: 3 stages" in r.stdout, r.stderr
    with Daemon(config, tmp_path) as d:
        d.wait_ready()
        assert d.wait(60) == 0
    records = read_jsonl(tmp_path / "rec.jsonl")
    assert [x["frame_id"] for x in records] == list(range(25))
    assert {x["meta"]["tag"] for x in records} == {"third-party"}
    assert [x["pixel"] for x in records] == list(range(25))  # the image payload crossed two links


def _write(tmp_path, config):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_broken_plugin_is_one_line_naming_it():
    ep = importlib.metadata.EntryPoint("ghost", "no_such_module_xyz:Stage", "edgepipe.stages")
    plugin = Plugin("ghost", ep.value, "ghost-dist", ep)
    with pytest.raises(PluginError) as info:
        plugin.load()
    assert str(info.value) == (
        "plugin 'ghost' (no_such_module_xyz:Stage) failed to import: "
        "ModuleNotFoundError: No module named 'no_such_module_xyz'"
    )
    not_a_stage = importlib.metadata.EntryPoint("plain", "json:dumps", "edgepipe.stages")
    with pytest.raises(PluginError, match=r"plugin 'plain' \(json:dumps\) is not a Source, Processor or Sink subclass"):
        Plugin("plain", not_a_stage.value, None, not_a_stage).load()
    # A registry holding the broken one still validates configs that do not use it, and names it
    # in those that do.
    good = Registry.discover()
    registry = Registry(dict(good.plugins, ghost=plugin))
    config = {
        "stages": {
            "count": {"type": "counter", "count": 1},
            "rec": {"type": "record", "inputs": ["count"], "path": "/dev/null"},
        }
    }
    assert list(parse_config(config, registry, {}).stages) == ["count", "rec"]
    config["stages"]["g"] = {"type": "ghost", "inputs": ["count"]}
    with pytest.raises(ConfigError) as info:
        parse_config(config, registry, {})
    assert info.value.errors == [
        "stages.g.type: plugin 'ghost' (no_such_module_xyz:Stage) failed to import: "
        "ModuleNotFoundError: No module named 'no_such_module_xyz'"
    ]


def test_thirdparty_series_and_health_on_a_real_scrape(tmp_path):
    """The pip-installed plugin's own series (declared through its StageMetrics) are on
    /metrics of a running daemon with the stage label, beside the standard sink series it
    declares alike; a stage reporting a problem makes /healthz name it with the reason, without
    stopping the pipeline, until it reports healthy again."""
    config = {
        "name": "series",
        "stages": {
            "count": {"type": "counter", "fps": 20},
            "tag": {"type": "passthrough", "inputs": ["count"], "tag": "blue", "problem_from": 30, "problem_until": 200},
            "rec": {"type": "record", "inputs": ["tag"], "path": str(tmp_path / "rec.jsonl")},
        },
    }
    with Daemon(config, tmp_path) as d:
        d.wait_ready()
        d.wait_until(lambda: (d.sample("edgepipe_passthrough_frames_total", stage="tag", tag="blue") or 0) >= 10,
                     60, "the plugin's own counter counts")
        # Healthy until it handles frame 30: read before the count, a 0 here means frame 30 was
        # handled, which the count read after then shows (a busy machine may get that far).
        healthy = d.sample("edgepipe_stage_healthy", stage="tag")
        handled = d.sample("edgepipe_passthrough_frames_total", stage="tag", tag="blue") or 0
        assert healthy == 1.0 or (healthy == 0.0 and handled >= 30), (healthy, handled)
        # The sink downstream writes (and reports) a little later than the stage before it counts.
        d.wait_until(lambda: (d.sample("edgepipe_record_lines_written_total", stage="rec") or 0) >= 1,
                     60, "the record sink writes")
        assert d.sample("edgepipe_sink_messages_published_total", stage="rec") is not None
        assert d.sample("edgepipe_sink_frame_age_seconds_count", stage="rec") is not None

        code, body = d.wait_until(lambda: (lambda h: h if h[0] == 503 else None)(d.healthz()), 60,
                                  "/healthz reports the stage's problem")
        assert body["status"] == "failing" and body["failing"] == ["tag"] and body["stalled"] == []
        assert body["stages"]["tag"]["state"] == "failing"
        assert body["stages"]["tag"]["reason"] == "cannot reach the test broker since frame 30"
        assert d.sample("edgepipe_stage_healthy", stage="tag") == 0.0
        before = d.sample("edgepipe_record_lines_written_total", stage="rec") or 0
        d.wait_until(lambda: (d.sample("edgepipe_record_lines_written_total", stage="rec") or 0) > before + 5,
                     60, "frames keep flowing while the stage is unhealthy")
        assert "Unhealthy: cannot reach the test broker since frame 30" in d.log
        d.wait_until(lambda: d.healthz()[0] == 200, 60, "healthy again once the stage says so")
        assert d.sample("edgepipe_stage_healthy", stage="tag") == 1.0


@pytest.mark.parametrize(
    "stages, expected",
    [
        (
            {"tag": {"type": "passthrough", "inputs": ["count"], "series": "frames_total"}},
            "stage 'tag': series 'frames_total': a series name is 'edgepipe_' then lower-case letters, digits and '_'",
        ),
        (
            # Two stages of one daemon declaring a name as different kinds: the second is refused.
            {"tag": {"type": "passthrough", "inputs": ["count"], "series": "edgepipe_shared_total"},
             "tag2": {"type": "passthrough", "inputs": ["tag"], "series": "edgepipe_shared_total",
                      "series_labels": ["zone"]}},
            "series 'edgepipe_shared_total' clashes with stage",
        ),
    ],
    ids=["bad-name", "clash"],
)
def test_a_bad_series_stops_the_start_with_one_line(tmp_path, stages, expected):
    last = list(stages)[-1]
    config = {
        "name": "badseries",
        "stages": {
            "count": {"type": "counter", "count": 5},
            **stages,
            "rec": {"type": "record", "inputs": [last], "path": str(tmp_path / "rec.jsonl")},
        },
    }
    with Daemon(config, tmp_path) as d:
        assert d.wait(120) == 1
    assert expected in d.log, d.log
    assert "Traceback" not in d.log
