"""The ``nats`` sink against a real nats-server with JetStream (Debian's), run by real ``edgepipe
run`` daemons fed through a ``zmq`` source: subjects, payloads and message ids in the stream it
creates; a retry after lost acknowledgements (a proxy that swallows the server's replies) stored
once; a stream that is missing and may not be created, one that does not take the subjects, and
a server without JetStream, each named in /healthz; and the fleet example of deploy/nats (a leaf
node on the device, a hub sourcing the device's stream) end to end."""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from helpers.brokers import (
    Feeder,
    NatsServer,
    TcpProxy,
    event,
    feed_config,
    stream_messages,
    warm_up,
)
from helpers.daemon import Daemon, Subscriber
from helpers.net import free_port

REPO = Path(__file__).resolve().parents[3]
FRAMES = 20


def acked(d: Daemon, stage: str, kind: str = "detections") -> float:
    return d.sample("edgepipe_broker_messages_acknowledged_total", stage=stage, kind=kind) or 0.0


def without_latency(msg: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(msg, timing=dict(msg["timing"]))
    out["timing"].pop("latency")
    return out


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def js_call(url: str, what: str, *args: Any, **kw: Any) -> Any:
    import nats

    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        return await getattr(nc.jetstream(timeout=10), what)(*args, **kw)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as s:
        yield s


class Live:
    def __init__(self, d: Daemon, server: NatsServer, zmq: List[Any], events: List[Dict[str, Any]], proxy: TcpProxy) -> None:
        self.d, self.server, self.zmq, self.events, self.proxy = d, server, zmq, events, proxy


@pytest.fixture(scope="module")
def live(server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("nats-daemon")
    feed, pub = free_port(), free_port()
    with TcpProxy(server.port) as proxy:
        config = feed_config("js", feed, {
            "js": {"type": "nats", "servers": [server.url], "state_dir": str(tmp / "js")},
            # Through a proxy that can swallow the server's replies; its own stream and subjects.
            "flaky": {"type": "nats", "servers": [f"nats://127.0.0.1:{proxy.port}"], "subject_prefix": "flaky",
                      "stream": "FLAKY", "ack_timeout": 1, "state_dir": str(tmp / "flaky"),
                      "reconnect": {"min_delay": 0.2, "max_delay": 1}},
            "pub": {"type": "zmq_pub", "bind": f"tcp://127.0.0.1:{pub}"},
        })
        with Subscriber(f"tcp://127.0.0.1:{pub}") as sub, Daemon(config, tmp) as d, Feeder(f"tcp://127.0.0.1:{feed}") as f:
            d.wait_ready()
            warm = warm_up(f, sub)
            sent: List[Dict[str, Any]] = []
            for i in range(FRAMES):
                events = [event("cam1", f"cam1-{i}", 7)]
                sent += events
                f.send("cam1", i, events=events)
            d.wait_until(lambda: acked(d, "js", "events") == FRAMES and acked(d, "flaky", "events") == FRAMES
                         and acked(d, "flaky") == FRAMES + warm, 60, "acknowledgements")
            zmq = [m for t, m in sub.wait_for(lambda m: sum(t == "detections/cam1" for t, _ in m) == FRAMES) if t == "detections/cam1"]
            live = Live(d, server, zmq, sent, proxy)
            live.warm = warm  # type: ignore[attr-defined]
            live.feeder = f  # type: ignore[attr-defined]
            yield live
            assert d.stop() == 0
        shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)


def test_subjects_payloads_and_ids_in_the_stream_it_created(live: Live):
    stored = [m for m in stream_messages(live.server.url, "EDGEPIPE") if m["subject"] != "edgepipe.js.warm.detections"]
    dets = [m for m in stored if m["subject"] == "edgepipe.js.cam1.detections"]
    events = [m for m in stored if m["subject"] == "edgepipe.js.cam1.events"]
    assert len(dets) + len(events) == len(stored) == 2 * FRAMES
    assert [without_latency(m["data"]) for m in dets] == [without_latency(m) for m in live.zmq]
    assert [m["data"] for m in events] == live.events
    for m in dets:
        assert re.fullmatch(rf"js\.cam1\.detections\.{m['data']['frame_id']}\.\d{{13}}", m["id"]), m["id"]
    for m in events:
        assert re.fullmatch(rf"js\.cam1\.events\.{m['data']['event_id']}\.\d{{13}}", m["id"]), m["id"]
    info = run(js_call(live.server.url, "stream_info", "EDGEPIPE"))
    assert info.config.subjects == ["edgepipe.>"] and info.config.duplicate_window == 120
    assert "Created JetStream stream 'EDGEPIPE'" in live.d.log
    d = live.d
    warm = live.warm  # type: ignore[attr-defined]
    assert d.sample("edgepipe_broker_messages_published_total", stage="js", kind="detections") == FRAMES + warm
    assert d.sample("edgepipe_sink_messages_published_total", stage="js") == 2 * FRAMES + warm
    assert d.sample("edgepipe_broker_connected", stage="js") == 1


def test_a_retry_is_stored_once(live: Live):
    """The server's replies are swallowed: the messages arrive and are stored, their PubAcks are
    lost. After ack_timeout the sink reconnects and sends them again with the same ids, and
    JetStream drops the repeats."""
    d, proxy = live.d, live.proxy
    warm = live.warm  # type: ignore[attr-defined]
    sent_before = d.sample("edgepipe_broker_messages_published_total", stage="flaky", kind="detections")
    connections = proxy.connections
    proxy.hold_replies()
    for i in range(FRAMES, FRAMES + 10):
        live.feeder.send("cam1", i)  # type: ignore[attr-defined]
    d.wait_until(lambda: len(stream_messages(live.server.url, "FLAKY")) == 2 * FRAMES + warm + 10, 30, "stored without acknowledgement")
    assert acked(d, "flaky") == FRAMES + warm
    proxy.release()
    d.wait_until(lambda: acked(d, "flaky") == FRAMES + warm + 10, 60, "the retry's acknowledgements")
    assert proxy.connections > connections, "the sink reconnected"
    sent = d.sample("edgepipe_broker_messages_published_total", stage="flaky", kind="detections")
    assert sent >= sent_before + 20, "every held message was sent twice"
    stored = stream_messages(live.server.url, "FLAKY")
    ids = [m["id"] for m in stored]
    assert len(ids) == len(set(ids)) == 2 * FRAMES + warm + 10
    assert [m["data"]["frame_id"] for m in stored if m["subject"] == "flaky.js.cam1.detections"] == list(range(FRAMES + 10))
    assert d.sample("edgepipe_broker_reconnects_total", stage="flaky") >= 1


def test_streams_it_cannot_use_are_named(server: NatsServer, tmp_path: Path):
    """Each problem ends in one line that names the stream (or JetStream), on /healthz and in the
    log, while the messages wait in the spool; a stream created later is picked up."""
    with NatsServer(tmp_path / "nojs", jetstream=False) as plain:
        run(js_call(server.url, "add_stream", name="ELSEWHERE", subjects=["elsewhere.>"]))
        feed = free_port()
        config = feed_config("bad", feed, {
            "missing": {"type": "nats", "servers": [server.url], "stream": "NOPE", "create_stream": False,
                        "subject_prefix": "nope", "state_dir": str(tmp_path / "a"),
                        "reconnect": {"min_delay": 0.2, "max_delay": 0.5}},
            "wrong": {"type": "nats", "servers": [server.url], "stream": "ELSEWHERE", "state_dir": str(tmp_path / "b")},
            "nojs": {"type": "nats", "servers": [plain.url], "state_dir": str(tmp_path / "c")},
        })
        with Daemon(config, tmp_path) as d, Feeder(f"tcp://127.0.0.1:{feed}") as f:
            d.wait_ready()
            f.send("cam1", 0)
            status, health = d.wait_until(lambda: len(d.healthz()[1]["failing"]) == 3 and d.healthz(), 60, "three failing sinks")
            # a sink fails on its first connection attempt, which need not wait for the frame
            d.wait_until(lambda: all(d.sample("edgepipe_broker_spool_messages", stage=n) == 1 for n in ("missing", "wrong", "nojs")),
                         60, "the frame spooled at each sink")
            assert status == 503
            reasons = {name: health["stages"][name]["reason"] for name in health["failing"]}
            assert "stream 'NOPE' does not exist" in reasons["missing"] and "create_stream is false" in reasons["missing"]
            assert "stream 'ELSEWHERE' does not take subjects edgepipe.bad.>" in reasons["wrong"]
            assert "its subjects: elsewhere.>" in reasons["wrong"]
            assert "JetStream does not answer" in reasons["nojs"]
            for name in ("missing", "wrong", "nojs"):
                assert d.sample("edgepipe_broker_connected", stage=name) == 0
                assert d.log.count(f"{name}: Unhealthy:") == 1, "one line, not one per attempt"
            run(js_call(server.url, "add_stream", name="NOPE", subjects=["nope.>"]))
            d.wait_until(lambda: acked(d, "missing") == 1, 60, "delivery once the stream exists")
            assert "missing: Healthy again" in d.log
            d.stop()
        shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)


