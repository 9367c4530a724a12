"""What the broker sinks (``mqtt``, ``nats``) share: the options, the messages, the spool in
front of the connection, and the series a dashboard reads.

A broker sink turns each frame into the messages the ZeroMQ sink publishes (the detection
message of :func:`edgepipe.messages.detection_message`, and each event of ``Frame.events`` as
it is) and hands them to a delivery thread the sink owns. Messages that must not be lost (MQTT
QoS 1, every JetStream message) are appended to the sink's :class:`~._spool.Spool` first and
leave it only when the broker acknowledges them, so ``process()`` never waits for a broker: a
sink that cannot deliver spools, it does not hold up the detector. The delivery thread sends
from the spool, oldest first, at most ``window`` messages unacknowledged at a time; when a
connection is lost it rewinds to the oldest unacknowledged message and sends from there on the
next connection, so the order per source is kept and a message is repeated only when its
acknowledgement was lost (every message carries an id for that, see :func:`message_id`).
Messages that may be lost (MQTT QoS 0) skip the spool and are dropped, counted, while there is
no connection.

Each sink keeps its spool (and what else it must remember across restarts) in its state
directory: ``state_dir`` when set, else ``$STATE_DIRECTORY/<pipeline>/<stage>`` under systemd
(``StateDirectory=`` in deploy/systemd), else ``$XDG_STATE_HOME/edgepipe/<pipeline>/<stage>``
(``~/.local/state/...``): see :func:`default_state_dir`.
"""

from __future__ import annotations

import abc
import collections
import hashlib
import importlib
import os
import random
import tempfile
import threading
import time
import urllib.parse
from typing import Any, ClassVar, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

import msgpack
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgepipe.messages import Frame, detection_message, dumps
from edgepipe.stage import ExistingFile, StageConfig, StageContext, StageError

from ._common import DeliveringSink
from ._spool import Spool, SpoolError

__all__ = [
    "DROP_REASONS",
    "KINDS",
    "Options",
    "BrokerSink",
    "BrokerSinkConfig",
    "Outgoing",
    "ReconnectConfig",
    "SpoolConfig",
    "TlsConfig",
    "default_state_dir",
    "message_id",
    "parse_url",
    "topic_parts",
]

KINDS: Tuple[str, ...] = ("detections", "events")
# Why a message was dropped (edgepipe_broker_messages_dropped_total{reason}).
DROP_REASONS: Tuple[str, ...] = ("spool_full", "spool_error", "disconnected", "queue_full", "rejected", "damaged")
MiB = 1024 * 1024


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpoolConfig(Options):
    max_bytes: int = Field(
        100 * MiB,
        ge=64 * 1024,
        description="Bytes of unacknowledged messages the on-disk spool holds at most; beyond it "
        "the oldest are dropped (counted as reason 'spool_full').",
    )
    segment_bytes: int = Field(
        4 * MiB, ge=4096, le=256 * MiB, description="Size of one spool file; a file goes once all of it is acknowledged."
    )
    fsync_interval: float = Field(
        1.0,
        ge=0,
        le=60,
        description="Seconds between fsyncs while unacknowledged messages wait (0: every batch). "
        "A killed process loses nothing either way; a power cut loses at most this much.",
    )


