"""Faults around the broker sinks (``mqtt``, ``nats``), with real brokers and real daemons.

- Both brokers killed (SIGKILL) mid-run and started again 10 s later, under the real detection
  pipeline plus a feed of frames carrying events: every JetStream message is stored exactly
  once, in order per source; every MQTT QoS 1 message arrives, in order per source, a repeat
  (allowed by QoS 1) byte-identical to its first copy and so recognisable by its id; the
  detector never stops (the sinks spool, /healthz names them meanwhile).
- Brokers that refuse our credentials: one log line per sink, ``connected`` 0, /healthz names
  both, and no crash loop (same worker processes, no restarts).
- Spool full (no broker for a long time): the oldest are dropped and counted, the spool stays
  within its cap, the sink's memory stays flat, and what is left goes out in order once a broker
  appears.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from helpers.brokers import (
    Feeder,
    Mosquitto,
    MqttReader,
    NatsServer,
    TcpProxy,
    event,
    feed_config,
    stream_messages,
)
from helpers.daemon import Daemon
from helpers.net import free_port

from .util import detection_pipeline, jsonl


def sample(d: Daemon, name: str, **labels: str) -> float:
    return d.sample(name, **labels) or 0.0


def data(messages: List[Tuple[str, bytes, bool]]) -> List[Tuple[str, bytes]]:
    """The detection and event messages an MQTT reader got (not the availability topic)."""
    return [(t, p) for t, p, _ in messages if t.endswith(("/detections", "/events"))]


def first_copies(messages: List[Tuple[str, bytes]]) -> Tuple[Dict[str, List[Dict[str, Any]]], int]:
    """Per topic, the messages in arrival order without repeats, and how many repeats there
    were. A repeat must be byte-identical to its first copy: that is what makes it recognisable."""
    seen: Dict[str, bytes] = {}
    out: Dict[str, List[Dict[str, Any]]] = {}
    repeats = 0
    for topic, payload in messages:
        msg = json.loads(payload)
        key = f"{topic}|{msg.get('event_id', msg.get('frame_id'))}"
        if key in seen:
            assert seen[key] == payload, f"a repeat of {key} differs from its first copy"
            repeats += 1
            continue
        seen[key] = payload
        out.setdefault(topic, []).append(msg)
    return out, repeats


def test_brokers_killed_and_back_10_s_later(tmp_path: Path):
    mosquitto = Mosquitto(tmp_path / "mosquitto", persistence=True).start()
    nats = NatsServer(tmp_path / "nats").start()
    feed = free_port()
    config = detection_pipeline(tmp_path / "out.jsonl", name="outage")
    config["stages"]["feed"] = feed_config("x", feed, {})["stages"]["feed"]
    fast = {"min_delay": 0.2, "max_delay": 2}
    for sink in ("out", "mq", "js"):
        config["stages"].setdefault(sink, {})["policy"] = "block"
    config["stages"]["mq"].update(type="mqtt", inputs=["post", "feed"], url=mosquitto.url, reconnect=fast,
                                  state_dir=str(tmp_path / "mq"))
    config["stages"]["js"].update(type="nats", inputs=["post", "feed"], servers=[nats.url], reconnect=fast,
                                  state_dir=str(tmp_path / "js"))
    stop_feeding = threading.Event()
    fed: List[int] = []

    def feeder() -> None:
        with Feeder(f"tcp://127.0.0.1:{feed}") as f:
            i = 0
            while not stop_feeding.is_set():
                f.send("cam1", i, events=[event("cam1", f"cam1-{i}", i // 10)])
                fed.append(i)
                i += 1
                time.sleep(0.05)
            time.sleep(2)  # ZeroMQ drops what is unsent when the socket closes

    try:
        with MqttReader(mosquitto.port, "edgepipe/#", client_id="fault-reader") as reader, Daemon(config, tmp_path) as d:
            d.wait_ready(180)
            thread = threading.Thread(target=feeder)
            thread.start()
            d.wait_until(lambda: sample(d, "edgepipe_broker_messages_acknowledged_total", stage="mq", kind="events") >= 20
                         and sample(d, "edgepipe_broker_messages_acknowledged_total", stage="js", kind="events") >= 20,
                         90, "deliveries before the outage")
            time.sleep(1.0)  # the reader's subscription is in Mosquitto's saved state
            mosquitto.kill(signal.SIGKILL)
            nats.kill(signal.SIGKILL)
            killed = time.monotonic()
            detected = sample(d, "edgepipe_stage_frames_sent_total", stage="post")
            status, health = d.wait_until(lambda: len(d.healthz()[1]["failing"]) == 2 and d.healthz(), 30, "both sinks failing")
            assert status == 503 and sorted(health["failing"]) == ["js", "mq"]
            time.sleep(max(0.0, 10.0 - (time.monotonic() - killed)))
            # The detector went on during the outage; the sinks spooled what they received.
            assert sample(d, "edgepipe_stage_frames_sent_total", stage="post") >= detected + 50
            for sink in ("mq", "js"):
                assert sample(d, "edgepipe_broker_spool_messages", stage=sink) >= 200
                assert sample(d, "edgepipe_broker_connected", stage=sink) == 0
            mosquitto.start()
            nats.start()
            time.sleep(3)
            stop_feeding.set()
            thread.join(30)

            def all_acknowledged() -> bool:
                for sink in ("mq", "js"):
                    received = sample(d, "edgepipe_stage_frames_received_total", stage=sink)
                    acks = sum(sample(d, "edgepipe_broker_messages_acknowledged_total", stage=sink, kind=k) for k in ("detections", "events"))
                    if received < len(fed) or acks != received + len(fed):
                        return False
                return True

            d.wait_until(all_acknowledged, 120, "every message acknowledged after the outage")
            for sink in ("mq", "js"):
                assert sample(d, "edgepipe_broker_reconnects_total", stage=sink) >= 1
                assert sum(sample(d, "edgepipe_broker_messages_dropped_total", stage=sink, reason=r)
                           for r in ("spool_full", "spool_error", "disconnected", "queue_full", "rejected", "damaged")) == 0
                assert sample(d, "edgepipe_stage_frames_dropped_total", stage=sink, reason="queue_full") == 0
            assert d.healthz()[0] == 200
            # The detector's frames keep coming until the daemon stops; these at least are in.
            scene_acked = min(sample(d, "edgepipe_stage_frames_received_total", stage=s) for s in ("mq", "js")) - len(fed)
            reader.wait_for(lambda m: len(first_copies(data(m))[0].get("edgepipe/outage/cam1/events", [])) == len(fed),
                            60, "every event at the MQTT reader")
            assert d.stop() == 0
        # What the detector emitted, every frame (the jsonl sink beside them, also 'block').
        scene_ids = [m["frame_id"] for m in jsonl(tmp_path / "out.jsonl", final=True)]
        fed_expected = {
            "edgepipe/outage/cam1/detections": fed,
            "edgepipe/outage/cam1/events": [f"cam1-{i}" for i in fed],
        }

        def check(got: Dict[str, List[Any]], sep: str) -> int:
            scene = got.pop(f"edgepipe{sep}outage{sep}scene{sep}detections")
            # Every detected frame up to those still in the spool when the daemon stopped.
            assert len(scene) >= scene_acked and scene == scene_ids[: len(scene)]
            assert got == {t.replace("/", sep): ids for t, ids in fed_expected.items()}
            return len(scene)

        # MQTT: everything, in order per source; repeats only as exact copies.
        by_topic, repeats = first_copies(data(reader.snapshot()))
        n_mqtt = check({t: [m.get("event_id", m.get("frame_id")) for m in msgs] for t, msgs in by_topic.items()}, "/")
        # JetStream: everything exactly once, in order per source.
        stored = stream_messages(nats.url, "EDGEPIPE")
        ids = [m["id"] for m in stored]
        assert len(ids) == len(set(ids)), "a message stored twice"
        by_subject: Dict[str, List[Any]] = {}
        for m in stored:
            by_subject.setdefault(m["subject"], []).append(m["data"].get("event_id", m["data"].get("frame_id")))
        n_js = check(by_subject, ".")
        print(f"\nMQTT: {n_mqtt} detected frames, {len(fed)} fed frames with an event each, {repeats} repeats "
              f"after the outage; JetStream: {n_js} detected frames, {len(fed)} fed frames and events, each stored once")
    finally:
        stop_feeding.set()
        mosquitto.stop()
        nats.stop()
        shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)


def test_refused_credentials_are_one_line_and_no_crash_loop(tmp_path: Path):
    feed = free_port()
    with Mosquitto(tmp_path / "m", users={"edge": "right"}) as mosquitto, NatsServer(tmp_path / "n", users={"edge": "right"}) as nats:
        fast = {"min_delay": 0.2, "max_delay": 0.5}
        config = feed_config("creds", feed, {
            "mq": {"type": "mqtt", "url": mosquitto.url, "username": "edge", "password": "wrong", "reconnect": fast,
                   "state_dir": str(tmp_path / "mq")},
            "js": {"type": "nats", "servers": [nats.url], "user": "edge", "password": "wrong", "reconnect": fast,
                   "state_dir": str(tmp_path / "js")},
        })
        with Daemon(config, tmp_path) as d, Feeder(f"tcp://127.0.0.1:{feed}") as f:
            d.wait_ready()
            pids = d.worker_pids()
            f.send("cam1", 0)
            d.wait_until(lambda: len(d.healthz()[1]["failing"]) == 2, 30, "both sinks failing")
            time.sleep(8)  # many attempts at a 0.5 s backoff
            status, health = d.healthz()
            assert status == 503 and sorted(health["failing"]) == ["js", "mq"]
            assert "refused the connection: Not authorized (check username and password)" in health["stages"]["mq"]["reason"]
            assert "Authorization Violation" in health["stages"]["js"]["reason"]
            for sink in ("mq", "js"):
                # One warning from the sink (its own log lines start with its name), not one per attempt.
                lines = [line for line in d.lines if re.match(rf"^\S+\s+(WARNING|ERROR)\s+{sink}: ", line)]
                assert len(lines) == 1 and "Unhealthy" in lines[0], lines
                assert sample(d, "edgepipe_broker_connected", stage=sink) == 0
                assert sample(d, "edgepipe_stage_healthy", stage=sink) == 0
                assert sample(d, "edgepipe_broker_spool_messages", stage=sink) == 1  # the one frame, kept
                assert sample(d, "edgepipe_worker_restarts_total", worker=sink) == 0
            assert d.worker_pids() == pids, "no worker was restarted"
            assert "wrong" not in d.log
            assert d.stop() == 0
        shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)


def test_a_full_spool_drops_the_oldest_and_memory_stays_flat(tmp_path: Path):
    feed, mqtt_port, nats_port = free_port(), free_port(), free_port()
    # The MQTT sink reaches its broker through a gate, opened once the test's reader listens.
    gate = TcpProxy(mqtt_port, accepting=False)
    cap = 256 * 1024
    common = {"publish": ["detections"], "spool": {"max_bytes": cap, "segment_bytes": 16384},
              "reconnect": {"min_delay": 0.2, "max_delay": 1}}
    config = feed_config("full", feed, {
        "mq": dict(common, type="mqtt", url=f"mqtt://127.0.0.1:{gate.port}", state_dir=str(tmp_path / "mq")),
        "js": dict(common, type="nats", servers=[f"nats://127.0.0.1:{nats_port}"], state_dir=str(tmp_path / "js")),
    })
    rss: Dict[int, Dict[str, float]] = {}
    with Daemon(config, tmp_path) as d, Feeder(f"tcp://127.0.0.1:{feed}") as f:
        d.wait_ready()
        sent = 0
        for checkpoint in (5000, 30000):
            while sent < checkpoint:
                f.send("cam1", sent)
                sent += 1
            d.wait_until(lambda c=checkpoint: all(sample(d, "edgepipe_stage_frames_received_total", stage=s) == c for s in ("mq", "js")),
                         120, f"{checkpoint} frames at the sinks")
            time.sleep(1.5)  # a fresh heartbeat with the worker's memory
            rss[checkpoint] = {s: sample(d, "edgepipe_worker_resident_memory_bytes", worker=s) for s in ("mq", "js")}
        kept: Dict[str, int] = {}
        for sink in ("mq", "js"):
            kept[sink] = int(sample(d, "edgepipe_broker_spool_messages", stage=sink))
            dropped = sample(d, "edgepipe_broker_messages_dropped_total", stage=sink, reason="spool_full")
            assert dropped + kept[sink] == sent, (sink, dropped, kept[sink])
            assert sample(d, "edgepipe_broker_spool_bytes", stage=sink) <= cap
            assert kept[sink] > 100
            spool_files = sum(p.stat().st_size for p in (tmp_path / sink / "spool").glob("*.seg"))
            assert spool_files <= cap + 16384
            growth = rss[30000][sink] - rss[5000][sink]
            print(f"\n{sink}: kept {kept[sink]} of {sent}, RSS {rss[5000][sink] / 1e6:.1f} MB after 5000, "
                  f"{rss[30000][sink] / 1e6:.1f} MB after 30000 messages")
            assert growth < 4e6, f"{sink} grew by {growth / 1e6:.1f} MB"
        with Mosquitto(tmp_path / "m", port=mqtt_port) as mosquitto, NatsServer(tmp_path / "n", port=nats_port) as nats:
            with MqttReader(mosquitto.port, "edgepipe/#") as reader:
                gate.accept()
                d.wait_until(lambda: all(sample(d, "edgepipe_broker_spool_messages", stage=s) == 0 for s in ("mq", "js")), 120,
                             "the spools delivered")
                mqtt_ids = reader.wait_for(lambda m: [json.loads(p)["frame_id"] for t, p, r in m if t.endswith("detections")]
                                           if sum(t.endswith("detections") for t, _, _ in m) >= kept["mq"] else None, 60)
            stored = [m["data"]["frame_id"] for m in stream_messages(nats.url, "EDGEPIPE")]
            assert mqtt_ids == list(range(sent - kept["mq"], sent)), "the newest, in order"
            assert stored == list(range(sent - kept["js"], sent)), "the newest, in order"
            d.stop()
    gate.close()
    shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)