# -- the fleet example (deploy/nats) --------------------------------------------------------------


def configured(name: str, directory: Path, **replace: str) -> Path:
    """deploy/nats/<name> with its ports and paths moved to the test's (every replaced line
    must exist, so the example cannot drift away from what this test checks)."""
    text = (REPO / "deploy" / "nats" / name).read_text()
    for old, new in replace.items():
        assert old in text, f"{name}: {old!r} not found"
        text = text.replace(old, new)
    out = directory / name
    out.write_text(text)
    return out


def readme_consumer(url: str, count: int) -> List[str]:
    """Run the Python consumer of deploy/README.md against ``url``; its first ``count`` lines."""
    text = (REPO / "deploy" / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0].replace("nats://hub.example.net:4222", url)
    proc = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: List[str] = []
    pending = b""
    try:
        # A hang bound: a message a timed-out fetch held comes back after ack_wait (30 s).
        deadline = time.monotonic() + 150
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while len(lines) < count and time.monotonic() < deadline:
            # Raw reads on the descriptor: select() cannot see what a buffered readline() has
            # already taken in, so two lines arriving together would leave the second unread.
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *done, pending = pending.split(b"\n")
            lines += [x.decode().strip() for x in done]
    finally:
        proc.kill()
        proc.wait()
    return lines[:count]