class ReconnectConfig(Options):
    min_delay: float = Field(0.5, gt=0, le=60, description="Seconds before the first reconnection attempt.")
    max_delay: float = Field(
        30.0, gt=0, le=3600, description="Longest wait between attempts; the wait doubles from min_delay up to this."
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectConfig:
        if self.max_delay < self.min_delay:
            raise ValueError(f"max_delay ({self.max_delay:g}) is below min_delay ({self.min_delay:g})")
        return self


class TlsConfig(Options):
    ca: Optional[ExistingFile] = Field(
        None, description="CA certificate(s) (PEM) to verify the server with; default: the system's CAs."
    )
    cert: Optional[ExistingFile] = Field(None, description="Client certificate (PEM), for servers that require one.")
    key: Optional[ExistingFile] = Field(None, description="Private key of the client certificate (PEM).")
    verify_hostname: bool = Field(
        True, description="Check that the server's certificate names the host connected to."
    )

    @model_validator(mode="after")
    def _pairs(self) -> TlsConfig:
        if self.key is not None and self.cert is None:
            raise ValueError("key is set without cert")
        return self

    def context(self) -> Any:
        """An ssl.SSLContext for a client with these settings."""
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.check_hostname = self.verify_hostname
        if self.cert is not None:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


def parse_url(value: str, schemes: Dict[str, int]) -> Tuple[str, str, int]:
    """``scheme://host[:port]`` -> (scheme, host, port), the port defaulting per scheme;
    ValueError with one line saying what is wrong."""
    expected = f"expected {'|'.join(schemes)}://host[:port]"
    if not isinstance(value, str) or "://" not in value:
        raise ValueError(expected)
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{expected} ({exc})") from None
    if parts.scheme not in schemes:
        raise ValueError(f"scheme {parts.scheme!r} is not one of {', '.join(schemes)}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("put credentials in the user name and password options, not in the URL")
    if not parts.hostname:
        raise ValueError(f"{expected}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{expected}: a path or query is not expected")
    if port == 0:
        raise ValueError(f"{expected}: port 0")
    return parts.scheme, parts.hostname, port or schemes[parts.scheme]


class BrokerSinkConfig(StageConfig):
    publish: List[str] = Field(
        ["detections", "events"],
        min_length=1,
        description="What to publish: 'detections' (one message per frame) and/or 'events' (the "
        "event messages of tracking stages, when frames carry any).",
    )
    state_dir: Optional[str] = Field(
        None,
        min_length=1,
        description="Directory for the spool and what the sink must remember across restarts. "
        "Default: $STATE_DIRECTORY/<pipeline>/<stage> under systemd, else "
        "$XDG_STATE_HOME/edgepipe/<pipeline>/<stage> (~/.local/state/...).",
    )
    spool: SpoolConfig = Field(default_factory=SpoolConfig, description="The on-disk spool.")  # type: ignore[arg-type]
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig, description="Reconnection backoff.")  # type: ignore[arg-type]
    window: int = Field(
        256, ge=1, le=65535, description="Messages sent and not yet acknowledged at most (in flight)."
    )
    linger: float = Field(
        2.0,
        ge=0,
        le=60,
        description="Seconds the sink keeps delivering when it stops; what is left stays in the "
        "spool for the next start.",
    )

    @field_validator("publish")
    @classmethod
    def _kinds(cls, value: List[str]) -> List[str]:
        for kind in value:
            if kind not in KINDS:
                raise ValueError(f"{kind!r} is not one of {', '.join(KINDS)}")
        if len(set(value)) != len(value):
            raise ValueError("lists a kind twice")
        return value


def default_state_dir(pipeline: str, stage: str, env: Optional[Dict[str, str]] = None) -> str:
    """Where a sink keeps its state when ``state_dir`` is not set (see the module docstring).
    ``$STATE_DIRECTORY`` may list several directories (``:``-separated); the first is used."""
    env = dict(os.environ) if env is None else env
    base = (env.get("STATE_DIRECTORY") or "").split(":")[0]
    if not base:
        xdg = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "state")
        base = os.path.join(xdg, "edgepipe")
    return os.path.join(base, pipeline, stage)


def message_id(pipeline: str, source: str, kind: str, frame: Frame, event: Optional[Dict[str, Any]] = None) -> str:
    """The id that makes a repeated message recognisable (``Nats-Msg-Id``; for MQTT the
    payload's own fields): pipeline, source, the frame id (detections) or ``event_id`` (events),
    and the capture time in milliseconds, because frame and event ids start again at 0 when the
    daemon restarts while a broker may still remember the previous run's ids (JetStream's
    duplicate window). An event without ``event_id`` is identified by a digest of its content."""
    ms = int(round(frame.timestamp * 1000))
    if kind == "detections":
        return f"{pipeline}.{source}.detections.{frame.frame_id}.{ms}"
    assert event is not None
    eid = event.get("event_id")
    if not isinstance(eid, (str, int)) or isinstance(eid, bool) or eid == "":
        eid = hashlib.sha256(dumps(event)).hexdigest()[:20]
    return f"{pipeline}.{source}.events.{eid}.{ms}"


class Outgoing(NamedTuple):
    """One message on its way: its spool seq (-1 outside the spool), kind, source, id, payload,
    and for the sink's standard series the frame's capture time and detection count."""

    seq: int
    kind: str
    source: str
    msg_id: str
    body: bytes
    timestamp: float
    detections: int

    def record(self) -> bytes:
        return msgpack.packb(
            [KINDS.index(self.kind), self.source, self.msg_id, self.timestamp, self.detections, self.body],
            use_bin_type=True,
        )

    @classmethod
    def from_record(cls, seq: int, data: bytes) -> Outgoing:
        """ValueError when ``data`` is not a record of ours (the spool's CRC makes that unlikely)."""
        try:
            kind, source, msg_id, ts, n, body = msgpack.unpackb(data, raw=False)
            return cls(seq, KINDS[kind], str(source), str(msg_id), bytes(body), float(ts), int(n))
        except Exception as exc:  # msgpack raises many types on foreign data
            raise ValueError(f"spool record {seq} is not a message ({type(exc).__name__})") from None


