"""The ``mqtt`` sink: detection and event messages into an MQTT broker (Mosquitto, Home
Assistant's, any MQTT 3.1.1 or 5 broker), with store-and-forward.

Topics are ``<prefix>/<pipeline>/<source>/detections`` and ``.../events``; the payloads are the
ZeroMQ sink's JSON documents, unchanged (``edgepipe schema detections``). Each kind has its QoS:
1 (the default) goes through the sink's on-disk spool and counts as delivered when the broker's
PUBACK arrives, so a broker outage, a killed worker or a daemon restart loses nothing that was
spooled (see :mod:`.._broker` and :mod:`.._spool`); 0 is sent when connected and dropped
(counted) otherwise. ``<prefix>/<pipeline>/availability`` holds a retained ``online`` while the
sink is connected and ``offline`` after it stops or dies (the last will). Optional Home
Assistant discovery: see :mod:`.homeassistant`.

Connections use paho-mqtt 2.x with its external-loop API, one client per connection, run by
the sink's delivery thread: the thread owns the socket, selects on it and on a wake-up pipe
the worker writes to when it spools something, and publishes from the spool itself. A fresh
client per connection keeps paho from holding (and resending on its own) messages of a previous
connection: the spool is the only store, and what was in flight is resent from there in order.
"""

from __future__ import annotations

import os
import select
import ssl
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from pydantic import Field, field_validator, model_validator

from edgepipe.messages import Frame
from edgepipe.stage import StageContext

from .._broker import (
    BrokerSink,
    BrokerSinkConfig,
    Options,
    Outgoing,
    TlsConfig,
    parse_url,
    topic_parts,
)
from .homeassistant import Announcements, ZoneOccupancy, discovery, stale, zone_state_topic

__all__ = ["HomeAssistantConfig", "MqttConfig", "MqttSink", "QosConfig"]

SCHEMES = {"mqtt": 1883, "mqtts": 8883}
CONNECT_TIMEOUT = 10.0


def _qos(value: int) -> int:
    if value == 2:
        raise ValueError("QoS 2 is not supported: use 0 (at most once) or 1 (at least once, spooled)")
    if value not in (0, 1):
        raise ValueError(f"QoS is 0 or 1, got {value!r}")
    return value


class QosConfig(Options):
    detections: int = Field(1, description="QoS of detection messages: 1 spooled and acknowledged, 0 fire and forget.")
    events: int = Field(1, description="QoS of event messages: 1 spooled and acknowledged, 0 fire and forget.")

    _check = field_validator("detections", "events")(_qos)


class HomeAssistantConfig(Options):
    discovery_prefix: str = Field("homeassistant", description="Home Assistant's MQTT discovery prefix.")
    labels: List[str] = Field(
        default_factory=list, description="A sensor per source and label with the newest frame's count of it."
    )
    zones: List[str] = Field(
        default_factory=list,
        description="An occupancy binary sensor per source and zone, from the tracking stages' events.",
    )
    sources: List[str] = Field(
        default_factory=list,
        description="Sources to announce; empty: each source when its first frame arrives (then "
        "remembered, so only listed sources are ever removed).",
    )

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return topic_parts(value, "/", "discovery prefix", ("+", "#"))

    @model_validator(mode="after")
    def _something(self) -> HomeAssistantConfig:
        if not self.labels and not self.zones:
            raise ValueError("name labels and/or zones to announce")
        return self


