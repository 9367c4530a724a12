"""The deployment files, checked by the tools that consume them: systemd-analyze (verify and the
offline security score) for the units, promtool for the scrape config and the alert rules (with
their unit tests), and the dashboard's structure against the metric names the daemon exports.
The dashboard's queries are evaluated against a real Prometheus in test_prometheus.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import yaml
from helpers.samples import exported_series

from edgepipe.config import RuntimeConfig

# Every family a daemon of first-party stages exports: the core ones and those the plugins declare.
EXPORTED = exported_series()

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "deploy" / "systemd"
PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
UNITS = ("edgepipe.service", "edgepipe@.service")
EXPOSURE_GOAL = 2.5


def tool(name: str) -> str:
    """Path of a command the test drives; missing is a failure (make deps installs it)."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian packages listed in the Makefile (make deps)")
    return path


def run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=120)


# --- systemd -----------------------------------------------------------------------------------


def unit_entries(text: str, section: str = "Service") -> List[Tuple[str, str]]:
    """(key, value) pairs of one section of a unit file, in order, comments dropped."""
    entries, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            entries.append((key.strip(), value.strip()))
    return entries


def unit_value(text: str, key: str) -> str:
    values = [v for k, v in unit_entries(text) if k == key]
    assert values, f"{key}= missing"
    return values[-1]


def installed_edgepipe() -> Path:
    exe = Path(sys.executable).parent / "edgepipe"
    if not exe.is_file():
        pytest.fail(f"{exe} missing: install the project into the venv (pip install -e .)")
    return exe


def installed_copy(unit: str, dest: Path, instance: str = "cam1") -> Path:
    """The unit as an installed instance whose ExecStart names the venv's `edgepipe`."""
    text = (SYSTEMD / unit).read_text()
    shipped = unit_value(text, "ExecStart").split()[0]
    assert shipped == "/opt/edgepipe/venv/bin/edgepipe", "deploy/README.md documents this path"
    text = text.replace(f"ExecStart={shipped} ", f"ExecStart={installed_edgepipe()} ")
    name = unit.replace("@.", f"@{instance}.")
    out = dest / name
    out.write_text(text)
    return out


