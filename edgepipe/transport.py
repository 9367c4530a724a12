"""Links between stages: ZeroMQ PUSH/PULL with a per-link policy and bounded queues.

A consumer binds one PULL socket for its input (``ipc://<rundir>/<stage>.in`` between processes,
``inproc://<stage>.in`` inside a worker); each producer connects one PUSH socket per consumer, so
fan-out gives every consumer every frame and fan-in merges several producers into one PULL.
High-water marks are small on both ends: no queue grows without bound.

Policies (the consumer's ``policy`` setting; producers send accordingly):

- ``block``: the producer waits for room (lossless backpressure). While it waits it keeps
  calling ``idle()`` so the worker still answers the supervisor, and gives up only when
  ``abort()`` says so (the daemon is being killed).
- ``latest``: the producer never waits: a full link drops the frame (``queue_full``). The
  consumer's receiver thread drains the link as frames come and keeps only the newest frame of
  each source, counting the others as ``skipped``, so latency never builds up behind a slow
  stage.

End-of-stream markers always go through the waiting path and are never skipped: a stage ends
when each of its upstream stages sent one. Messages that do not decode are dropped and counted,
never raised. ``MAXMSGSIZE`` caps what a PULL socket accepts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Union

import zmq

from edgepipe.messages import EndMarker, Frame, MessageError, decode, encode_eos
from edgepipe.metrics import StageMetrics
from edgepipe.ratelimit import CauseLog

log = logging.getLogger(__name__)

__all__ = [
    "HWM",
    "MAX_MESSAGE_BYTES",
    "Input",
    "Output",
    "inproc_endpoint",
]

# Messages queued per link end; a frame is at most this many deep in each socket's queue.
HWM = {"block": 4, "latest": 2}
MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # a 4K BGR frame is ~25 MB; garbage stops at this size
SEND_POLL_MS = 100
DATA_LINGER_MS = 3000  # how long a closing producer keeps trying to deliver its end marker


def inproc_endpoint(stage: str) -> str:
    """The input endpoint of ``stage`` when its producer runs in the same worker."""
    return f"inproc://{stage}.in"


Item = Union[Frame, EndMarker]


class Input:
    """The consumer end of a stage's input: one bound PULL socket.

    Under ``block`` the worker's thread reads the socket itself, so a stage that falls behind
    leaves frames queued and its producers wait. Under ``latest`` a receiver thread reads the
    socket continuously and keeps only the newest frame of each source in a slot, counting the
    frames it replaces as skipped: the queues never fill behind a slow stage, so what it gets next
    is at most one of its own processing times old. The thread wakes the worker's poll through an
    inproc pair (:attr:`pollable`).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoints: Union[str, List[str]],
        policy: str,
        metrics: Optional[StageMetrics] = None,
        hwm: Optional[int] = None,
    ) -> None:
        """Bind ``endpoints`` (one PULL may listen on ipc:// for other processes and inproc:// for
        producers in its own worker at once)."""
        if policy not in HWM:
            raise ValueError(f"link policy {policy!r} is not one of {', '.join(HWM)}")
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.policy = policy
        self._bad = CauseLog(log)
        self.metrics = metrics
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, HWM[policy] if hwm is None else hwm)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        for endpoint in self.endpoints:
            self.sock.bind(endpoint)
        self.pollable: zmq.Socket = self.sock
        self._thread: Optional[threading.Thread] = None
        if policy == "latest":
            self._lock = threading.Lock()
            self._slot: Dict[str, Frame] = {}  # source -> newest frame not yet taken
            self._ends: List[EndMarker] = []
            self._signalled = False
            self._stop = threading.Event()
            wake = f"inproc://edgepipe-wake-{id(self)}"
            self.pollable = ctx.socket(zmq.PAIR)
            self.pollable.setsockopt(zmq.LINGER, 0)
            self.pollable.bind(wake)
            self._wake_tx = ctx.socket(zmq.PAIR)
            self._wake_tx.setsockopt(zmq.LINGER, 0)
            self._wake_tx.connect(wake)
            self._thread = threading.Thread(target=self._receive, name="latest-input", daemon=True)
            self._thread.start()

    def _decode(self, parts: List[Any]) -> Optional[Item]:
        try:
            item = decode(parts)
        except MessageError as exc:
            if self.metrics is not None:
                self.metrics.errors.labels("decode").inc()
                self.metrics.dropped.labels("error").inc()
            self._bad.log(logging.WARNING, f"Dropped a message that does not decode: {exc}")
            return None
        if isinstance(item, Frame) and self.metrics is not None:
            self.metrics.received.inc()
        return item

    def _receive(self) -> None:
        """The 'latest' receiver thread: read everything, keep the newest per source."""
        while not self._stop.is_set():
            try:
                if not self.sock.poll(100, zmq.POLLIN):
                    continue
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return  # closed under us at shutdown
            item = self._decode(parts)
            if item is None:
                continue
            with self._lock:
                if isinstance(item, EndMarker):
                    self._ends.append(item)
                else:
                    if item.source in self._slot and self.metrics is not None:
                        self.metrics.dropped.labels("skipped").inc()
                    self._slot[item.source] = item
                wake = not self._signalled
                self._signalled = True
            if wake:
                self._wake_tx.send(b"")

    def recv(self, limit: int) -> List[Item]:
        """What has arrived, without waiting (``block``: at most ``limit`` items in arrival
        order; ``latest``: the newest frame of each source, then any end markers). Frames are
        counted as received, replaced ones as skipped, undecodable ones as errors."""
        if self.policy == "latest":
            while True:
                try:
                    self.pollable.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
            with self._lock:
                items: List[Item] = list(self._slot.values())
                items.extend(self._ends)
                self._slot, self._ends, self._signalled = {}, [], False
            return items
        items = []
        while len(items) < limit:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            item = self._decode(parts)
            if item is not None:
                items.append(item)
        return items

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._wake_tx.close(linger=0)
            self.pollable.close(linger=0)
        self.sock.close(linger=0)


