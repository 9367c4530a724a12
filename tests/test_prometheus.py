"""A real Prometheus scraping a running edgepipe: the scrape works, a per-stage rate reads back
through the HTTP API, the endpoint passes `promtool check metrics`, the alert rules evaluate
cleanly on live data, and every query of the Grafana dashboard parses and returns data (GPU
panels excepted on this CPU run), with Grafana's variables substituted the way Grafana does.
One daemon and one Prometheus serve every test in this module."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.brokers import Mosquitto, NatsServer  # noqa: E402
from helpers.daemon import Daemon  # noqa: E402
from helpers.prometheus import Prometheus, PromQLError, small_synthetic_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "edgepipe.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval); with the
# 1 s scrape here that is a few seconds; 10 s keeps enough samples on a busy test machine.
RATE_INTERVAL = "10s"

pytestmark = pytest.mark.slow


class Live:
    def __init__(self, daemon: Daemon, prometheus: Prometheus, config: Dict[str, Any]) -> None:
        self.daemon = daemon
        self.prom = prometheus
        self.config = config
        self.stages = list(config["stages"])
        self.sinks = {n for n, s in config["stages"].items() if s["type"] in ("zmq_pub", "mqtt", "nats")}
        self.source = next(n for n, s in config["stages"].items() if s["type"] == "synthetic")
        self.target = daemon.metrics_address


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("prometheus")
    rundir = tempfile.mkdtemp(prefix="ep-", dir="/tmp")  # ipc:// paths have a length limit
    config = small_synthetic_config()
    config["runtime"] = {"dir": rundir}
    (tmp / "daemon").mkdir()
    (tmp / "prom").mkdir()
    # The broker sinks too, so that the dashboard's broker panels have data.
    mosquitto, nats = Mosquitto(tmp / "mosquitto"), NatsServer(tmp / "nats")
    config["stages"]["mqtt"] = {"type": "mqtt", "inputs": ["post"], "url": mosquitto.url, "state_dir": str(tmp / "mqtt")}
    config["stages"]["nats"] = {"type": "nats", "inputs": ["post"], "servers": [nats.url], "state_dir": str(tmp / "nats-sink")}
    try:
        with mosquitto, nats, Daemon(config, tmp / "daemon") as daemon:
            target = daemon.wait_ready()
            with Prometheus(tmp / "prom", [target], rule_files=[ALERTS]) as prom:
                prom.wait_for(prom.targets_up, 30, "the edgepipe target to be scraped")
                # A full RATE_INTERVAL of scrapes: rate() over a younger series understates
                # (it divides by the whole window).
                prom.wait_for(
                    lambda: prom.query(f"count_over_time(up[{RATE_INTERVAL}]) >= 9"),
                    60,
                    f"{RATE_INTERVAL} of scrapes",
                )
                yield Live(daemon, prom, config)
            assert daemon.stop() == 0, daemon.log
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def test_per_stage_rate_reads_back(live: Live) -> None:
    fps = live.config["stages"][live.source]["fps"]
    result = live.prom.query(
        f'rate(edgepipe_source_frames_read_total{{stage="{live.source}"}}[{RATE_INTERVAL}])'
    )
    assert len(result) == 1, result
    series = result[0]
    assert series["metric"]["job"] == "edgepipe" and series["metric"]["instance"] == live.target
    rate = float(series["value"][1])
    # The synthetic source paces itself at `fps`; a busy machine may fall somewhat behind.
    assert 0.4 * fps <= rate <= 1.3 * fps, rate
    # Every stage downstream moves frames too, each under its own `stage` label.
    sent = live.prom.query(f"rate(edgepipe_stage_frames_sent_total[{RATE_INTERVAL}]) > 0")
    assert {s["metric"]["stage"] for s in sent} >= set(live.stages) - live.sinks, sent


def test_scrape_passes_promtool_check_metrics(live: Live) -> None:
    promtool = shutil.which("promtool") or pytest.fail("promtool not found (make deps)")
    text = live.daemon.metrics_text()
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


def test_alert_rules_evaluate_on_live_data(live: Live) -> None:
    """The rules load into a real Prometheus, evaluate without errors against the daemon's real
    series, and a healthy pipeline fires none of them."""

    def evaluated() -> Any:
        groups = live.prom.api("rules", type="alert")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = live.prom.wait_for(evaluated, 30, "the alert rules to be evaluated")
    assert len(rules) == 8
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    firing = [a for r in rules for a in r["alerts"] if a["state"] == "firing"]
    assert firing == [], firing


# --- the dashboard -------------------------------------------------------------------------------


def dashboard_targets() -> List[Tuple[str, str]]:
    """(panel title, expr) for every query of every panel of the dashboard."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for p in panel.get("panels", []) if panel["type"] == "row" else [panel]:
            out.extend((p["title"], t["expr"]) for t in p["targets"])
    return out


