"""The ``nats`` sink: detection and event messages into NATS JetStream, acknowledged, with
store-and-forward.

Subjects are ``<subject_prefix>.<pipeline>.<source>.detections`` and ``...events``; the payloads
are the ZeroMQ sink's JSON documents, unchanged. Every message carries a ``Nats-Msg-Id`` header
(pipeline, source, frame id or event id, capture time: :func:`.._broker.message_id`), so
JetStream stores a message sent twice (a retry after a lost acknowledgement, a resend after a
restart) only once within the stream's duplicate window. A message counts as delivered when
its PubAck arrives; until then it stays in the sink's on-disk spool, which also holds everything
produced while the server is unreachable (see :mod:`.._broker`, :mod:`.._spool`).

The stream (``stream``, default ``EDGEPIPE``) must take the sink's subjects. A missing stream is
created (subjects ``<subject_prefix>.>``, file storage, ``duplicate_window``, ``stream_max_bytes``)
unless ``create_stream`` is false; a stream that does not exist and may not be created, or does
not take the subjects, stops delivery with one line naming the stream (``/healthz`` names the
sink) and is checked again at every reconnection.

nats-py is asyncio: the sink runs its own event loop in its delivery thread, started in
``start()`` and joined in ``stop()``. Publishing is JetStream's asynchronous publish done by
hand: each message goes out with a reply subject ``<inbox>.<spool seq>`` on one subscription, at
most ``window`` unacknowledged, and each PubAck settles its spool record. One connection per
session (no client-side reconnection): when a connection ends, what was in flight is sent again
on the next one, from the spool, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Dict, List, Optional

from pydantic import Field, field_validator, model_validator

from edgepipe.stage import ExistingFile, StageContext

from .._broker import BrokerSink, BrokerSinkConfig, TlsConfig, parse_url, topic_parts

__all__ = ["NatsConfig", "NatsSink", "subject_matches"]

SCHEMES = {"nats": 4222, "tls": 4222}
CONNECT_TIMEOUT = 5.0
API_TIMEOUT = 5
# JetStream's error code for a message over the stream's max_msg_size: that message can never be
# stored, so it is dropped (counted) rather than retried forever.
JS_ERR_MESSAGE_TOO_LARGE = 10054


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` one or more at the end."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


class NatsConfig(BrokerSinkConfig):
    servers: List[str] = Field(
        ["nats://127.0.0.1:4222"],
        min_length=1,
        description="Servers to try in order: nats://host[:port] or tls://host[:port] (4222).",
    )
    user: Optional[str] = Field(None, min_length=1, description="User name.")
    password: Optional[str] = Field(None, repr=False, description="Password (use ${VAR} from an .env file).")
    token: Optional[str] = Field(None, repr=False, description="Authentication token (instead of user/password).")
    creds: Optional[ExistingFile] = Field(None, description="NATS credentials file (JWT and NKey seed).")
    tls: Optional[TlsConfig] = Field(None, description="TLS settings (CA, client certificate).")
    subject_prefix: str = Field(
        "edgepipe", description="Subject prefix: <subject_prefix>.<pipeline>.<source>.detections|events."
    )
    stream: str = Field(
        "EDGEPIPE", pattern=r"^[^.*>\s/\\]{1,255}$", description="JetStream stream that stores the subjects."
    )
    create_stream: bool = Field(True, description="Create the stream when it does not exist.")
    duplicate_window: float = Field(
        120.0,
        ge=1,
        le=7 * 86400,
        description="Seconds the stream remembers message ids to drop repeats (when the sink creates it).",
    )
    stream_max_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1024 * 1024,
        description="Size limit of the stream, oldest messages removed first (when the sink creates it).",
    )
    domain: Optional[str] = Field(
        None, min_length=1, description="JetStream domain of the stream's server (a leaf node's own domain)."
    )
    ack_timeout: float = Field(
        10.0, gt=0, le=300, description="Seconds to wait for a PubAck before reconnecting and sending again."
    )

    @field_validator("servers")
    @classmethod
    def _servers(cls, value: List[str]) -> List[str]:
        for i, url in enumerate(value):
            try:
                parse_url(url, SCHEMES)
            except ValueError as exc:
                raise ValueError(f"servers[{i}] {url!r}: {exc}") from None
        return value

    @field_validator("subject_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        topic_parts(value, ".", "subject prefix", ("*", ">"))
        if any(c.isspace() for c in value):
            raise ValueError(f"subject prefix {value!r} contains white space")
        return value

    @model_validator(mode="after")
    def _auth(self) -> NatsConfig:
        if self.password is not None and self.user is None:
            raise ValueError("password is set without user")
        if self.token is not None and self.user is not None:
            raise ValueError("use either token or user/password, not both")
        return self


class NatsSink(BrokerSink):
    """Publishes detection and event messages to NATS JetStream (acknowledged, de-duplicated)."""

    Config = NatsConfig
    config: NatsConfig
    protocol = "nats"
    requirement = ("nats", "nats-py", "nats")

    def __init__(self, config: NatsConfig, context: StageContext) -> None:
        super().__init__(config, context)
        self.where = ",".join(config.servers)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wake_ev: Optional[asyncio.Event] = None
        self._woken = False
        self._sent_at: Dict[int, float] = {}
        self._problem: Optional[str] = None

    def subject(self, source: str, kind: str) -> str:
        return f"{self.config.subject_prefix}.{self.pipeline}.{source}.{kind}"

    def wake(self) -> None:
        loop, ev = self._loop, self._wake_ev
        if loop is None or ev is None or (self._woken and not self.stopping.is_set()):
            return
        self._woken = True
        try:
            loop.call_soon_threadsafe(ev.set)
        except RuntimeError:  # the loop has closed: the thread is ending
            pass

    # -- the delivery thread ---------------------------------------------------------------------

    def serve(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            self._loop = None
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake_ev = asyncio.Event()
        self._loop = loop
        while not self.stopping.is_set():
            await self._session()
            if self.stopping.is_set():
                break
            deadline = time.monotonic() + self.backoff()
            while not self.stopping.is_set() and time.monotonic() < deadline:
                await self._sleep(min(1.0, deadline - time.monotonic()))
                self.housekeeping()

    async def _sleep(self, seconds: float) -> None:
        assert self._wake_ev is not None
        self._wake_ev.clear()
        self._woken = False
        try:
            await asyncio.wait_for(self._wake_ev.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            pass

    def _options(self, errors: List[str]) -> Dict[str, Any]:
        cfg = self.config

        async def on_error(exc: Exception) -> None:
            errors.append(_describe(exc))  # nats-py would log each one at ERROR level

        async def on_gone() -> None:
            self._problem = self._problem or "connection lost"
            if self._wake_ev is not None:
                self._wake_ev.set()

        opts: Dict[str, Any] = dict(
            servers=list(cfg.servers),
            name=f"edgepipe {self.pipeline}/{self.name}",
            # The sink reconnects by itself (with backoff, and a fresh connection whose first
            # sends are what the last one left unacknowledged). nats-py's own attempts: -1 and 0
            # mean forever, 1 means at most two quick tries of each server, then NoServersError.
            allow_reconnect=False,
            connect_timeout=CONNECT_TIMEOUT,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            error_cb=on_error,
            disconnected_cb=on_gone,
            closed_cb=on_gone,
            ping_interval=10,
            max_outstanding_pings=3,
        )
        if cfg.user is not None:
            opts["user"] = cfg.user
            if cfg.password is not None:
                opts["password"] = cfg.password
        if cfg.token is not None:
            opts["token"] = cfg.token
        if cfg.creds is not None:
            opts["user_credentials"] = cfg.creds
        if cfg.tls is not None or any(u.startswith("tls://") for u in cfg.servers):
            import ssl

            opts["tls"] = cfg.tls.context() if cfg.tls is not None else ssl.create_default_context()
        return opts

    async def _session(self) -> None:
        import nats

        self._problem = None
        errors: List[str] = []
        try:
            nc = await nats.connect(**self._options(errors))
        except Exception as exc:  # nats-py raises its own errors, OSError, ssl errors, timeouts
            why = errors[-1] if errors and type(exc).__name__ == "NoServersError" else _describe(exc)
            self.failing(f"cannot connect to {self.where}: {why}")
            return
        try:
            problem = await self._ensure_stream(nc)
            if problem is not None:
                self.failing(problem)
                return
            inbox = nc.new_inbox()
            await nc.subscribe(inbox + ".*", cb=self._on_ack)
            await nc.flush(API_TIMEOUT)
            self.connection_up(nc.connected_url.netloc if nc.connected_url else self.where)
            await self._deliver(nc, inbox)
        except Exception as exc:  # a connection that fails mid-way: start over
            if not self.stopping.is_set():
                self.failing(f"{self.where}: {_describe(exc)}")
        finally:
            was_up = self.is_connected
            self.connection_lost()
            self._sent_at.clear()
            try:
                await asyncio.wait_for(nc.close(), 5.0)
            except Exception:  # closing a broken connection may fail in many ways; it is gone
                pass
            if was_up and not self.stopping.is_set():
                if self._problem and self._problem != "connection lost":
                    self.failing(self._problem)
                else:
                    self.log.warning("Lost the connection to %s; spooling until it is back", self.where)

    async def _ensure_stream(self, nc: Any) -> Optional[str]:
        """None when the stream exists (or was created) and takes our subjects; else the reason."""
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.api import DiscardPolicy, StorageType
        from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

        cfg = self.config
        js = nc.jetstream(domain=cfg.domain, timeout=API_TIMEOUT) if cfg.domain else nc.jetstream(timeout=API_TIMEOUT)
        ours = f"{cfg.subject_prefix}.{self.pipeline}.>"
        where = f"{self.where}" + (f" (domain {cfg.domain!r})" if cfg.domain else "")
        try:
            info = await js.stream_info(cfg.stream)
        except NotFoundError:
            if not cfg.create_stream:
                return (
                    f"JetStream stream {cfg.stream!r} does not exist on {where} and create_stream is false: "
                    f"create it for subjects {cfg.subject_prefix}.> or set create_stream: true"
                )
            try:
                await js.add_stream(
                    name=cfg.stream,
                    subjects=[f"{cfg.subject_prefix}.>"],
                    storage=StorageType.FILE,
                    discard=DiscardPolicy.OLD,
                    max_bytes=cfg.stream_max_bytes,
                    duplicate_window=cfg.duplicate_window,
                    description="edgepipe detections and events",
                )
            except APIError as exc:
                return f"cannot create JetStream stream {cfg.stream!r} on {where}: {exc.description or exc}"
            self.log.info("Created JetStream stream %r for subjects %r", cfg.stream, f"{cfg.subject_prefix}.>")
            return None
        except (ServiceUnavailableError, NoRespondersError, NatsTimeout, asyncio.TimeoutError):
            return f"JetStream does not answer on {where}: is it enabled (jetstream {{}} in the server config)?"
        except APIError as exc:
            return f"JetStream stream {cfg.stream!r} on {where}: {exc.description or exc}"
        subjects = list(info.config.subjects or [])
        probe = f"{cfg.subject_prefix}.{self.pipeline}.x.detections"
        if not any(subject_matches(p, probe) for p in subjects):
            return f"JetStream stream {cfg.stream!r} does not take subjects {ours} (its subjects: {', '.join(subjects) or 'none'})"
        return None

    async def _on_ack(self, msg: Any) -> None:
        try:
            seq = int(msg.subject.rsplit(".", 1)[1])
        except (IndexError, ValueError):
            return
        self._sent_at.pop(seq, None)
        if self._wake_ev is not None:
            self._wake_ev.set()  # the window has room again
        headers = msg.headers or {}
        if headers.get("Status") == "503":
            self._problem = (
                f"no JetStream stream takes subject {self.config.subject_prefix}.{self.pipeline}.* "
                f"(stream {self.config.stream!r} deleted?)"
            )
            return
        try:
            ack = json.loads(msg.data) if msg.data else {}
        except ValueError:
            ack = {}
        error = ack.get("error") if isinstance(ack, dict) else None
        if isinstance(error, dict):
            why = str(error.get("description") or error)
            if error.get("err_code") == JS_ERR_MESSAGE_TOO_LARGE:
                self.rejected(seq, f"stream {self.config.stream!r}: {why}")
            else:
                self._problem = f"JetStream stream {self.config.stream!r} refuses messages: {why}"
            return
        if not isinstance(ack, dict) or "seq" not in ack:
            self._problem = f"unexpected answer to a JetStream publish: {msg.data[:80]!r}"
            return
        self.acknowledged(seq)

    async def _deliver(self, nc: Any, inbox: str) -> None:
        next_housekeeping = 0.0
        linger_until: Optional[float] = None
        max_payload = nc.max_payload
        while True:
            now = time.monotonic()
            if self._problem is not None:
                return
            if self.stopping.is_set():
                if linger_until is None:
                    linger_until = now + self.config.linger
                if not self.pending() or now >= linger_until:
                    await nc.flush(API_TIMEOUT)
                    return
            assert self._wake_ev is not None
            self._wake_ev.clear()
            self._woken = False  # before take(): a message spooled after it wakes us again
            for msg in self.take():
                if len(msg.body) > max_payload:
                    self.rejected(msg.seq, f"larger than the server's max_payload ({max_payload} bytes)")
                    continue
                await nc.publish(
                    self.subject(msg.source, msg.kind), msg.body,
                    reply=f"{inbox}.{msg.seq}", headers={"Nats-Msg-Id": msg.msg_id},
                )
                self._sent_at[msg.seq] = now
                self.sent(msg)
            oldest = self.oldest_inflight()
            if oldest is not None:
                sent = self._sent_at.get(oldest.seq)
                if sent is not None and now - sent > self.config.ack_timeout:
                    self._problem = f"JetStream did not acknowledge within {self.config.ack_timeout:g} s"
                    return
            if now >= next_housekeeping:
                self.housekeeping()
                next_housekeeping = now + 1.0
            try:
                await asyncio.wait_for(self._wake_ev.wait(), 0.05 if self.stopping.is_set() else 1.0)
            except asyncio.TimeoutError:
                pass


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if text.startswith("nats: "):
        text = text[len("nats: ") :]
    if isinstance(exc, OSError) and exc.errno:
        text = os.strerror(exc.errno)
    return text.strip("'") or type(exc).__name__