class MqttConfig(BrokerSinkConfig):
    url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="Broker: mqtt://host[:port] (1883) or mqtts://host[:port] (TLS, 8883).",
    )
    client_id: Optional[str] = Field(
        None, min_length=1, max_length=128, description="MQTT client id; default edgepipe-<pipeline>-<stage>."
    )
    username: Optional[str] = Field(None, min_length=1, description="User name for the broker.")
    password: Optional[str] = Field(None, repr=False, description="Password (use ${VAR} from an .env file).")
    tls: Optional[TlsConfig] = Field(None, description="TLS settings (with an mqtts:// URL).")
    prefix: str = Field("edgepipe", description="Topic prefix: <prefix>/<pipeline>/<source>/detections|events.")
    qos: QosConfig = Field(default_factory=QosConfig, description="QoS per topic kind (0 or 1).")  # type: ignore[arg-type]
    keepalive: int = Field(30, ge=5, le=3600, description="Seconds between keepalive pings; a dead link shows within 1.5x.")
    version: str = Field("3.1.1", pattern=r"^(3\.1\.1|5)$", description="MQTT protocol version: 3.1.1 or 5.")
    availability: bool = Field(
        True, description="Keep a retained online/offline message (with a last will) on <prefix>/<pipeline>/availability."
    )
    homeassistant: Optional[HomeAssistantConfig] = Field(
        None, description="Home Assistant MQTT discovery; removing it removes the entities it announced."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parse_url(value, SCHEMES)
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return topic_parts(value, "/", "topic prefix", ("+", "#"))

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password is set without username")
        if self.tls is not None and not self.url.startswith("mqtts://"):
            raise ValueError(f"tls settings need an mqtts:// url (got {self.url!r})")
        if self.homeassistant is not None and self.homeassistant.labels and "detections" not in self.publish:
            raise ValueError("homeassistant.labels count detections: keep 'detections' in publish")
        return self


class MqttSink(BrokerSink):
    """Publishes detection and event messages to an MQTT broker, spooling QoS 1 on disk."""

    Config = MqttConfig
    config: MqttConfig
    protocol = "mqtt"
    requirement = ("paho.mqtt.client", "paho-mqtt", "mqtt")

    def __init__(self, config: MqttConfig, context: StageContext) -> None:
        super().__init__(config, context)
        self.scheme, self.host, self.port = parse_url(config.url, SCHEMES)
        self.client_id = config.client_id or f"edgepipe-{self.pipeline}-{self.name}"[:128]
        self.availability_topic = f"{config.prefix}/{self.pipeline}/availability" if config.availability else None
        self._wake_r = self._wake_w = -1
        self._woken = False
        self.io_error = ""
        ha = config.homeassistant
        self._zones = ZoneOccupancy(ha.zones if ha is not None else [])
        self._seen: Set[str] = set(ha.sources) if ha is not None else set()
        self._ha_dirty = False  # announce again (a connection, a new source)
        self._zones_dirty = False  # an occupancy changed
        self._zone_state: Dict[tuple, str] = {}  # (source, zone) -> ON/OFF, replaced on change
        self._zone_published: Dict[tuple, str] = {}
        self._ha_save: Optional[Tuple[Set[str], Set[str]]] = None  # to record once acknowledged

    def reliable(self, kind: str) -> bool:
        return getattr(self.config.qos, kind) == 1

    def topic(self, source: str, kind: str) -> str:
        return f"{self.config.prefix}/{self.pipeline}/{source}/{kind}"

    # -- the worker's side -----------------------------------------------------------------------

    def prepare(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._announced = Announcements(os.path.join(self.state_dir, "homeassistant.json"))
        ha = self.config.homeassistant
        if ha is not None and not ha.sources:
            self._seen |= self._announced.sources  # lazily found sources stay announced

    def wake(self) -> None:
        if not self._woken and self._wake_w >= 0:
            self._woken = True
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass

    def observe(self, frame: Frame) -> None:
        ha = self.config.homeassistant
        if ha is None:
            return
        if frame.source not in self._seen and not ha.sources:
            self._seen = self._seen | {frame.source}  # a new set: the delivery thread iterates it
            self._ha_dirty = True
        if ha.zones and frame.events and (not ha.sources or frame.source in ha.sources):
            for event in frame.events:
                self._zones.update(frame.source, event)
            for zone, state in self._zones.state(frame.source).items():
                if self._zone_state.get((frame.source, zone)) != state:
                    # A new dict each time: the delivery thread reads it without a lock.
                    self._zone_state = {**self._zone_state, (frame.source, zone): state}
                    self._zones_dirty = True

    def stop(self) -> None:
        super().stop()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- the delivery thread ---------------------------------------------------------------------

    def serve(self) -> None:
        import paho.mqtt.client as mqtt

        while not self.stopping.is_set():
            self._session(mqtt)
            if self.stopping.is_set():
                break
            self._wait(self.backoff())

    def _wait(self, seconds: float) -> None:
        """Sleep, waking early when the sink stops; keep the spool's housekeeping going."""
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.stopping.wait(min(left, 1.0))
            self.housekeeping()

    def _client(self, mqtt: Any) -> Any:
        cfg = self.config
        v5 = cfg.version == "5"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            **({} if v5 else {"clean_session": True}),
        )
        client.max_inflight_messages_set(cfg.window + 64)  # data plus availability/discovery
        client.max_queued_messages_set(0)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if self.scheme == "mqtts":
            client.tls_set_context(cfg.tls.context() if cfg.tls is not None else ssl.create_default_context())
            client.tls_insecure_set(cfg.tls is not None and not cfg.tls.verify_hostname)
        if self.availability_topic:
            client.will_set(self.availability_topic, "offline", qos=1, retain=True)
        return client

    def _session(self, mqtt: Any) -> None:
        """One connection: connect, deliver until it is lost or the sink stops."""
        client = self._client(mqtt)
        connack: List[Any] = []
        client.on_connect = lambda c, u, flags, rc, props: connack.append(rc)
        self._mids: Dict[int, int] = {}  # MQTT message id -> spool seq
        self._control: Set[int] = set()  # message ids of availability/discovery publishes
        self._rejections: Set[str] = set()
        client.on_publish = self._on_publish
        try:
            client.connect(self.host, self.port, keepalive=self.config.keepalive)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.failing(f"cannot connect to {self.config.url}: {_describe(exc)}")
            return
        sock = client.socket()
        try:
            if not self._handshake(client, sock, connack):
                return
            self._online(client)
            self.connection_up(self.config.url)
            self._deliver(client, sock, mqtt)
        finally:
            was_up = self.is_connected
            self.connection_lost()
            try:
                sock.close()
            except OSError:
                pass
            if was_up and not self.stopping.is_set():
                self.log.warning("Lost the connection to %s; spooling until it is back", self.config.url)

    def _handshake(self, client: Any, sock: Any, connack: List[Any]) -> bool:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not connack:
            left = deadline - time.monotonic()
            if left <= 0 or self.stopping.is_set():
                if not self.stopping.is_set():
                    self.failing(f"{self.config.url} did not answer the connection request within {CONNECT_TIMEOUT:g} s")
                return False
            if not self._io(client, sock, min(left, 0.5)) and not connack:
                self.failing(f"{self.config.url} closed the connection before accepting it ({self.io_error})")
                return False
        rc = connack[0]
        if rc.is_failure:
            hint = " (check username and password)" if rc.value in (4, 5, 134, 135) else ""
            self.failing(f"{self.config.url} refused the connection: {rc}{hint}")
            return False
        return True

    def _io(self, client: Any, sock: Any, timeout: float) -> bool:
        """One round of socket I/O (and wake-ups); False when the connection is gone, with the
        reason in ``self.io_error``."""
        import paho.mqtt.client as mqtt

        if getattr(sock, "pending", None) and sock.pending():
            timeout = 0.0  # TLS holds decrypted bytes select() does not see
        try:
            r, _, _ = select.select([sock, self._wake_r], [sock] if client.want_write() else [], [], timeout)
        except (OSError, ValueError) as exc:
            self.io_error = str(exc)
            return False
        if self._wake_r in r:
            self._woken = False
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        steps = []
        if sock in r or (getattr(sock, "pending", None) and sock.pending()):
            steps.append(("read", client.loop_read))
        steps += [("write", lambda: client.loop_write() if client.want_write() else mqtt.MQTT_ERR_SUCCESS),
                  ("keepalive", client.loop_misc)]
        for step, call in steps:
            rc = call()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.io_error = f"{step}: {mqtt.error_string(rc)}"
                return False
        return True

    def _online(self, client: Any) -> None:
        """What every connection starts with: availability, Home Assistant discovery."""
        if self.availability_topic:
            self._control.add(client.publish(self.availability_topic, "online", qos=1, retain=True).mid)
        self._ha_dirty = True

    def _announce(self, client: Any) -> None:
        """Announce what the config wants to Home Assistant; remove what it no longer wants."""
        self._ha_dirty = False
        ha = self.config.homeassistant
        wanted: Dict[str, bytes] = {}
        states: Dict[str, bytes] = {}
        sources = sorted(self._seen)
        if ha is not None:
            wanted = discovery(
                ha.discovery_prefix, self.config.prefix, self.pipeline, sources, ha.labels, ha.zones,
                self.availability_topic,
            )
            zone_state = self._zone_published = self._zone_state
            for source in sources:
                for zone in ha.zones:
                    topic = zone_state_topic(self.config.prefix, self.pipeline, source, zone)
                    states[topic] = zone_state.get((source, zone), "OFF").encode()
        owned = set(wanted) | set(states)
        removed = stale(self._announced.topics, owned)
        for topic in removed:
            self._control.add(client.publish(topic, b"", qos=1, retain=True).mid)
        for topic, payload in list(wanted.items()) + list(states.items()):
            self._control.add(client.publish(topic, payload, qos=1, retain=True).mid)
        if removed:
            self.log.info("Removed %d Home Assistant topic(s) no longer configured", len(removed))
        self._ha_save = (owned, set(sources) if ha is not None else set())

    def _publish_zones(self, client: Any) -> None:
        """Occupancy states that changed since they were last published (retained)."""
        self._zones_dirty = False
        ha = self.config.homeassistant
        current = self._zone_state
        if ha is None:
            return
        for (source, zone), state in current.items():
            if self._zone_published.get((source, zone)) != state and source in self._seen:
                topic = zone_state_topic(self.config.prefix, self.pipeline, source, zone)
                self._control.add(client.publish(topic, state, qos=1, retain=True).mid)
        self._zone_published = current

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, properties: Any) -> None:
        seq = self._mids.pop(mid, None)
        if seq is None:
            self._control.discard(mid)
            if not self._control and self._ha_save is not None:
                # Every removal and announcement is acknowledged: record the new set only now,
                # so a removal cut short by a lost connection is tried again next time.
                owned, sources = self._ha_save
                self._ha_save = None
                if owned != self._announced.topics or sources != self._announced.sources:
                    try:
                        self._announced.save(owned, sources)
                    except OSError as exc:
                        self.log.warning("Cannot record the Home Assistant announcements: %s", exc)
            return
        if rc is not None and getattr(rc, "is_failure", False):
            why = str(rc)
            if why not in self._rejections:  # one line per reason and connection
                self._rejections.add(why)
                self.log.warning("The broker refuses messages: %s", why)
            self.rejected(seq, f"refused by the broker: {why}")
            return
        self.acknowledged(seq)

    def _deliver(self, client: Any, sock: Any, mqtt: Any) -> None:
        next_housekeeping = 0.0
        linger_until: Optional[float] = None
        while True:
            now = time.monotonic()
            if self.stopping.is_set():
                if linger_until is None:
                    linger_until = now + self.config.linger
                if not self.pending() or now >= linger_until:
                    self._goodbye(client, sock)
                    return
            self._woken = False  # before take(): a message spooled after it wakes us again
            for msg in self.take():
                info = client.publish(self._topic(msg), msg.body, qos=1 if msg.seq >= 0 else 0)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    return  # the connection went away under us
                if msg.seq >= 0:
                    self._mids[info.mid] = msg.seq
                self.sent(msg)
            if self._ha_dirty:
                self._announce(client)
            elif self._zones_dirty:
                self._publish_zones(client)
            if now >= next_housekeeping:
                self.housekeeping()
                next_housekeeping = now + 1.0
            if not self._io(client, sock, 0.05 if self.stopping.is_set() else 1.0):
                return

    def _topic(self, msg: Outgoing) -> str:
        return self.topic(msg.source, msg.kind)

    def _goodbye(self, client: Any, sock: Any) -> None:
        """A clean stop: availability to offline (the will only fires on a broken connection)."""
        if self.availability_topic:
            mid = client.publish(self.availability_topic, "offline", qos=1, retain=True).mid
            self._control.add(mid)
            deadline = time.monotonic() + 2.0
            while mid in self._control and time.monotonic() < deadline:
                if not self._io(client, sock, 0.1):
                    return
        client.disconnect()
        deadline = time.monotonic() + 1.0
        while client.want_write() and time.monotonic() < deadline:
            if not self._io(client, sock, 0.1):
                break


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