def grafana_regex(values: List[str]) -> str:
    """A multi-value variable as Grafana writes it into a Prometheus regex matcher: each value
    with its regex characters escaped (inside a PromQL string, so the backslash doubles), joined
    as (a|b); a single value stands alone."""
    escaped = [re.sub(r"([\\$^*+?.()|{}\[\]'])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, instance: str, stage: str) -> str:
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$instance", instance)
        .replace("$stage", stage)
    )


def finite_values(result: List[Dict[str, Any]]) -> List[float]:
    out = []
    for series in result:
        points = series.get("values") or [series["value"]]
        out.extend(float(v) for _, v in points if math.isfinite(float(v)))
    return out


def is_gpu_panel(expr: str) -> bool:
    return "edgepipe_gpu_" in expr


def check_queries(
    live: Live, targets: List[Tuple[str, str]], instance: str, stage: str, wait: float = 20.0
) -> List[str]:
    """Evaluate each (title, expr) as Grafana would over the last 20 s, allowing ``wait`` s for
    data; the problems found (a refused query raises PromQLError at once)."""
    problems = []
    for title, expr in targets:
        query = substitute(expr, instance, stage)
        assert "$" not in query, f"{title}: unsubstituted variable in {query!r}"

        def with_data(query: str = query) -> Any:
            end = time.time()
            result = live.prom.api(
                "query_range", query=query, start=f"{end - 20:.3f}", end=f"{end:.3f}", step="1"
            )["result"]
            return result if finite_values(result) else None

        if is_gpu_panel(expr):
            # CUDA-only series: the query must parse, and there is nothing on a CPU run.
            assert with_data() is None, f"{title}: GPU series on a CPU run"
            continue
        try:
            result = live.prom.wait_for(with_data, wait, f"{title!r} data")
        except PromQLError:
            raise
        except AssertionError as exc:
            problems.append(f"{title}: {query}\n    {str(exc).splitlines()[0]}")
            continue
        if 'stage=~"$stage"' in expr:
            stages = {s["metric"].get("stage") for s in result}
            assert stages <= set(live.stages), f"{title}: {stages}"
    return problems


def check_dashboard(live: Live, instance: str, stage: str) -> None:
    problems = check_queries(live, dashboard_targets(), instance, stage)
    assert not problems, "panels without data:\n" + "\n".join(problems)


def test_dashboard_variables(live: Live) -> None:
    """The instance and stage variables' label_values() queries, through the label API."""
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"}
    for name, query in variables.items():
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert m, f"{name}: {query!r}"
        selector = m.group(1).replace("$instance", ".*")
        values = live.prom.api(f"label/{m.group(2)}/values", **{"match[]": selector})
        expected = [live.target] if name == "instance" else sorted(live.stages)
        assert sorted(values) == expected, (name, values)


def test_every_panel_returns_data_with_all_selected(live: Live) -> None:
    """The dashboard as it opens: both variables on All (allValue .*)."""
    check_dashboard(live, instance=".*", stage=".*")


def test_every_panel_returns_data_with_values_selected(live: Live) -> None:
    """The same with the instance picked and every stage ticked, as Grafana escapes them."""
    check_dashboard(live, instance=grafana_regex([live.target]), stage=grafana_regex(live.stages))


def test_broken_panels_are_caught(live: Live) -> None:
    """The dashboard checks can fail: a misspelt metric has no data, a syntax error is refused."""
    typo = [("typo", 'sum by (stage) (rate(edgepipe_stage_frames_sentt_total{instance=~"$instance"}[$__rate_interval]))')]
    assert len(check_queries(live, typo, ".*", ".*", wait=3.0)) == 1
    with pytest.raises(PromQLError, match="parse error"):
        check_queries(live, [("syntax", "rate(edgepipe_stage_frames_sent_total[$__rate_interval]")], ".*", ".*")
