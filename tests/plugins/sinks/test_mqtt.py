"""The ``mqtt`` sink against a real Mosquitto (Debian's), run by real ``edgepipe run`` daemons
fed through a ``zmq`` source: topics and payloads (the ZeroMQ sink's, unchanged), QoS per
kind, the retained availability topic and its last will, TLS with a client certificate and a
password, Home Assistant discovery that follows the config (removals included), the spool
surviving a daemon restart during an outage, its default place under systemd's
``$STATE_DIRECTORY``, and the pre-flight naming the missing extra."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from edgepipe_plugins.sinks._broker import default_state_dir
from helpers.brokers import (
    Feeder,
    Mosquitto,
    MqttReader,
    event,
    feed_config,
    retained,
    tls_files,
    warm_up,
)
from helpers.daemon import Daemon, Subscriber
from helpers.net import free_port

REPO = Path(__file__).resolve().parents[3]


def without_latency(msg: Dict[str, Any]) -> Dict[str, Any]:
    """A detection message without timing.latency, which each sink stamps at its own moment."""
    out = json.loads(json.dumps(msg))
    out["timing"].pop("latency")
    return out


def acked(d: Daemon, stage: str, kind: str) -> float:
    return d.sample("edgepipe_broker_messages_acknowledged_total", stage=stage, kind=kind) or 0.0


class Live:
    def __init__(self, daemon: Daemon, broker: Mosquitto, reader: MqttReader, sub: Subscriber, state: Path, sent: List[Dict[str, Any]]) -> None:
        self.d, self.broker, self.reader, self.sub, self.state, self.events = daemon, broker, reader, sub, state, sent


FRAMES = 20


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("mqtt")
    feed, pub = free_port(), free_port()
    with Mosquitto(tmp / "broker") as broker:
        config = feed_config("mq", feed, {
            # No state_dir: the spool goes to $STATE_DIRECTORY/<pipeline>/<stage>.
            "mq": {"type": "mqtt", "url": broker.url, "reconnect": {"min_delay": 0.2, "max_delay": 1}},
            "q0": {"type": "mqtt", "url": broker.url, "prefix": "q0", "qos": {"detections": 0, "events": 1},
                   "state_dir": str(tmp / "q0"), "availability": False},
            "pub": {"type": "zmq_pub", "bind": f"tcp://127.0.0.1:{pub}"},
        })
        env = {"STATE_DIRECTORY": str(tmp / "state")}
        with MqttReader(broker.port, "#") as reader, Subscriber(f"tcp://127.0.0.1:{pub}") as sub, \
                Daemon(config, tmp, env=env) as d:
            d.wait_ready()
            sent: List[Dict[str, Any]] = []
            with Feeder(f"tcp://127.0.0.1:{feed}") as f:
                warm = warm_up(f, sub)
                for i in range(FRAMES):
                    events = [event("cam1", f"cam1-{i}", 7, kind="new" if i == 0 else "update")]
                    sent += events
                    f.send("cam1", i, labels=(0, 1, 0)[: 1 + i % 3], events=events)
                d.wait_until(lambda: acked(d, "mq", "events") == FRAMES and acked(d, "q0", "events") == FRAMES
                             and acked(d, "mq", "detections") == FRAMES + warm, 60, "acknowledgements")
            live = Live(d, broker, reader, sub, tmp / "state", sent)
            live.warm = warm  # type: ignore[attr-defined]
            yield live
            assert d.stop() == 0
        shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)


def test_topics_and_payloads_are_the_zeromq_messages(live: Live):
    dets = live.reader.wait_for(lambda m: len(live.reader.json("edgepipe/mq/cam1/detections")) == FRAMES and live.reader.json("edgepipe/mq/cam1/detections"), 30)
    assert {t for t, _ in dets} == {"edgepipe/mq/cam1/detections"}
    zmq = [m for t, m in live.sub.wait_for(lambda m: sum(t == "detections/cam1" for t, _ in m) == FRAMES) if t == "detections/cam1"]
    assert [without_latency(m) for _, m in dets] == [without_latency(m) for m in zmq]
    assert [m["frame_id"] for _, m in dets] == list(range(FRAMES))
    assert [len(m["detections"]) for _, m in dets] == [1 + i % 3 for i in range(FRAMES)]
    events = live.reader.json("edgepipe/mq/cam1/events")
    assert [m for _, m in events] == live.events


def test_qos_per_topic_kind(live: Live):
    live.reader.wait_for(lambda m: len(live.reader.json("q0/mq/cam1/detections")) == FRAMES, 30)
    assert live.reader.qos["q0/mq/cam1/detections"] == 0
    assert live.reader.qos["q0/mq/cam1/events"] == 1
    assert live.reader.qos["edgepipe/mq/cam1/detections"] == 1
    d, warm = live.d, live.warm  # type: ignore[attr-defined]
    # QoS 0 never enters the spool; it is sent, and that is its delivery.
    assert d.sample("edgepipe_broker_messages_acknowledged_total", stage="q0", kind="detections") == 0
    d.wait_until(lambda: d.sample("edgepipe_broker_messages_published_total", stage="q0", kind="detections") == FRAMES + warm, 10, "sent")
    assert d.sample("edgepipe_sink_messages_published_total", stage="q0") == 2 * FRAMES + warm
    d.wait_until(lambda: d.sample("edgepipe_sink_messages_published_total", stage="mq") == 2 * FRAMES + warm, 10, "delivered")
    assert d.sample("edgepipe_sink_detections_total", stage="mq") == sum(1 + i % 3 for i in range(FRAMES))
    for stage in ("mq", "q0"):
        assert d.sample("edgepipe_broker_connected", stage=stage) == 1
        d.wait_until(lambda s=stage: d.sample("edgepipe_broker_spool_messages", stage=s) == 0, 10, "an empty spool")


def test_the_spool_lives_in_the_systemd_state_directory(live: Live):
    assert (live.state / "mq" / "mq" / "spool" / "lock").is_file()
    assert default_state_dir("mq", "out", {"STATE_DIRECTORY": "/var/lib/edgepipe/cam1:/other"}) == "/var/lib/edgepipe/cam1/mq/out"
    assert default_state_dir("mq", "out", {"HOME": "/home/u"}) == "/home/u/.local/state/edgepipe/mq/out"
    assert default_state_dir("mq", "out", {"XDG_STATE_HOME": "/xdg", "HOME": "/home/u"}) == "/xdg/edgepipe/mq/out"
    # The units give the service a state directory (writable under ProtectSystem=strict).
    for unit in ("edgepipe.service", "edgepipe@.service"):
        lines = (REPO / "deploy" / "systemd" / unit).read_text().splitlines()
        assert any(line.startswith("StateDirectory=edgepipe") for line in lines), unit


def test_availability_is_retained_with_a_last_will(live: Live):
    topic = "edgepipe/mq/availability"
    assert retained(live.broker.port, topic) == {topic: b"online"}
    d, reader = live.d, live.reader
    start = len(reader.snapshot())
    os.kill(d.worker_pids()["mq"], signal.SIGKILL)
    # The broker publishes the will at once (the connection broke), then the restarted worker
    # says it is back.
    reader.wait_for(lambda m: (topic, b"offline", False) in m[start:], 30, "the last will")
    reader.wait_for(lambda m: (topic, b"online", False) in m[start:], 60, "online again")
    assert retained(live.broker.port, topic) == {topic: b"online"}


def test_tls_with_a_client_certificate_and_a_password(tmp_path: Path):
    certs = tls_files(tmp_path / "tls")
    feed = free_port()
    users = {"edge": "s3cret"}
    with Mosquitto(tmp_path / "broker", users=users, tls=certs, require_certificate=True) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        tls = {"ca": str(certs["ca"]), "cert": str(certs["client_cert"]), "key": str(certs["client_key"])}
        config = feed_config("tls", feed, {
            "good": {"type": "mqtt", "url": url, "tls": tls, "username": "edge", "password": "${MQTT_PASSWORD}",
                     "state_dir": str(tmp_path / "good")},
            "wrong_ca": {"type": "mqtt", "url": url, "tls": dict(tls, ca=str(certs["other_ca"])), "username": "edge",
                         "password": "${MQTT_PASSWORD}", "state_dir": str(tmp_path / "bad")},
        })
        import ssl

        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        ctx.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
        with MqttReader(broker.port, "edgepipe/#", username="edge", password="s3cret", tls=ctx) as reader, \
                Daemon(config, tmp_path, env={"MQTT_PASSWORD": "s3cret"}) as d, Feeder(f"tcp://127.0.0.1:{feed}") as f:
            d.wait_ready()
            for i in range(5):
                f.send("cam1", i)
            reader.wait_for(lambda m: len(reader.json("detections")) == 5, 60, "messages over TLS")
            status, health = d.wait_until(lambda: d.healthz()[0] == 503 and d.healthz(), 30, "the failing sink")
            assert health["failing"] == ["wrong_ca"]
            assert "TLS certificate not accepted" in health["stages"]["wrong_ca"]["reason"]
            assert d.sample("edgepipe_broker_connected", stage="wrong_ca") == 0
            d.wait_until(lambda: d.sample("edgepipe_broker_spool_messages", stage="wrong_ca") == 5, 30, "5 spooled")
            assert "s3cret" not in d.log
            d.stop()
        shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)


def run_with(tmp: Path, broker: Mosquitto, ha: Any, frames: int = 3) -> Dict[str, bytes]:
    """Run a daemon with this homeassistant section until it has announced, then stop it;
    the retained Home Assistant topics as a new subscriber sees them afterwards."""
    feed = free_port()
    sink = {"type": "mqtt", "url": broker.url, "state_dir": str(tmp / "ha")}
    if ha is not None:
        sink["homeassistant"] = ha
    config = feed_config("ha", feed, {"mq": sink})
    with Daemon(config, tmp) as d, Feeder(f"tcp://127.0.0.1:{feed}") as f:
        d.wait_ready()
        for i in range(frames):
            inside = ["door"] if i == frames - 1 else []
            f.send("cam1", i, events=[event("cam1", f"e{i}", 3, zones=inside)])
            f.send("cam2", i)
        d.wait_until(lambda: acked(d, "mq", "detections") == 2 * frames, 60, "deliveries")
        time.sleep(1.0)  # the announcements' acknowledgements are recorded
        assert d.stop() == 0
    shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)
    topics = retained(broker.port, "#")
    return {t: p for t, p in topics.items() if t.startswith("homeassistant/") or "/zones/" in t}


def test_home_assistant_discovery_follows_the_config(tmp_path: Path):
    with Mosquitto(tmp_path / "broker") as broker:
        first = run_with(tmp_path, broker, {"labels": ["person", "car"], "zones": ["door"]})
        assert sorted(first) == [
            "edgepipe/ha/cam1/zones/door/occupancy",
            "edgepipe/ha/cam2/zones/door/occupancy",
            "homeassistant/binary_sensor/edgepipe_ha/cam1_door_occupancy/config",
            "homeassistant/binary_sensor/edgepipe_ha/cam2_door_occupancy/config",
            "homeassistant/sensor/edgepipe_ha/cam1_car_count/config",
            "homeassistant/sensor/edgepipe_ha/cam1_person_count/config",
            "homeassistant/sensor/edgepipe_ha/cam2_car_count/config",
            "homeassistant/sensor/edgepipe_ha/cam2_person_count/config",
        ]
        person = json.loads(first["homeassistant/sensor/edgepipe_ha/cam1_person_count/config"])
        assert person["state_topic"] == "edgepipe/ha/cam1/detections"
        assert person["availability_topic"] == "edgepipe/ha/availability"
        assert person["unique_id"] == "edgepipe_ha_cam1_person_count"
        assert "'label', 'equalto', \"person\"" in person["value_template"]
        door = json.loads(first["homeassistant/binary_sensor/edgepipe_ha/cam1_door_occupancy/config"])
        assert door["device_class"] == "occupancy" and door["state_topic"] == "edgepipe/ha/cam1/zones/door/occupancy"
        # The last event put track 3 in the door zone of cam1; cam2 has no events.
        assert first["edgepipe/ha/cam1/zones/door/occupancy"] == b"ON"
        assert first["edgepipe/ha/cam2/zones/door/occupancy"] == b"OFF"

        second = run_with(tmp_path, broker, {"labels": ["person"], "sources": ["cam1"]})
        assert sorted(second) == ["homeassistant/sensor/edgepipe_ha/cam1_person_count/config"]

        third = run_with(tmp_path, broker, None)
        assert third == {}
        assert not (tmp_path / "ha" / "homeassistant.json").exists()


def test_the_spool_survives_a_restart_during_an_outage(tmp_path: Path):
    broker = Mosquitto(tmp_path / "broker")
    feed = free_port()
    config = feed_config("outage", feed, {"mq": {"type": "mqtt", "url": broker.url, "state_dir": str(tmp_path / "st"),
                                                 "reconnect": {"min_delay": 0.2, "max_delay": 1}}})
    with Daemon(config, tmp_path) as d, Feeder(f"tcp://127.0.0.1:{feed}") as f:
        d.wait_ready()
        for i in range(30):
            f.send("cam1", i, events=[event("cam1", f"e{i}", 1)])
        d.wait_until(lambda: d.sample("edgepipe_broker_spool_messages", stage="mq") == 60, 30, "60 spooled messages")
        status, health = d.healthz()
        assert status == 503 and "cannot connect to" in health["stages"]["mq"]["reason"]
        assert d.stop() == 0
    assert "Stopped with 60 message(s) in the spool" in d.log
    with broker, MqttReader(broker.port, "edgepipe/#") as reader:
        with Daemon(config, tmp_path) as d, Feeder(f"tcp://127.0.0.1:{feed}") as f:
            d.wait_ready()
            for i in range(30, 40):
                f.send("cam1", i, events=[event("cam1", f"e{i}", 1)])
            reader.wait_for(lambda m: len(reader.json("detections")) == 40, 60, "old and new messages")
            assert "holds 60 message(s)" in d.log
            d.wait_until(lambda: d.sample("edgepipe_broker_spool_messages", stage="mq") == 0, 30, "an empty spool")
            d.stop()
        assert [m["frame_id"] for _, m in reader.json("detections")] == list(range(40))
        assert [m["event_id"] for _, m in reader.json("events")] == [f"e{i}" for i in range(40)]
    shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)


@pytest.mark.parametrize("stage,extra,module", [("mqtt", "mqtt", "paho"), ("nats", "nats", "nats")])
def test_the_pre_flight_names_the_missing_extra(stage: str, extra: str, module: str, tmp_path: Path):
    """Without the client library the check names the extra to install (the library is
    hidden from the import system the way an absent package is)."""
    script = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from edgepipe.registry import Registry\n"
        "from edgepipe.stage import StageContext, StageError\n"
        f"cls = Registry.discover().get({stage!r})\n"
        f"sink = cls(cls.Config(inputs=['x'], state_dir={str(tmp_path)!r}), StageContext('out'))\n"
        "try:\n    sink.check()\nexcept StageError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"pip install 'edgepipe[{extra}]'"), done.stdout


BROKER_CORPUS = ["bad_mqtt_url", "mqtt_url_bad_port", "bad_nats_url", "missing_mqtt_tls_file", "missing_nats_tls_file",
                 "mqtt_qos_2", "empty_mqtt_prefix", "empty_nats_subject_prefix", "mqtt_prefix_wildcard"]


@pytest.mark.parametrize("stem", BROKER_CORPUS)
def test_edgepipe_validate_refuses_bad_broker_settings(stem: str):
    """The broker sinks' entries of the fault corpus, through the real CLI: one line naming the
    path, a non-zero exit."""
    path = REPO / "tests" / "faults" / "configs" / f"{stem}.yaml"
    expect = next(line[len("# expect: "):] for line in path.read_text().splitlines() if line.startswith("# expect: "))
    done = subprocess.run([sys.executable, "-m", "edgepipe", "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], done.stderr


@pytest.mark.parametrize("stage", ["mqtt", "nats"])
def test_the_readme_documents_every_option(stage: str):
    """Each option of the sink's Config (nested ones included) is named in its README's table."""
    from edgepipe.registry import Registry
    from edgepipe.stage import StageConfig

    cls = Registry.discover().get(stage)
    text = (REPO / "plugins" / "sinks" / stage / "README.md").read_text()
    table = "\n".join(line for line in text.splitlines() if line.startswith("| `"))
    for name, field in cls.Config.model_fields.items():
        if name in StageConfig.model_fields:
            continue
        assert f"| `{name}` |" in table, f"{stage} README: no row for {name}"
        model = field.annotation
        nested = getattr(model, "__args__", (model,))[0]
        for sub in getattr(nested, "model_fields", {}):
            assert f"| `{name}.{sub}` |" in table, f"{stage} README: {name}.{sub} not described"


def test_the_dashboard_shows_every_broker_series():
    """The Grafana dashboard has a panel for each series the broker sinks declare (their data is
    checked against a live daemon with both sinks in tests/test_prometheus.py)."""
    dash = json.loads((REPO / "deploy" / "grafana" / "edgepipe.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for name in ("edgepipe_broker_messages_published_total", "edgepipe_broker_messages_acknowledged_total",
                 "edgepipe_broker_spool_messages", "edgepipe_broker_spool_bytes", "edgepipe_broker_messages_dropped_total",
                 "edgepipe_broker_connected", "edgepipe_broker_reconnects_total"):
        assert name in exprs, name