class Output:
    """The producer end of one link: a PUSH socket connected to one consumer's input."""

    def __init__(
        self, ctx: zmq.Context, endpoint: str, policy: str, consumer: str, hwm: Optional[int] = None
    ) -> None:
        if policy not in HWM:
            raise ValueError(f"link policy {policy!r} is not one of {', '.join(HWM)}")
        self.endpoint = endpoint
        self.policy = policy
        self.consumer = consumer
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, HWM[policy] if hwm is None else hwm)
        self.sock.setsockopt(zmq.LINGER, DATA_LINGER_MS)
        # With no consumer connected yet (it is still starting or restarting), queue to the pipe
        # instead of waiting on nothing: IMMEDIATE off is the default, kept explicit here.
        self.sock.setsockopt(zmq.IMMEDIATE, 0)
        self.sock.connect(endpoint)

    def send_frame(
        self,
        parts: List[Any],
        idle: Callable[[], None],
        abort: Callable[[], bool],
        metrics: Optional[StageMetrics] = None,
    ) -> bool:
        """Send an encoded frame (:func:`edgepipe.messages.encode`, shared by every output of a
        fan-out) per policy; True when queued. ``latest`` drops at a full link (counted as
        ``queue_full`` in the producer's ``metrics``); ``block`` waits (see module docstring)."""
        if self.policy == "latest":
            for attempt in range(2):
                try:
                    self.sock.send_multipart(parts, zmq.NOBLOCK, copy=False)
                    return True
                except zmq.Again:
                    # libzmq reads the consumer's "room again" notices only now and then on
                    # send (at most about once a millisecond), so a fast producer can see a
                    # link as full that was drained long ago; a poll reads them: retry once.
                    if attempt == 0:
                        self.sock.poll(0, zmq.POLLOUT)
            if metrics is not None:
                metrics.dropped.labels("queue_full").inc()
            return False
        return self._send_waiting(parts, idle, abort)

    def send_eos(self, source: str, idle: Callable[[], None], abort: Callable[[], bool]) -> bool:
        """Send the end-of-stream marker of ``source`` (the producing stage), waiting for room."""
        return self._send_waiting(encode_eos(source), idle, abort)

    def _send_waiting(
        self, parts: List[Any], idle: Callable[[], None], abort: Callable[[], bool]
    ) -> bool:
        while True:
            try:
                self.sock.send_multipart(parts, zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
            if abort():
                return False
            self.sock.poll(SEND_POLL_MS, zmq.POLLOUT)
            idle()

    def close(self, linger_ms: Optional[int] = None) -> None:
        self.sock.close(linger=DATA_LINGER_MS if linger_ms is None else linger_ms)

