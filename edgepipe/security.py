"""Network security: which addresses may be bound, CURVE keys, the ZAP allow-list, message limits.

Every socket that can be reached from another host goes through this module. The rules:

* A ``tcp://`` bind on anything but loopback (127.0.0.0/8, ``::1``, ``localhost``) is refused
  unless the stage has CURVE configured or says ``insecure: true`` explicitly
  (:func:`check_bind`, applied at config time by :class:`NetworkSecurity`). ``ipc://`` and
  ``inproc://`` are always allowed.
* The side that binds is the CURVE server; the side that connects is the CURVE client. A server
  accepts only the client public keys in its allow-list, enforced by one ZAP authenticator thread
  per ZeroMQ context (:func:`secure_server`), and every network-facing socket carries
  ``ZMQ_MAXMSGSIZE`` so a peer cannot make us allocate without bound.
* Keys live in files in pyzmq's certificate format (``edgepipe keys generate`` writes them):
  ``NAME.key`` holds the public key, ``NAME.key_secret`` both keys. A secret key file that other
  users can read (or that its group can write) is refused, the way ssh refuses an unprotected
  private key: a leaked server or client key silently defeats the allow-list.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import stat
import threading
from pathlib import Path
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    FrozenSet,
    List,
    NamedTuple,
    Optional,
    Set,
    Tuple,
    Union,
)

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgepipe.stage import StageError

__all__ = [
    "DETECTION_MAX_MESSAGE_SIZE",
    "FRAME_MAX_MESSAGE_SIZE",
    "SUBSCRIPTION_MAX_MESSAGE_SIZE",
    "CurveConfig",
    "Endpoint",
    "NetworkSecurity",
    "SecurityError",
    "check_bind",
    "check_connect",
    "generate_keys",
    "load_public_key",
    "load_secret_key",
    "parse_endpoint",
    "rejected_clients",
    "secure_client",
    "secure_server",
    "stop_authenticators",
]

log = logging.getLogger("edgepipe.security")

# Inbound limits (ZMQ_MAXMSGSIZE): a peer that sends more is disconnected, the socket lives on.
FRAME_MAX_MESSAGE_SIZE = 64 * 1024 * 1024  # frame links: a 4K 3-channel image is ~25 MB
DETECTION_MAX_MESSAGE_SIZE = 1024 * 1024  # a subscriber reading detection messages
SUBSCRIPTION_MAX_MESSAGE_SIZE = 64 * 1024  # what a PUB socket receives: subscriptions only

_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SecurityError(StageError, ValueError):
    """A security rule refused something. One line naming the thing (address, key file) and what
    was expected. It is a ValueError so pydantic validators report it against the config path,
    and a StageError so the runtime treats it like any other stage failure."""


# ---------------------------------------------------------------------------------------------
# Addresses


class Endpoint(NamedTuple):
    """A parsed ZeroMQ address. ``host``/``port`` are set for tcp, ``path`` for ipc/inproc."""

    transport: str
    host: str = ""
    port: str = ""
    path: str = ""

    @property
    def loopback(self) -> bool:
        """True for ipc/inproc and for tcp on 127.0.0.0/8, ::1 or localhost."""
        if self.transport != "tcp":
            return True
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # '*', an interface name or a host name: may be reachable from outside


def parse_endpoint(address: str, what: str = "address") -> Endpoint:
    """Parse ``tcp://host:port``, ``ipc://path`` or ``inproc://name``; raise SecurityError naming
    ``what`` otherwise. ``host`` may be ``*``, an IPv4 address, ``[IPv6]``, a host or interface
    name; ``port`` is 0-65535, 0 and ``*`` meaning an ephemeral port."""
    if not isinstance(address, str) or "://" not in address:
        raise SecurityError(
            f"{what}: {address!r} is not a ZeroMQ address (expected tcp://host:port, "
            "ipc://path or inproc://name)"
        )
    transport, rest = address.split("://", 1)
    if transport in ("ipc", "inproc"):
        if not rest:
            raise SecurityError(f"{what}: {address!r} has an empty {transport} path")
        return Endpoint(transport, path=rest)
    if transport != "tcp":
        raise SecurityError(
            f"{what}: transport {transport!r} in {address!r} is not supported "
            "(expected tcp://, ipc:// or inproc://)"
        )
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise SecurityError(f"{what}: {address!r} has no host:port (expected tcp://host:port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SecurityError(f"{what}: {host!r} in {address!r} is not an IPv6 address") from None
    elif ":" in host:
        raise SecurityError(
            f"{what}: IPv6 host in {address!r} must be bracketed (tcp://[::1]:5556)"
        )
    elif host != "*" and not re.match(r"^[A-Za-z0-9._-]+$", host):
        raise SecurityError(f"{what}: {host!r} in {address!r} is not a host name or address")
    if port != "*" and not (port.isdigit() and int(port) <= 65535):
        raise SecurityError(f"{what}: port {port!r} in {address!r} must be 0-65535 or '*'")
    return Endpoint("tcp", host=host, port=port)


def check_bind(
    address: str,
    curve: Optional[CurveConfig] = None,
    insecure: bool = False,
    what: str = "bind",
) -> Endpoint:
    """Validate an address a socket will bind; return it parsed.

    Refused with :class:`SecurityError` (one line naming ``what``): bad syntax; a tcp bind on a
    non-loopback address without ``curve`` and without ``insecure``; ``curve`` without the server
    half (``server_secret_key`` and ``client_public_keys``). Static: no key file is read here.
    """
    endpoint = parse_endpoint(address, what)
    if curve is not None:
        if insecure:
            raise SecurityError(f"{what}: both curve and insecure: true are set; pick one")
        if endpoint.transport == "tcp":
            curve.require_server(what)
        return endpoint
    if not endpoint.loopback and not insecure:
        raise SecurityError(
            f"{what}: refusing to bind {address!r} without encryption: only 127.0.0.1, ::1, "
            "ipc:// and inproc:// are allowed by default; configure curve (edgepipe keys "
            "generate) or set insecure: true"
        )
    return endpoint


def check_connect(
    address: str, curve: Optional[CurveConfig] = None, what: str = "connect"
) -> Endpoint:
    """Validate an address a socket will connect to; with ``curve``, require the client half
    (``client_secret_key`` and ``server_public_key``). Plain-text connects are allowed: the
    remote end decides whether it accepts them."""
    endpoint = parse_endpoint(address, what)
    if curve is not None and endpoint.transport == "tcp":
        curve.require_client(what)
    return endpoint


# ---------------------------------------------------------------------------------------------
# Keys


def _read_certificate(path: Path, what: str) -> Tuple[bytes, Optional[bytes]]:
    from zmq.auth import load_certificate

    try:
        public, secret = load_certificate(str(path))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SecurityError(f"{what}: cannot read key file {str(path)!r}: {reason}") from None
    for key in (public, secret):
        if key is not None and not _Z85_KEY.match(key.decode("ascii", "replace")):
            raise SecurityError(
                f"{what}: {str(path)!r} holds a malformed key (expected 40 Z85 characters)"
            )
    return public, secret


def load_secret_key(path: Union[str, Path], what: str = "secret key") -> Tuple[bytes, bytes]:
    """Load ``(public, secret)`` Z85 keys from a ``.key_secret`` file. Refused: a missing file, a
    file without a secret key, a file readable by other users or writable by its group."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecurityError(f"{what}: cannot read key file {str(path)!r}: {exc.strerror}") from None
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise SecurityError(
            f"{what}: {str(path)!r} is accessible to other users (mode {stat.S_IMODE(mode):04o}); "
            f"run chmod 600 {str(path)!r}"
        )
    public, secret = _read_certificate(path, what)
    if secret is None:
        raise SecurityError(
            f"{what}: {str(path)!r} holds no secret key (expected the NAME.key_secret file)"
        )
    return public, secret