class BrokerSink(DeliveringSink):
    """Base of the broker sinks; see the module docstring.

    A subclass sets ``protocol`` (for messages), ``requirement`` (module, PyPI package, extra) and
    implements :meth:`serve` (the delivery thread's body, started by :meth:`start`, which must
    return soon after ``self.stopping`` is set) and :meth:`reliable` (whether a kind goes
    through the spool). From the delivery thread it uses :meth:`take`, :meth:`sent`,
    :meth:`acknowledged`, :meth:`connection_up`, :meth:`connection_lost`, :meth:`failing`,
    :meth:`backoff` and :meth:`housekeeping`.
    """

    protocol: ClassVar[str] = ""
    requirement: ClassVar[Tuple[str, str, str]] = ("", "", "")  # module, PyPI package, extra
    accepts: ClassVar[Tuple[str, ...]] = ("detections",)
    config: BrokerSinkConfig

    _spool: Optional[Spool] = None
    _thread: Optional[threading.Thread] = None

    def __init__(self, config: BrokerSinkConfig, context: StageContext) -> None:
        super().__init__(config, context)
        self.pipeline = context.pipeline
        m = self.metrics
        self.m_sent = m.counter(
            "edgepipe_broker_messages_published_total",
            "Messages a broker sink sent to its broker, by kind; a message sent again after a "
            "lost connection counts again.",
            labels=("kind",),
        )
        self.m_acked = m.counter(
            "edgepipe_broker_messages_acknowledged_total",
            "Messages the broker acknowledged (MQTT QoS 1 PUBACK, JetStream PubAck), by kind; each once.",
            labels=("kind",),
        )
        self.m_dropped = m.counter(
            "edgepipe_broker_messages_dropped_total",
            "Messages a broker sink gave up, by reason: spool_full (oldest dropped for room), "
            "spool_error (the disk refused the write), disconnected and queue_full (QoS 0 only), "
            "rejected (refused by the broker for good), damaged (found damaged in the spool).",
            labels=("reason",),
        )
        self.m_spool_messages = m.gauge(
            "edgepipe_broker_spool_messages", "Messages in the spool waiting for the broker's acknowledgement."
        )
        self.m_spool_bytes = m.gauge("edgepipe_broker_spool_bytes", "Bytes of the messages in the spool.")
        self.m_connected = m.gauge("edgepipe_broker_connected", "1 while the sink is connected to its broker.")
        self.m_reconnects = m.counter(
            "edgepipe_broker_reconnects_total", "Times the sink connected again after losing or failing a connection."
        )
        for kind in KINDS:
            self.m_sent.labels(kind)
            self.m_acked.labels(kind)
        for reason in DROP_REASONS:
            self.m_dropped.labels(reason)
        self.stopping = threading.Event()
        self.is_connected = False
        self._ever_connected = False
        self._failures = 0
        self._inflight: Dict[int, Outgoing] = {}
        self._direct: Deque[Outgoing] = collections.deque()
        self._direct_limit = max(64, 4 * config.window)
        self._publish = frozenset(config.publish)
        self._spool_failing = False

    # -- what a subclass provides --------------------------------------------------------------

    def reliable(self, kind: str) -> bool:
        """Whether messages of ``kind`` go through the spool (acknowledged delivery)."""
        return True

    @abc.abstractmethod
    def serve(self) -> None:
        """The delivery thread: connect, deliver, reconnect, until ``self.stopping``."""

    def wake(self) -> None:
        """Tell the delivery thread that there is something new to send (from any thread)."""

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def state_dir(self) -> str:
        if self.config.state_dir:
            return os.path.abspath(os.path.expanduser(self.config.state_dir))
        return default_state_dir(self.pipeline, self.name)

    def check(self) -> None:
        module, package, extra = self.requirement
        try:
            importlib.import_module(module)
        except ImportError:
            raise StageError(
                f"the {self.protocol} sink needs {package}: pip install 'edgepipe[{extra}]'"
            ) from None
        # Try it rather than trust permission bits (root passes os.access on read-only mounts);
        # the probe is a temporary file in the nearest existing directory, removed at once.
        folder = self.state_dir
        while not os.path.isdir(folder):
            if os.path.exists(folder):
                raise StageError(f"{self.protocol} sink state directory {self.state_dir!r}: {folder!r} is not a directory")
            folder = os.path.dirname(folder)
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            raise StageError(
                f"{self.protocol} sink state directory {self.state_dir!r} is not writable "
                f"({folder!r}: {exc.strerror or exc}); set state_dir"
            ) from None

    def start(self) -> None:
        self.check()
        spool_dir = os.path.join(self.state_dir, "spool")
        s = self.config.spool
        self._spool = Spool(spool_dir, s.max_bytes, s.segment_bytes, s.fsync_interval)
        try:
            self._spool.open()
        except (SpoolError, OSError) as exc:
            self._spool = None
            raise StageError(str(exc) if isinstance(exc, SpoolError) else f"spool {spool_dir!r}: {exc}") from None
        if self._spool.lost_records:
            self.m_dropped.labels("damaged").inc(self._spool.lost_records)
        backlog = self._spool.messages
        if backlog:
            self.log.info(
                "Spool %r holds %d message(s) (%d bytes) from before; delivering them first",
                spool_dir, backlog, self._spool.bytes,
            )
        self.update_gauges()
        self.m_connected.set(0)
        self.prepare()
        self._thread = threading.Thread(target=self._serve, name=f"{self.protocol}-{self.name}", daemon=True)
        self._thread.start()

    def prepare(self) -> None:  # noqa: B027 - an optional hook
        """Called in start() after the spool is open, before the delivery thread starts."""

    def _serve(self) -> None:
        try:
            self.serve()
        except Exception as exc:  # the thread must not die silently: the sink would stop delivering
            self.log.exception("Delivery thread failed: %s", exc)
            self.failing(f"delivery thread failed: {type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self.stopping.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(self.config.linger + 15.0)
            if self._thread.is_alive():
                self.log.warning("Delivery thread did not end in time")
            self._thread = None
        if self._spool is not None:
            self.update_gauges()
            left = self._spool.messages
            self._spool.close()
            self._spool = None
            if left:
                self.log.info("Stopped with %d message(s) in the spool; they go out on the next start", left)
        self.m_connected.set(0)

    # -- the worker's side -----------------------------------------------------------------------

    def process(self, frames: List[Frame]) -> None:
        spooled: List[bytes] = []
        now = time.time()
        for frame in frames:
            if "detections" in self._publish:
                body = dumps(detection_message(frame, published_at=now))
                n = 0 if frame.detections is None else len(frame.detections)
                mid = message_id(self.pipeline, frame.source, "detections", frame)
                self._route(Outgoing(-1, "detections", frame.source, mid, body, frame.timestamp, n), spooled)
            if "events" in self._publish:
                for event in frame.events:
                    mid = message_id(self.pipeline, frame.source, "events", frame, event)
                    self._route(Outgoing(-1, "events", frame.source, mid, dumps(event), frame.timestamp, 0), spooled)
            self.observe(frame)
        if spooled:
            assert self._spool is not None
            try:
                dropped = self._spool.append(spooled)
            except OSError as exc:  # a full or failing disk: drop, count, keep the pipeline going
                self.m_dropped.labels("spool_error").inc(len(spooled))
                if not self._spool_failing:
                    self.log.warning("Spool %r cannot be written (%s): dropping messages until it can", self._spool.directory, exc.strerror or exc)
                self._spool_failing = True
                dropped = 0
            else:
                if self._spool_failing:
                    self.log.info("Spool %r is writable again", self._spool.directory)
                self._spool_failing = False
            if dropped:
                self.m_dropped.labels("spool_full").inc(dropped)
        self.update_gauges()
        self.wake()

    def observe(self, frame: Frame) -> None:  # noqa: B027 - an optional hook
        """Look at each frame after its messages are queued (Home Assistant state...)."""

    def _route(self, msg: Outgoing, spooled: List[bytes]) -> None:
        if self.reliable(msg.kind):
            spooled.append(msg.record())
        elif not self.is_connected:
            self.m_dropped.labels("disconnected").inc()
        elif len(self._direct) >= self._direct_limit:
            self.m_dropped.labels("queue_full").inc()
        else:
            self._direct.append(msg)

    # -- the delivery thread's side --------------------------------------------------------------

    def take(self, limit: Optional[int] = None) -> List[Outgoing]:
        """Messages to send now, oldest first: spooled ones while the window has room (they are
        then in flight until :meth:`acknowledged`), then QoS 0 ones (not tracked)."""
        assert self._spool is not None
        room = self.config.window - len(self._inflight)
        if limit is not None:
            room = min(room, limit)
        out: List[Outgoing] = []
        if room > 0:
            for seq, data in self._spool.read(room):
                try:
                    msg = Outgoing.from_record(seq, data)
                except ValueError as exc:
                    self.log.error("Dropped a damaged spool record: %s", exc)
                    self.m_dropped.labels("damaged").inc()
                    self._spool.ack(seq)
                    continue
                self._inflight[seq] = msg
                out.append(msg)
        while self._direct and (limit is None or len(out) < limit):
            out.append(self._direct.popleft())
        return out

    def sent(self, msg: Outgoing) -> None:
        self.m_sent.labels(msg.kind).inc()
        if msg.seq < 0:  # QoS 0: sending is all there is
            self._delivered(msg)

    def acknowledged(self, seq: int) -> None:
        """The broker took message ``seq``; stale acknowledgements (from before a rewind) are ignored."""
        msg = self._inflight.pop(seq, None)
        if msg is None or self._spool is None or not self._spool.ack(seq):
            return
        self.m_acked.labels(msg.kind).inc()
        self._delivered(msg)
        self.update_gauges()

    def rejected(self, seq: int, why: str) -> None:
        """The broker refuses message ``seq`` for good (too large...): drop it, counted."""
        msg = self._inflight.pop(seq, None)
        if msg is not None and self._spool is not None and self._spool.ack(seq):
            self.m_dropped.labels("rejected").inc()
            self.log.warning("Dropped message %r (%d bytes): %s", msg.msg_id, len(msg.body), why)

    def _delivered(self, msg: Outgoing) -> None:
        # The standard sink series (edgepipe_sink_*), counted like every other sink's.
        self.published.inc()
        if msg.kind == "detections":
            self.detections.inc(msg.detections)
            self.frame_age.observe(max(0.0, time.time() - msg.timestamp))

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def oldest_inflight(self) -> Optional[Outgoing]:
        return next(iter(self._inflight.values()), None)

    def pending(self) -> bool:
        """Whether anything waits to be sent or acknowledged."""
        assert self._spool is not None
        return bool(self._inflight or self._direct or self._spool.pending)

    def connection_up(self, where: str) -> None:
        """A connection is established and ready for messages."""
        self.is_connected = True
        self.m_connected.set(1)
        if self._ever_connected:
            self.m_reconnects.inc()
            self.log.info("Reconnected to %s", where)
        else:
            self.log.info("Connected to %s", where)
        self._ever_connected = True
        self._failures = 0
        self.report_healthy()

    def connection_lost(self) -> None:
        """The connection is gone: what was in flight goes out again on the next one."""
        self.is_connected = False
        self.m_connected.set(0)
        self._inflight.clear()
        self._direct.clear()
        if self._spool is not None:
            self._spool.rewind()

    def failing(self, reason: str) -> None:
        """No connection, for ``reason`` (one line): /healthz names the sink until it connects."""
        self.is_connected = False
        self.m_connected.set(0)
        self.report_unhealthy(reason)

    def backoff(self) -> float:
        """Seconds to wait before the next attempt: doubling from min_delay up to max_delay,
        with +-20 % jitter so a fleet that lost its broker does not come back in lockstep."""
        r = self.config.reconnect
        delay = min(r.max_delay, r.min_delay * (2 ** min(self._failures, 30)))
        self._failures += 1
        return delay * random.uniform(0.8, 1.2)

    def housekeeping(self) -> None:
        """About once a second from the delivery thread: spool syncs and gauges."""
        if self._spool is not None:
            self._spool.maintain()
        self.update_gauges()

    def update_gauges(self) -> None:
        spool = self._spool
        if spool is not None:
            self.m_spool_messages.set(spool.messages)
            self.m_spool_bytes.set(spool.bytes)


def topic_parts(value: str, separator: str, what: str, wildcards: Sequence[str]) -> str:
    """Check a topic/subject prefix: not empty, no empty level, no wildcard; returns it."""
    if not value:
        raise ValueError(f"an empty {what} is not allowed")
    for token in value.split(separator):
        if token == "":
            raise ValueError(f"{what} {value!r} has an empty level (leading, trailing or doubled {separator!r})")
        for w in wildcards:
            if w in token:
                raise ValueError(f"{what} {value!r} contains the wildcard {w!r}")
    return value

