"""Hostile messages pushed into the input sockets of a running detection pipeline (the ipc sockets
in its runtime directory): into ``prep`` (letterbox, a 'latest' link: read by a receiver thread)
and into ``post`` (nms, a 'block' link: read by the worker's main thread).

Each message is dropped and counted (edgepipe_stage_errors_total: ``decode`` for what does not
decode, ``process`` for a well-formed frame the stage cannot use; and
edgepipe_stage_frames_dropped_total{reason="error"}), and the worker keeps running: same pid,
detections keep coming, /healthz stays healthy. A message over the link's size limit is refused
by ZeroMQ itself (the sender is disconnected) without disturbing the worker.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, List

import msgpack
import numpy as np
import pytest
import zmq
from helpers.daemon import Daemon

from edgepipe.messages import Frame, encode
from edgepipe.transport import MAX_MESSAGE_BYTES

from .util import detection_pipeline, jsonl


def _frame(**arrays: np.ndarray) -> List[bytes]:
    frame = Frame(source="intruder", frame_id=7, timestamp=time.time(), width=64, height=64, **arrays)
    return [bytes(p) for p in encode(frame)]


def _header(arrays: list) -> bytes:
    return msgpack.packb({"v": 1, "source": "intruder", "frame_id": 1, "timestamp": 1.0, "width": 64,
                          "height": 64, "arrays": arrays})


def undecodable() -> dict:
    good = _frame(image=np.zeros((64, 64), np.uint8))
    return {
        "garbage": [b"\xc1\x00garbage"],
        "not a map": [msgpack.packb([1, 2, 3])],
        "truncated header": [good[0][: len(good[0]) // 2], good[1]],
        "truncated payload": [good[0], good[1][:100]],
        "payload longer than declared": [good[0], good[1] + b"\0" * 64],
        "missing payload part": good[:1],
        "extra payload part": good + [b"\0" * 16],
        "declared size beyond memory": [_header([["image", "uint8", [2**31 - 1, 2**31 - 1]]]), b"\0" * 64],
        "dtype not on the wire list": [_header([["image", "complex64", [8, 8]]]), b"\0" * 512],
        "dtype that is not a string": [_header([["image", ["uint8"], [8, 8]]]), b"\0" * 64],
        "wrong payload size for the dtype": [_header([["image", "float64", [8, 8]]]), b"\0" * 64],
        "0-d image": [_header([["image", "uint8", []]]), b"\0"],
    }


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inject")
    config = detection_pipeline(tmp / "out.jsonl", name="inject")
    config["stages"]["post"]["policy"] = "block"
    with Daemon(config, tmp) as d:
        d.out = tmp / "out.jsonl"
        d.rundir = config["runtime"]["dir"]
        d.wait_ready(180)
        d.wait_until(lambda: len(jsonl(d.out)) >= 5, 60, "first detections")
        yield d
    os.rmdir(config["runtime"]["dir"])


@contextlib.contextmanager
def push(d: Daemon, stage: str, messages: List[List[bytes]]) -> Iterator[None]:
    """Send ``messages`` into ``stage``'s input and keep the connection open while the caller
    waits: ZeroMQ discards what the receiver has not taken yet (its small high-water mark holds
    the rest in the kernel buffer) once the sending side disconnects, whatever the linger."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(f"ipc://{d.rundir}/{stage}.in")
    try:
        for parts in messages:
            sock.send_multipart(parts)
        yield
    finally:
        sock.close(linger=0)
        ctx.term()


def errors(d: Daemon, stage: str) -> tuple:
    return tuple(
        d.sample(name, stage=stage, **labels)
        for name, labels in (
            ("edgepipe_stage_errors_total", {"type": "decode"}),
            ("edgepipe_stage_errors_total", {"type": "process"}),
            ("edgepipe_stage_frames_dropped_total", {"reason": "error"}),
        )
    )


@pytest.mark.parametrize("stage, unusable", [
    # Decodes, but letterbox cannot use it: no image at all.
    ("prep", _frame(candidates=np.zeros((3, 7), np.float32))),
    # Decodes, but nms cannot use it: candidate rows of 3 columns instead of 5 + classes.
    ("post", _frame(candidates=np.zeros((4, 3), np.float32))),
])
def test_injected_messages_are_dropped_counted_and_the_worker_lives(daemon: Daemon, stage: str, unusable):
    pid = daemon.worker_pids()[stage]
    decode0, process0, dropped0 = errors(daemon, stage)
    bad = undecodable()
    n = len(bad)
    want = (decode0 + n, process0 + 1, dropped0 + n + 1)
    with push(daemon, stage, list(bad.values()) + [unusable]):
        try:
            daemon.wait_until(lambda: errors(daemon, stage) == want, 30,
                              f"{n} decode errors and 1 process error counted at {stage}")
        except AssertionError as exc:
            raise AssertionError(f"(decode, process, dropped) {errors(daemon, stage)}, wanted {want}: {exc}") from None
    assert daemon.worker_pids()[stage] == pid
    before = len(jsonl(daemon.out))
    daemon.wait_until(lambda: len(jsonl(daemon.out)) >= before + 5, 30, "detections keep coming")
    assert daemon.healthz()[0] == 200
    assert all(m["source"] == "scene" for m in jsonl(daemon.out))  # nothing injected got through


def test_a_message_over_the_size_limit_is_refused_without_harm(daemon: Daemon):
    """ZeroMQ reads the length, drops the connection and never allocates the message. (A calloc'd
    buffer: its pages are never touched, so this costs the test no memory either.)"""
    pid = daemon.worker_pids()["prep"]
    before = errors(daemon, "prep")
    huge = bytes(MAX_MESSAGE_BYTES + 1)  # calloc: zero pages, shared until written
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(f"ipc://{daemon.rundir}/prep.in")
    sock.send(huge, copy=False)
    time.sleep(2.0)
    sock.close(linger=0)
    ctx.term()
    del huge
    assert daemon.worker_pids()["prep"] == pid
    assert daemon.sample("edgepipe_worker_resident_memory_bytes", worker="prep") < 400e6
    n = len(jsonl(daemon.out))
    daemon.wait_until(lambda: len(jsonl(daemon.out)) >= n + 5, 30, "detections keep coming")
    assert errors(daemon, "prep") == before  # never reached the worker's decoder
    assert daemon.stop() == 0