def test_the_fleet_example_leaf_to_hub(tmp_path: Path):
    """The device runs deploy/nats/leaf.conf, the centre deploy/nats/hub.conf and the FLEET
    stream of deploy/nats/fleet-stream.json. edgepipe publishes into the device's server; the
    hub's FLEET stream holds the messages, also those published while the uplink was down."""
    client, leaf_port = free_port(), free_port()
    hub = configured("hub.conf", tmp_path, **{"0.0.0.0:4222": f"127.0.0.1:{client}", "0.0.0.0:7422": f"127.0.0.1:{leaf_port}",
                                             "/var/lib/nats": str(tmp_path / "hub")})
    device = free_port()
    leaf = configured("leaf.conf", tmp_path, **{"127.0.0.1:4222": f"127.0.0.1:{device}", "change-me@hub.example.net:7422": f"pw-{leaf_port}@127.0.0.1:{leaf_port}",
                                               "/var/lib/nats": str(tmp_path / "leaf")})
    import json

    fleet = json.loads((REPO / "deploy" / "nats" / "fleet-stream.json").read_text())
    hub_server = NatsServer(tmp_path / "h", port=client, conf=hub, env={"LEAF_PASSWORD": f"pw-{leaf_port}"})
    leaf_server = NatsServer(tmp_path / "l", port=device, conf=leaf)
    feed = free_port()
    config = feed_config("cam1", feed, {"out": {"type": "nats", "servers": [f"nats://127.0.0.1:{device}"],
                                               "state_dir": str(tmp_path / "st")}})
    with hub_server, leaf_server:
        from nats.js.api import StreamConfig

        run(js_call(hub_server.url, "add_stream", StreamConfig.from_response(fleet)))
        with Daemon(config, tmp_path) as d, Feeder(f"tcp://127.0.0.1:{feed}") as f:
            d.wait_ready()
            for i in range(10):
                f.send("cam1", i)
            d.wait_until(lambda: acked(d, "out") == 10, 60, "the device's server to acknowledge")
            hub_server.stop()  # the uplink (and the centre) is down; the device keeps storing
            for i in range(10, 20):
                f.send("cam1", i)
            d.wait_until(lambda: acked(d, "out") == 20, 60, "acknowledged locally while the hub is down")
            hub_server.start()

            def central() -> Any:
                try:
                    got = stream_messages(hub_server.url, "FLEET", timeout=5)
                except Exception:  # the hub is still starting, or not yet linked to the leaf
                    return None
                return got if len(got) == 20 else None

            stored = d.wait_until(central, 90, "all 20 messages in the central FLEET stream")
            d.stop()
            assert readme_consumer(hub_server.url, 20) == ["edgepipe.cam1.cam1.detections cam1"] * 20
        assert [m["data"]["frame_id"] for m in stored] == list(range(20))
        assert {m["subject"] for m in stored} == {"edgepipe.cam1.cam1.detections"}
    shutil.rmtree(config["runtime"]["dir"], ignore_errors=True)
