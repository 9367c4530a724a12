"""The broker sinks (``mqtt``, ``nats``) under load: do they keep up with 1000 detection messages
a second while both cores are busy elsewhere, and how long does a spool of 100 000 messages
take to drain once the broker is back after an outage.

    python -m benchmarks.bench_brokers            # the numbers of benchmarks/README.md (~2 min)
    python -m benchmarks.bench_brokers --smoke    # seconds
    python -m benchmarks.run --only brokers --json

Each sink runs in this process as its worker would run it (``start``, ``process`` once per
frame, ``stop``) against a real broker on loopback (Debian's ``mosquitto`` and ``nats-server``
with JetStream). "Busy elsewhere" is one spinning Python process per core at the same priority
for the whole run, so the sink's thread, the broker and the pacing loop share the CPUs with them.

- keep-up: frames paced at ``rate`` per second for ``seconds``, each with 3 detections, QoS 1 /
  JetStream (through the spool); figures: the offered and acknowledged rates, the messages still
  unacknowledged when the feeding ended, the seconds until the last was acknowledged, and
  ``process()`` time per frame (p50/p99: what the pipeline waits for).
- drain: the broker is down while ``drain`` frames are processed (all of them spooled), then it
  starts; figures: seconds until every message is acknowledged, messages per second.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from .common import Section, machine, mode_arguments, output, percentile, tempdir

MOSQUITTO = "/usr/sbin/mosquitto"
NATS_SERVER = "/usr/sbin/nats-server"
KINDS = ("mqtt", "nats")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def broker(kind: str, port: int, directory: Path) -> Iterator[None]:
    """Mosquitto or nats-server (JetStream) on 127.0.0.1:port until the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / f"{kind}.conf"
    if kind == "mqtt":
        import getpass

        conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                        "max_queued_messages 0\nmax_inflight_messages 0\n")
        argv = [shutil.which("mosquitto") or MOSQUITTO, "-c", str(conf)]
    else:
        conf.write_text(f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{directory / "js"}", max_file_store: 100G }}\n')
        argv = [shutil.which("nats-server") or NATS_SERVER, "-c", str(conf)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start on port {port}") from None
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(20)


@contextlib.contextmanager
def busy_cores(n: int) -> Iterator[None]:
    """``n`` processes spinning at the same priority as this one."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def make_sink(kind: str, port: int, state: Path) -> Any:
    from edgepipe.registry import Registry
    from edgepipe.stage import StageContext

    cls = Registry.discover().get(kind)
    where = {"url": f"mqtt://127.0.0.1:{port}"} if kind == "mqtt" else {"servers": [f"nats://127.0.0.1:{port}"]}
    config = cls.Config(inputs=["x"], publish=["detections"], state_dir=str(state),
                        reconnect={"min_delay": 0.1, "max_delay": 0.5}, **where)
    return cls(config, StageContext("bench", pipeline="bench"))


def frame(i: int) -> Any:
    from edgepipe.messages import Frame

    dets = np.array([[10, 20, 50, 80, 0.9, 0], [60, 20, 90, 70, 0.8, 1], [5, 5, 20, 30, 0.5, 0]], np.float32)
    return Frame(source="cam1", frame_id=i, timestamp=time.time(), width=1280, height=720, detections=dets,
                 names=["person", "car"])


def acked(sink: Any) -> int:
    return int(sink.m_acked.labels("detections").value)


def wait(cond: Any, timeout: float) -> Optional[float]:
    """Seconds until ``cond()`` held, None if it did not within ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.005)
    return time.monotonic() - t0


def keep_up(kind: str, tmp: Path, rate: int, seconds: float) -> Dict[str, float]:
    port = _port()
    with broker(kind, port, tmp / f"{kind}-keep-up"):
        sink = make_sink(kind, port, tmp / f"{kind}-keep-up-state")
        sink.start()
        try:
            if wait(lambda: sink.is_connected, 20) is None:
                raise RuntimeError(f"the {kind} sink did not connect")
            n = int(rate * seconds)
            costs: List[float] = []
            t0 = time.perf_counter()
            for i in range(n):
                ahead = t0 + i / rate - time.perf_counter()
                if ahead > 0.002:
                    time.sleep(ahead)
                f = frame(i)
                c = time.perf_counter()
                sink.process([f])
                costs.append(time.perf_counter() - c)
            fed = time.perf_counter() - t0
            done = acked(sink)
            tail = wait(lambda: acked(sink) >= n, 60)
            return {
                "offered_msg_per_s": round(n / fed, 1),
                "acked_msg_per_s": round(done / fed, 1),
                "unacked_at_end": n - done,
                "tail_s": round(tail if tail is not None else float("inf"), 3),
                "process_p50_us": round(percentile(costs, 50) * 1e6, 1),
                "process_p99_us": round(percentile(costs, 99) * 1e6, 1),
            }
        finally:
            sink.stop()


def drain(kind: str, tmp: Path, count: int) -> Dict[str, float]:
    port = _port()
    sink = make_sink(kind, port, tmp / f"{kind}-drain-state")
    sink.start()  # the broker is not there yet: everything goes to the spool
    try:
        t0 = time.perf_counter()
        for i in range(count):
            sink.process([frame(i)])
        spool_s = time.perf_counter() - t0
        spooled, spool_bytes = sink._spool.messages, sink._spool.bytes
        with broker(kind, port, tmp / f"{kind}-drain"):
            t1 = time.monotonic()
            took = wait(lambda: acked(sink) >= count, 300)
            if took is None:
                raise RuntimeError(f"the {kind} sink drained {acked(sink)} of {count} in 300 s")
            took = time.monotonic() - t1
            sink.stop()  # before its broker goes
        return {"spooled": spooled, "spool_bytes": spool_bytes, "spool_write_s": round(spool_s, 2),
                "drain_s": round(took, 2), "drain_msg_per_s": round(count / took, 1)}
    finally:
        sink.stop()


def run(smoke: bool = False) -> Section:
    rate, seconds, count, load = (1000, 2.0, 2000, 0) if smoke else (1000, 10.0, 100_000, os.cpu_count() or 2)
    figures: Dict[str, float] = {}
    with tempdir("edgepipe-bench-brokers-") as tmp, busy_cores(load):
        for kind in KINDS:
            for k, v in keep_up(kind, Path(tmp), rate, seconds).items():
                figures[f"{kind}_{k}"] = v
            for k, v in drain(kind, Path(tmp), count).items():
                figures[f"{kind}_drain_{k}" if not k.startswith("drain") else f"{kind}_{k}"] = v
    return {
        "setup": {"what": "broker sinks in process against Debian's mosquitto / nats-server (benchmarks/bench_brokers.py)",
                  "rate": rate, "seconds": seconds, "drain_messages": count, "busy_processes": load},
        "figures": figures,
    }


def table(section: Section) -> List[str]:
    s, f = section["setup"], section["figures"]
    lines = [f"  {s['busy_processes']} spinning processes; keep-up at {s['rate']}/s for {s['seconds']:g} s; "
             f"drain of {s['drain_messages']} spooled messages"]
    for kind in KINDS:
        lines.append(
            f"  {kind:5s} offered {f[f'{kind}_offered_msg_per_s']:7.1f}/s acked {f[f'{kind}_acked_msg_per_s']:7.1f}/s, "
            f"{f[f'{kind}_unacked_at_end']:g} unacked at the end, last ack {f[f'{kind}_tail_s']:.3f} s later, "
            f"process() p50 {f[f'{kind}_process_p50_us']:.0f} us p99 {f[f'{kind}_process_p99_us']:.0f} us; "
            f"drain {f[f'{kind}_drain_s']:.1f} s ({f[f'{kind}_drain_msg_per_s']:.0f}/s)"
        )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode_arguments(parser, long=False)
    args = parser.parse_args(argv)
    doc = {"machine": machine(), "brokers": run(args.smoke)}
    return output(doc, lambda d: table(d["brokers"]), args.json)


if __name__ == "__main__":
    sys.exit(main())
