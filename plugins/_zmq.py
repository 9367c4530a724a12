"""ZeroMQ plumbing shared by the network stages (``zmq`` source, ``zmq_pub`` and ``zmq_push`` sinks).

Each stage owns a private ZeroMQ context, so the CURVE authenticator it may start (one per
context, see :mod:`edgepipe.security`) lives and dies with the stage. :class:`EndpointConfig` is
the "bind or connect, with CURVE or not" part of a config: exactly one of ``bind`` and ``connect``,
checked by the security rules at validation time (a public bind needs CURVE or
``insecure: true``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import Field, model_validator

from edgepipe.security import (
    NetworkSecurity,
    check_connect,
    secure_client,
    secure_server,
    stop_authenticators,
)
from edgepipe.stage import StageError

__all__ = ["EndpointConfig", "ZmqEndpoint", "check_curve_keys"]


class EndpointConfig(NetworkSecurity):
    """Mixin: a socket that either binds ``bind`` or connects to ``connect``."""

    security_address_field: ClassVar[str] = "bind"
    security_role: ClassVar[str] = "bind"

    bind: Optional[str] = Field(
        None, description="Address to bind (tcp://127.0.0.1:PORT, ipc:///path); peers connect to it."
    )
    connect: Optional[str] = Field(
        None, description="Address to connect to instead of binding (the peer binds)."
    )

    @model_validator(mode="after")
    def _one_endpoint(self) -> EndpointConfig:
        if (self.bind is None) == (self.connect is None):
            raise ValueError("set exactly one of 'bind' and 'connect'")
        if self.connect is not None:
            check_connect(self.connect, self.curve, what="connect")
        return self


def check_curve_keys(config: Any) -> None:
    """Pre-flight: read the CURVE key files the config names (binding side: server keys, else
    client keys); an unreadable, malformed or unprotected key file raises its one-line error."""
    if config.curve is None:
        return
    if getattr(config, "bind", None) is not None:
        config.curve.server_keys()
    else:
        config.curve.client_keys()


class ZmqEndpoint:
    """One socket of ``socket_type`` set up from an :class:`EndpointConfig` (CURVE, limits, HWM).

    With ``metrics`` (the stage's), a CURVE server declares
    ``edgepipe_security_rejected_clients_total`` (so it exists at 0 from the start) and counts
    each refused client in it."""

    def __init__(
        self,
        socket_type: int,
        config: Any,
        max_message_size: int,
        hwm: int,
        hwm_option: int,
        metrics: Any = None,
        monitor_events: int = 0,
    ):
        import zmq

        self.context = zmq.Context()
        self.socket = self.context.socket(socket_type)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(hwm_option, hwm)
        # Attached before bind/connect, so no connection is made before the monitor sees it.
        self.monitor: Any = self.socket.get_monitor_socket(monitor_events) if monitor_events else None
        self._curve = config.curve is not None
        try:
            if config.bind is not None:
                on_reject = None
                if metrics is not None and self._curve:
                    on_reject = metrics.counter(
                        "edgepipe_security_rejected_clients_total",
                        "CURVE handshakes refused because the client's key is not in the "
                        "allow-list (stages holding a CURVE server).",
                    ).inc
                secure_server(self.socket, config.curve, self.context, max_message_size, on_reject)
                self.socket.bind(config.bind)
                self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                secure_client(self.socket, config.curve, max_message_size)
                self.socket.connect(config.connect)
                self.address = config.connect
        except zmq.ZMQError as exc:
            self.close()
            verb, where = ("bind", config.bind) if config.bind is not None else ("connect to", config.connect)
            raise StageError(f"cannot {verb} {where!r}: {exc}") from None
        except Exception:
            self.close()
            raise

    def close(self, linger: float = 0.0) -> None:
        """Close the socket, waiting up to ``linger`` seconds for queued messages to go out."""
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.socket.close(linger=int(linger * 1000))
        if self._curve:
            stop_authenticators(self.context)
        self.context.term()
