"""The cost of one hop between two stage processes, against a plain memcpy of the same bytes.

A producer process encodes a gray frame (:func:`edgepipe.messages.encode`) and sends it through
the runtime's own link classes (:class:`edgepipe.transport.Output` to
:class:`edgepipe.transport.Input`) over ``ipc://``; a consumer process receives it, decodes it
into an ndarray view (:func:`edgepipe.messages.decode`) and answers with the time it had the
frame. One frame is in flight at a time, so a hop's time is the latency of one frame, not a
queue's throughput: from before ``encode`` in the producer to after ``decode`` in the consumer,
both read from ``CLOCK_MONOTONIC``, which all processes of a Linux host share. The memcpy
baseline is ``np.copyto`` into a preallocated array of the same size. Both links policies are
measured: ``block`` (the worker thread reads the socket) and ``latest`` (a receiver thread keeps
the newest frame per source and wakes the worker).

    python -m benchmarks.bench_transport [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import PACKAGE, Section, median, mode_arguments, output, percentile

SIZES: Tuple[Tuple[str, int, int], ...] = (("640x640", 640, 640), ("1920x1080", 1920, 1080))
GOALS_MS = {"640x640": 0.2, "1920x1080": 1.0}


def _now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _consumer(endpoint: str, reply: str, policy: str) -> None:
    """Receive frames on ``endpoint`` and answer each with [frame_id, receive time in ns]."""
    import zmq

    from edgepipe.messages import EndMarker, Frame
    from edgepipe.transport import Input

    ctx = zmq.Context()
    inp = Input(ctx, endpoint, policy)
    out = ctx.socket(zmq.PUSH)
    out.connect(reply)
    out.send_json(["ready", 0])
    done = False
    while not done:
        if not inp.pollable.poll(5000, zmq.POLLIN):
            break  # the producer is gone
        for item in inp.recv(1):
            if isinstance(item, EndMarker):
                done = True
            elif isinstance(item, Frame):
                assert item.image is not None and item.image.shape[0] > 0
                out.send_json([item.frame_id, _now()])
    inp.close()
    out.close(linger=1000)
    ctx.term()


def hop_times(width: int, height: int, repeats: int, policy: str) -> List[float]:
    """Milliseconds of ``repeats`` single-frame hops of a (height, width) uint8 frame."""
    import zmq

    from edgepipe.messages import Frame, encode
    from edgepipe.transport import Output

    folder = tempfile.mkdtemp(prefix="ep-hop-")
    endpoint, reply = f"ipc://{folder}/in", f"ipc://{folder}/reply"
    ctx = zmq.Context()
    back = ctx.socket(zmq.PULL)
    back.bind(reply)
    proc = subprocess.Popen(
        [sys.executable, "-m", f"{PACKAGE}.bench_transport", "--consumer", endpoint, reply, policy],
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    out: Optional[Any] = None
    try:
        if not back.poll(60000):
            raise RuntimeError("the consumer process did not start")
        back.recv_json()
        out = Output(ctx, endpoint, policy, "bench")
        image = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
        times = []
        for i in range(repeats + 3):  # the first hops set up the connection: not counted
            t0 = _now()
            frame = Frame(source="bench", frame_id=i, timestamp=time.time(), image=image)
            out.send_frame(encode(frame), lambda: None, lambda: False)
            if not back.poll(10000):
                raise RuntimeError(f"frame {i} did not come back from the consumer")
            frame_id, t1 = back.recv_json()
            if frame_id != i:
                raise RuntimeError(f"frame {i} sent but frame {frame_id} received")
            if i >= 3:
                times.append((t1 - t0) / 1e6)
        out.send_eos("bench", lambda: None, lambda: False)
        return times
    finally:
        if out is not None:
            out.close(1000)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        back.close(0)
        ctx.term()
        for name in ("in", "reply"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        os.rmdir(folder)


def memcpy_times(width: int, height: int, repeats: int) -> List[float]:
    src = np.random.default_rng(1).integers(0, 256, (height, width), dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = _now()
        np.copyto(dst, src)
        times.append((_now() - t0) / 1e6)
    return times


def run(smoke: bool = False, sizes: Sequence[Tuple[str, int, int]] = SIZES) -> Section:
    repeats = 30 if smoke else 500
    figures: Dict[str, float] = {}
    for label, w, h in sizes:
        copy_ms = median(memcpy_times(w, h, repeats))
        figures[f"memcpy_{label}_ms"] = copy_ms
        for policy in ("block", "latest"):
            hops = hop_times(w, h, repeats, policy)
            key = f"hop_{policy}_{label}"
            figures[f"{key}_median_ms"] = median(hops)
            figures[f"{key}_p99_ms"] = percentile(hops, 99)
            figures[f"{key}_per_memcpy"] = median(hops) / copy_ms
    return {
        "setup": {
            "what": "one frame in flight over ipc://, producer encode to consumer decode, vs np.copyto",
            "repeats": repeats,
            "sizes": [s[0] for s in sizes],
            "goals_ms": {k: GOALS_MS[k] for k, _, _ in sizes if k in GOALS_MS},
        },
        "figures": {k: round(v, 4) for k, v in figures.items()},
    }


def table(section: Section) -> List[str]:
    f = section["figures"]
    lines = [f"{'frame':>10}  {'memcpy ms':>9}  {'policy':>6}  {'hop median ms':>13}  {'hop p99 ms':>10}  {'hop/memcpy':>10}  goal"]
    for label in section["setup"]["sizes"]:
        for policy in ("block", "latest"):
            key = f"hop_{policy}_{label}"
            lines.append(
                f"{label:>10}  {f[f'memcpy_{label}_ms']:>9.3f}  {policy:>6}  {f[key + '_median_ms']:>13.3f}  "
                f"{f[key + '_p99_ms']:>10.3f}  {f[key + '_per_memcpy']:>10.1f}  "
                f"<= {section['setup']['goals_ms'].get(label, float('nan')):g} ms"
            )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode_arguments(parser, long=False)
    parser.add_argument("--consumer", nargs=3, metavar=("ENDPOINT", "REPLY", "POLICY"),
                        help=argparse.SUPPRESS)  # the receiving process of a hop
    args = parser.parse_args(argv)
    if args.consumer:
        _consumer(*args.consumer)
        return 0
    return output(run(args.smoke), table, args.json)


if __name__ == "__main__":
    sys.exit(main())