def verify(unit_path: Path) -> List[str]:
    """systemd-analyze verify; returns the complaints about our files (other noise dropped)."""
    proc = run(tool("systemd-analyze"), "verify", str(unit_path), cwd=unit_path.parent)
    ours = [line for line in proc.stderr.splitlines() if unit_path.name.split(".")[0] in line]
    if proc.returncode != 0 and not ours:
        ours = proc.stderr.splitlines() or [f"exit status {proc.returncode}"]
    return ours


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    path = installed_copy(unit, tmp_path)
    assert verify(path) == []


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and an unresolvable ExecStart are reported."""
    path = installed_copy("edgepipe@.service", tmp_path)
    path.write_text(path.read_text().replace("KillMode=mixed", "KilMode=mixed"))
    assert any("KilMode" in line for line in verify(path))
    shipped = tmp_path / "edgepipe@cam2.service"
    shipped.write_text((SYSTEMD / "edgepipe@.service").read_text())
    assert any("/opt/edgepipe/venv/bin/edgepipe" in line for line in verify(shipped))


def test_jetson_csi_dropin_verifies(tmp_path: Path) -> None:
    path = installed_copy("edgepipe@.service", tmp_path)
    dropin = tmp_path / f"{path.name}.d"
    dropin.mkdir()
    shutil.copy(SYSTEMD / "jetson-csi.conf", dropin)
    # nvargus-daemon.service ships with L4T only; a minimal stand-in lets the dependency resolve.
    (tmp_path / "nvargus-daemon.service").write_text(
        "[Unit]\nDescription=Argus daemon stand-in\n[Service]\nExecStart=/bin/true\n"
    )
    assert verify(path) == []
    text = (SYSTEMD / "jetson-csi.conf").read_text()
    assert "BindPaths=/tmp/argus_socket" in text.splitlines()


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure(unit: str, tmp_path: Path) -> None:
    path = installed_copy(unit, tmp_path)
    proc = run(tool("systemd-analyze"), "security", "--offline=yes", str(path), cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    score = float(match.group(1))
    print(f"\nsystemd-analyze security --offline=yes {unit}: exposure {score}")
    assert score <= EXPOSURE_GOAL, proc.stdout


def test_units_share_their_hardening() -> None:
    """edgepipe.service is edgepipe@.service with the instance fixed; they must not drift."""
    template = unit_entries((SYSTEMD / "edgepipe@.service").read_text())
    single = unit_entries((SYSTEMD / "edgepipe.service").read_text())
    expected = [
        (k, v.replace("/etc/edgepipe/%i.", "/etc/edgepipe/config.").replace("edgepipe/%i", "edgepipe"))
        for k, v in template
    ]
    assert single == expected


@pytest.mark.parametrize("unit", UNITS)
def test_unit_fits_the_daemon(unit: str) -> None:
    """The service settings the supervisor relies on, and timeouts that leave its own first."""
    text = (SYSTEMD / unit).read_text()
    defaults = RuntimeConfig()
    assert unit_value(text, "Type") == "notify"
    assert unit_value(text, "NotifyAccess") == "main"
    assert unit_value(text, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit_value(text, "KillMode") == "mixed"
    assert unit_value(text, "Restart") == "on-failure"
    assert float(unit_value(text, "TimeoutStopSec")) > defaults.stop_timeout
    assert float(unit_value(text, "TimeoutStartSec")) > defaults.start_timeout
    assert float(unit_value(text, "WatchdogSec")) > defaults.hang_timeout
    assert unit_value(text, "RuntimeDirectory").startswith("edgepipe")
    assert unit_value(text, "DevicePolicy") == "closed"
    allowed = [v for k, v in unit_entries(text) if k == "DeviceAllow"]
    for node in ("char-video4linux rw", "char-nvidia* rw", "/dev/nvmap rw", "char-nvhost* rw"):
        assert node in allowed
    assert unit_value(text, "CapabilityBoundingSet") == ""
    assert unit_value(text, "SupplementaryGroups") == "video"


# --- Prometheus --------------------------------------------------------------------------------


def test_alert_rules_check() -> None:
    proc = run(tool("promtool"), "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout


def test_alert_rules_unit_tests() -> None:
    proc = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_unit_tests_cover_every_alert_both_ways() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {
        "EdgepipeStageStalled", "EdgepipeFpsLow", "EdgepipeDropRatioHigh",
        "EdgepipeSourceReconnecting", "EdgepipeWorkerRestarting",
    } <= alerts
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired: Dict[str, int] = {}
    quiet: Dict[str, int] = {}
    for t in tests:
        for case in t["alert_rule_test"]:
            target = fired if case["exp_alerts"] else quiet
            target[case["alertname"]] = target.get(case["alertname"], 0) + 1
    assert set(fired) == alerts, f"alerts never expected to fire: {alerts - set(fired)}"
    assert set(quiet) == alerts, f"alerts never expected to stay quiet: {alerts - set(quiet)}"
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        names = set(re.findall(r"\bedgepipe_[a-z_]+", rule["expr"]))
        assert names <= set(EXPORTED), f"{rule['alert']}: unknown metric(s) {names - set(EXPORTED)}"


def test_rules_fail_when_a_threshold_changes(tmp_path: Path) -> None:
    """The unit tests pin the thresholds: a looser drop ratio breaks them."""
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(PROMETHEUS / name, tmp_path)
    rules = tmp_path / "alerts.yml"
    text = rules.read_text()
    assert "> 0.05" in text
    rules.write_text(text.replace("> 0.05", "> 0.5"))
    proc = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "EdgepipeDropRatioHigh" in proc.stdout + proc.stderr


def test_scrape_config_check() -> None:
    proc = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "edgepipe")
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9310"]


# --- Grafana -----------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads((GRAFANA / "edgepipe.json").read_text())


def dashboard_panels() -> List[dict]:
    out = []
    for panel in dashboard()["panels"]:
        out.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return out


def dashboard_exprs() -> List[Tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p["targets"]]


def metric_names(expr: str) -> set:
    names = set(re.findall(r"\bedgepipe_[a-z_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n not in EXPORTED else n for n in names}


def test_dashboard_is_templated() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "stage"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["multi"] and variables[name]["includeAll"]
    assert "edgepipe_" in variables["instance"]["query"]["query"]
    assert '$instance' in variables["stage"]["query"]["query"]
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_use_known_metrics_and_variables() -> None:
    exprs = dashboard_exprs()
    assert exprs
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: no edgepipe metric in {expr!r}"
        assert names <= set(EXPORTED), f"{title}: unknown metric(s) {names - set(EXPORTED)}"
        assert 'instance=~"$instance"' in expr, f"{title}: not filtered by $instance"
        for fn in re.findall(r"\b(rate|increase|irate)\(", expr):
            assert fn != "irate", f"{title}: irate ignores $__rate_interval"
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert all(w == "$__rate_interval" for w in windows), f"{title}: windows {windows}"
        if all(n.startswith(("edgepipe_stage_", "edgepipe_source_", "edgepipe_sink_", "edgepipe_detector_", "edgepipe_gpu_")) for n in names):
            assert 'stage=~"$stage"' in expr, f"{title}: per-stage query not filtered by $stage"


def test_dashboard_covers_the_issue_panels() -> None:
    used = set().union(*(metric_names(e) for _, e in dashboard_exprs()))
    required = {
        "edgepipe_source_frames_read_total",  # pipeline fps
        "edgepipe_stage_processing_seconds",  # per-stage latency p50/p95/p99
        "edgepipe_stage_frames_dropped_total",  # drops by reason
        "edgepipe_sink_frame_age_seconds",  # frame age
        "edgepipe_source_reconnects_total",
        "edgepipe_worker_restarts_total",
        "edgepipe_worker_cpu_seconds_total",
        "edgepipe_worker_resident_memory_bytes",
        "edgepipe_gpu_memory_allocated_bytes",
        "edgepipe_sink_detections_total",
        "edgepipe_stage_busy_seconds_total",  # utilization
    }
    assert required <= used, f"no panel for {required - used}"
    latency = [e for _, e in dashboard_exprs() if "edgepipe_stage_processing_seconds_bucket" in e]
    assert {q for e in latency for q in re.findall(r"histogram_quantile\((0\.\d+)", e)} == {"0.5", "0.95", "0.99"}
    reasons = [e for _, e in dashboard_exprs() if "edgepipe_stage_frames_dropped_total" in e]
    assert any("reason" in e for e in reasons)


def test_dashboard_layout() -> None:
    """Unique panel ids, a 24-column grid, and no two panels on the same cells."""
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells


def test_grafana_provisioning() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "edgepipe.yaml").read_text())
    assert sources["apiVersion"] == 1
    (ds,) = sources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http://")
    prom = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    # Grafana sizes $__rate_interval from timeInterval: it must match the scrape interval.
    assert ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    boards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "edgepipe.yaml").read_text())
    (provider,) = boards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    readme = (REPO / "deploy" / "README.md").read_text()
    assert provider["options"]["path"] in readme, "deploy/README.md says where to put the JSON"