def load_public_key(value: Union[str, Path], what: str = "public key") -> bytes:
    """A Z85 public key from a key file (``NAME.key`` or ``NAME.key_secret``) or from the
    40-character key itself."""
    text = str(value)
    path = Path(text).expanduser()
    if not path.exists() and _Z85_KEY.match(text):
        return text.encode("ascii")
    public, _ = _read_certificate(path, what)
    return public


def _load_allow_list(values: List[str], what: str) -> FrozenSet[bytes]:
    keys: Set[bytes] = set()
    for value in values:
        path = Path(value).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.key"))
            if not found:
                raise SecurityError(f"{what}: directory {str(path)!r} holds no *.key files")
            keys.update(load_public_key(f, what) for f in found)
        else:
            keys.add(load_public_key(value, what))
    return frozenset(keys)


def _write_key_file(path: Path, public: bytes, secret: Optional[bytes], force: bool) -> None:
    kind = "secret" if secret else "public"
    lines = [
        f"#   ZeroMQ CURVE {kind} key, written by edgepipe keys generate",
        "#   Format: pyzmq/czmq certificate (zmq.auth.load_certificate reads it).",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    mode = 0o600 if secret else 0o644
    # Created with its final mode: a secret key is never readable by others, not even briefly.
    fd = os.open(str(path), flags, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, ("\n".join(lines) + "\n").encode("ascii"))
    finally:
        os.close(fd)


def generate_keys(
    directory: Union[str, Path], name: str, force: bool = False
) -> Tuple[Path, Path, bytes]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (both keys, 0600) in
    ``directory`` (created 0700 if missing); return both paths and the Z85 public key. Existing
    files are refused unless ``force``."""
    import zmq

    if not _KEY_NAME.match(name):
        raise SecurityError(f"name: {name!r} is not a key name (letters, digits, '.', '_', '-')")
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise SecurityError(f"{str(directory)!r} exists and is not a directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path = directory / f"{name}.key"
    secret_path = directory / f"{name}.key_secret"
    if not force:
        for path in (public_path, secret_path):
            if path.exists():
                raise SecurityError(f"{str(path)!r} exists; pass --force to replace it")
    public, secret = zmq.curve_keypair()
    _write_key_file(secret_path, public, secret, force)
    _write_key_file(public_path, public, None, force)
    return public_path, secret_path, public


# ---------------------------------------------------------------------------------------------
# Config


class CurveConfig(BaseModel):
    """CURVE keys of one link. The side that binds is the server (``server_secret_key`` +
    ``client_public_keys``); the side that connects is the client (``client_secret_key`` +
    ``server_public_key``). Key files are only read when the socket is set up (and by the
    stage's pre-flight check), so a config can be validated on a machine without the keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server_secret_key: Optional[Path] = Field(
        None,
        description="Server side: the server's NAME.key_secret file (mode 0600 or 0640).",
    )
    client_public_keys: Optional[List[str]] = Field(
        None,
        min_length=1,
        description="Server side: the allow-list. Client public key files (NAME.key), "
        "directories whose *.key files are all allowed, or 40-character Z85 keys. Clients with "
        "any other key are refused by the ZAP authenticator.",
    )
    client_secret_key: Optional[Path] = Field(
        None, description="Client side: this client's NAME.key_secret file."
    )
    server_public_key: Optional[str] = Field(
        None,
        description="Client side: the server's public key file (NAME.key) or 40-character Z85 key.",
    )

    @model_validator(mode="after")
    def _halves_complete(self) -> CurveConfig:
        pairs = (
            ("server_secret_key", "client_public_keys"),
            ("client_secret_key", "server_public_key"),
        )
        for a, b in pairs:
            if (getattr(self, a) is None) != (getattr(self, b) is None):
                have, missing = (a, b) if getattr(self, a) is not None else (b, a)
                raise ValueError(f"{missing} is required together with {have}")
        if self.server_secret_key is None and self.client_secret_key is None:
            raise ValueError(
                "set server_secret_key + client_public_keys (binding side) or "
                "client_secret_key + server_public_key (connecting side)"
            )
        return self

    def require_server(self, what: str = "bind") -> None:
        if self.server_secret_key is None:
            raise SecurityError(
                f"{what}: a bound socket is the CURVE server and needs curve.server_secret_key "
                "and curve.client_public_keys"
            )

    def require_client(self, what: str = "connect") -> None:
        if self.client_secret_key is None:
            raise SecurityError(
                f"{what}: a connecting socket is the CURVE client and needs "
                "curve.client_secret_key and curve.server_public_key"
            )

    def server_keys(self) -> Tuple[bytes, bytes, FrozenSet[bytes]]:
        """``(public, secret, allowed client keys)``, read from the files; SecurityError if any
        is missing, malformed or (secret) unprotected."""
        self.require_server()
        assert self.server_secret_key is not None and self.client_public_keys is not None
        public, secret = load_secret_key(self.server_secret_key, "curve.server_secret_key")
        allowed = _load_allow_list(self.client_public_keys, "curve.client_public_keys")
        return public, secret, allowed

    def client_keys(self) -> Tuple[bytes, bytes, bytes]:
        """``(public, secret, server public)``, read from the files."""
        self.require_client()
        assert self.client_secret_key is not None and self.server_public_key is not None
        public, secret = load_secret_key(self.client_secret_key, "curve.client_secret_key")
        server = load_public_key(self.server_public_key, "curve.server_public_key")
        return public, secret, server


class NetworkSecurity(BaseModel):
    """Fields a stage config with a network socket mixes in: ``curve`` and ``insecure``, checked
    against the address field at config time, so ``edgepipe validate`` refuses a public bind that
    has neither.

    ``security_address_field`` names the config field holding the address (a string, a list of
    strings, or None for "not set"); ``security_role`` is ``"bind"`` or ``"connect"``, or
    ``security_bind_flag`` names a bool field that says whether the socket binds.
    Use: ``class ZmqPubConfig(NetworkSecurity, StageConfig): bind: str = ...``.
    """

    security_address_field: ClassVar[str] = "bind"
    security_role: ClassVar[str] = "bind"
    security_bind_flag: ClassVar[Optional[str]] = None

    curve: Optional[CurveConfig] = Field(
        None,
        description="CURVE encryption and client authentication for tcp:// addresses "
        "(keys from `edgepipe keys generate`).",
    )
    insecure: bool = Field(
        False,
        description="Allow a plain-text tcp bind on a non-loopback address. Anyone who can "
        "reach the port can then read and inject messages.",
    )

    @model_validator(mode="after")
    def _check_address(self) -> NetworkSecurity:
        field = self.security_address_field
        value = getattr(self, field, None)
        addresses = value if isinstance(value, (list, tuple)) else [value]
        for address in addresses:
            if address is None:
                continue
            flag = self.security_bind_flag
            binds = bool(getattr(self, flag)) if flag else self.security_role == "bind"
            if binds:
                check_bind(address, self.curve, self.insecure, what=field)
            else:
                check_connect(address, self.curve, what=field)
        return self


# ---------------------------------------------------------------------------------------------
# Sockets


class _AllowList:
    """ZAP credentials provider: a fixed set of Z85 client keys; counts refusals and tells the
    ``listeners`` (called on the authenticator's thread)."""

    def __init__(self, keys: FrozenSet[bytes]):
        self.keys = keys
        self.rejected = 0
        self.listeners: List[Callable[[], None]] = []

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.rejected += 1
        for listener in self.listeners:
            listener()
        return False


class _Auth(NamedTuple):
    context: Any
    authenticator: Any
    domains: Dict[str, _AllowList]


_auth_lock = threading.Lock()
_authenticators: Dict[int, _Auth] = {}


def _authenticator_for(context: Any) -> _Auth:
    """The context's ZAP authenticator, started on first use (one per context: libzmq accepts a
    single ZAP handler per context)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = _authenticators.get(id(context))
    if auth is None:
        authenticator = ThreadAuthenticator(context, log=logging.getLogger("edgepipe.zap"))
        authenticator.start()
        auth = _Auth(context, authenticator, {})
        _authenticators[id(context)] = auth
        log.info("Started the ZAP authenticator")
    return auth


def secure_server(
    socket: Any,
    curve: Optional[CurveConfig],
    context: Any = None,
    max_message_size: int = FRAME_MAX_MESSAGE_SIZE,
    on_reject: Optional[Callable[[], None]] = None,
) -> None:
    """Prepare a socket that will bind: call before ``bind``.

    Always sets ``ZMQ_MAXMSGSIZE``. With ``curve``, makes the socket a CURVE server whose ZAP
    domain accepts only ``curve.client_public_keys``; the context's authenticator (``context``,
    default the socket's) is started on first use and stays up until
    :func:`stop_authenticators`. ``ZMQ_ZAP_ENFORCE_DOMAIN`` is set so that without a running
    authenticator clients are refused, not let in (libzmq's default would let them in).
    ``on_reject`` is called (on the authenticator's thread) for every refused handshake, e.g. a
    metrics counter's ``inc``. Raises SecurityError for unreadable or unprotected keys.
    """
    import zmq

    socket.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    if curve is None:
        return
    public, secret, allowed = curve.server_keys()
    context = context if context is not None else socket.context
    domain = "edgepipe-" + hashlib.sha256(b"".join(sorted(allowed))).hexdigest()[:16]
    with _auth_lock:
        auth = _authenticator_for(context)
        if domain not in auth.domains:
            provider = _AllowList(allowed)
            auth.authenticator.configure_curve_callback(domain, credentials_provider=provider)
            auth.domains[domain] = provider
        if on_reject is not None:
            auth.domains[domain].listeners.append(on_reject)
    socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    socket.zap_domain = domain.encode("ascii")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def secure_client(
    socket: Any,
    curve: Optional[CurveConfig],
    max_message_size: int = DETECTION_MAX_MESSAGE_SIZE,
) -> None:
    """Prepare a socket that will connect: call before ``connect``. Always sets
    ``ZMQ_MAXMSGSIZE``; with ``curve``, sets this client's keys and the server's public key.
    A server that refuses the key (or does not speak CURVE) simply never delivers: ZeroMQ
    retries the handshake in the background."""
    import zmq

    socket.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    if curve is None:
        return
    public, secret, server = curve.client_keys()
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server


def rejected_clients(context: Any) -> int:
    """How many CURVE handshakes the context's authenticator refused (unknown client keys)."""
    auth = _authenticators.get(id(context))
    return sum(p.rejected for p in auth.domains.values()) if auth else 0


def stop_authenticators(context: Any = None) -> None:
    """Stop the ZAP authenticator of ``context`` (all of them when None). Call after closing the
    CURVE server sockets and before ``context.term()``: a running authenticator holds sockets
    that would make ``term`` wait forever."""
    with _auth_lock:
        keys = list(_authenticators) if context is None else [id(context)]
        for key in keys:
            auth = _authenticators.pop(key, None)
            if auth is not None:
                auth.authenticator.stop()
