"""The tracking stages' events on the brokers: the demo model's detections tracked and zoned in a
real daemon, published at once by zmq_pub, mqtt and nats. What reaches Mosquitto's
``.../events`` topic and the JetStream stream is exactly what ZeroMQ's ``events/<source>``
carries (same messages, same order), and the detection messages carry the track ids."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List

from helpers.brokers import Mosquitto, MqttReader, NatsServer, stream_messages
from helpers.daemon import Daemon, Subscriber
from helpers.net import free_port

FRAMES = 60


def test_tracker_events_reach_both_brokers_as_zeromq_sends_them(tmp_path: Path):
    pub = free_port()
    script = [
        {"shape": "square", "size": 60, "start": [20, 120], "end": [300, 120], "frames": 50},
        {"shape": "circle", "size": 50, "start": [300, 60], "end": [20, 60], "first": 5, "frames": 50},
    ]
    with Mosquitto(tmp_path / "mq") as mosquitto, NatsServer(tmp_path / "js") as nats:
        config: Dict[str, Any] = {
            "name": "ev",
            "stages": {
                "cam": {"type": "synthetic", "width": 320, "height": 240, "fps": None, "count": FRAMES,
                        "script": script},
                "prep": {"type": "letterbox", "inputs": ["cam"], "imgsz": 320},
                "det": {"type": "yolov5", "inputs": ["prep"], "weights": "builtin:demo", "imgsz": 320,
                        "device": "cpu", "threads": 1},
                "post": {"type": "nms", "inputs": ["det"]},
                "track": {"type": "tracker", "inputs": ["post"]},
                "zones": {"type": "zones", "inputs": ["track"],
                          "lines": {"middle": {"points": [[0.5, 0.0], [0.5, 1.0]], "directions": ["east", "west"]}}},
                "pub": {"type": "zmq_pub", "inputs": ["zones"], "bind": f"tcp://127.0.0.1:{pub}"},
                "mq": {"type": "mqtt", "inputs": ["zones"], "url": mosquitto.url, "state_dir": str(tmp_path / "mqs")},
                "js": {"type": "nats", "inputs": ["zones"], "servers": [nats.url], "state_dir": str(tmp_path / "jss")},
            },
        }
        with MqttReader(mosquitto.port, "edgepipe/ev/#") as reader, \
                Subscriber(f"tcp://127.0.0.1:{pub}", "") as sub, Daemon(config, tmp_path) as d:
            d.wait_ready()
            assert d.wait(300) == 0, d.log  # a finite source: it drains and ends by itself
            zmq_events: List[Dict[str, Any]] = [m for t, m in sub.snapshot() if t == "events/cam"]
            zmq_dets = [m for t, m in sub.snapshot() if t == "detections/cam"]
        stored = stream_messages(nats.url, "EDGEPIPE")
        shutil.rmtree(config.get("runtime", {}).get("dir", "/nonexistent"), ignore_errors=True)
    kinds = {e["type"] for e in zmq_events}
    assert {"new", "cross"} <= kinds, kinds  # the tracker and the line both spoke
    assert any(d.get("track_id") for m in zmq_dets for d in m["detections"])
    assert [m for _, m in reader.json("edgepipe/ev/cam/events")] == zmq_events
    assert [m["data"] for m in stored if m["subject"] == "edgepipe.ev.cam.events"] == zmq_events
    mqtt_dets = [m for _, m in reader.json("edgepipe/ev/cam/detections")]
    assert [[d["track_id"] for d in m["detections"]] for m in mqtt_dets] == \
        [[d["track_id"] for d in m["detections"]] for m in zmq_dets]
