"""Security building blocks with real ZeroMQ sockets: CURVE + ZAP allow-list, bind rules,
ZMQ_MAXMSGSIZE, key files and `edgepipe keys generate`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
import zmq
from helpers.net import free_port
from pydantic import ValidationError
from zmq.auth import load_certificate
from zmq.utils.monitor import recv_monitor_message

from edgepipe.security import (
    CurveConfig,
    NetworkSecurity,
    SecurityError,
    check_bind,
    check_connect,
    generate_keys,
    load_secret_key,
    rejected_clients,
    secure_client,
    secure_server,
    stop_authenticators,
)
from edgepipe.stage import StageConfig

WAIT_S = 10.0  # generous: the test machine is shared and slow


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A server key pair, two allowed clients (in allowed/) and one stranger (elsewhere)."""
    generate_keys(tmp_path / "server", "server")
    generate_keys(tmp_path / "allowed", "alice")
    generate_keys(tmp_path / "allowed", "bob")
    generate_keys(tmp_path / "stranger", "mallory")
    return tmp_path


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    stop_authenticators(context)
    context.destroy(linger=0)


def server_curve(keys: Path, allow: Optional[List[str]] = None) -> CurveConfig:
    return CurveConfig(
        server_secret_key=keys / "server" / "server.key_secret",
        client_public_keys=allow if allow is not None else [str(keys / "allowed")],
    )


def client_curve(keys: Path, secret: str) -> CurveConfig:
    return CurveConfig(
        client_secret_key=keys / secret, server_public_key=str(keys / "server" / "server.key")
    )


def curve_pub(ctx, curve: CurveConfig) -> tuple:
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    secure_server(pub, curve)
    pub.bind("tcp://127.0.0.1:*")
    return pub, pub.last_endpoint.decode()


def sub(ctx, endpoint: str, curve: Optional[CurveConfig]):
    s = ctx.socket(zmq.SUB)
    s.linger = 0
    secure_client(s, curve)
    s.subscribe(b"")
    s.connect(endpoint)
    return s


def join(pub, subscriber) -> None:
    """Publish probes until the subscriber is connected and subscribed (PUB drops until then)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        pub.send_multipart([b"probe", b""])
        if subscriber.poll(50):
            while subscriber.poll(200):
                subscriber.recv_multipart()
            return
    pytest.fail("the allowed subscriber never received anything")


def drain(s, timeout_s: float) -> List[List[bytes]]:
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if s.poll(50):
            got.append(s.recv_multipart())
    return got


# ---------------------------------------------------------------------------------------------
# CURVE + allow-list on real sockets


def test_allowed_client_receives_every_message_in_order(ctx, keys: Path):
    pub, endpoint = curve_pub(ctx, server_curve(keys))
    alice = sub(ctx, endpoint, client_curve(keys, "allowed/alice.key_secret"))
    join(pub, alice)
    sent = [[b"detections/cam", b"%d" % i] for i in range(500)]
    for message in sent:
        pub.send_multipart(message)
    assert drain(alice, 2.0) == sent


def test_unknown_and_plain_clients_receive_nothing(ctx, keys: Path):
    pub, endpoint = curve_pub(ctx, server_curve(keys))
    alice = sub(ctx, endpoint, client_curve(keys, "allowed/alice.key_secret"))
    mallory = sub(ctx, endpoint, client_curve(keys, "stranger/mallory.key_secret"))
    plain = sub(ctx, endpoint, None)
    join(pub, alice)
    # Keep publishing long enough for several handshake attempts by the refused clients.
    deadline = time.monotonic() + 2.0
    n = 0
    while time.monotonic() < deadline:
        pub.send_multipart([b"detections/cam", b"%d" % n])
        n += 1
        time.sleep(0.01)
    assert len(drain(alice, 1.0)) == n
    assert drain(mallory, 0.2) == []
    assert drain(plain, 0.2) == []
    # The stranger was refused by the allow-list, not merely slow to connect.
    assert rejected_clients(ctx) >= 1


def test_explicit_key_list_and_z85_key_allow_only_those(ctx, keys: Path):
    bob_public, _ = load_certificate(keys / "allowed" / "bob.key")
    pub, endpoint = curve_pub(
        ctx, server_curve(keys, allow=[str(keys / "allowed" / "alice.key")])
    )
    alice = sub(ctx, endpoint, client_curve(keys, "allowed/alice.key_secret"))
    bob = sub(ctx, endpoint, client_curve(keys, "allowed/bob.key_secret"))
    join(pub, alice)
    for i in range(50):
        pub.send_multipart([b"t", b"%d" % i])
    assert len(drain(alice, 1.0)) == 50
    assert drain(bob, 0.2) == []

    # A second server in the same context, allowing bob by his Z85 key: its own ZAP domain.
    pub2, endpoint2 = curve_pub(ctx, server_curve(keys, allow=[bob_public.decode()]))
    bob2 = sub(ctx, endpoint2, client_curve(keys, "allowed/bob.key_secret"))
    alice2 = sub(ctx, endpoint2, client_curve(keys, "allowed/alice.key_secret"))
    join(pub2, bob2)
    pub2.send_multipart([b"t", b"only bob"])
    assert drain(bob2, 1.0) == [[b"t", b"only bob"]]
    assert drain(alice2, 0.2) == []


def test_without_authenticator_clients_are_refused_not_let_in(ctx, keys: Path):
    pub, endpoint = curve_pub(ctx, server_curve(keys))
    stop_authenticators(ctx)
    alice = sub(ctx, endpoint, client_curve(keys, "allowed/alice.key_secret"))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        pub.send_multipart([b"t", b"x"])
        time.sleep(0.02)
    assert drain(alice, 0.2) == []


def test_max_message_size_drops_the_connection_and_the_server_lives_on(ctx, keys: Path):
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    secure_server(pull, server_curve(keys), max_message_size=1024)
    pull.bind("tcp://127.0.0.1:*")
    endpoint = pull.last_endpoint.decode()
    monitor = pull.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def push():
        s = ctx.socket(zmq.PUSH)
        s.linger = 0
        secure_client(s, client_curve(keys, "allowed/alice.key_secret"), max_message_size=1024)
        s.connect(endpoint)
        return s

    first = push()
    first.send(b"small-1")
    assert pull.poll(int(WAIT_S * 1000)), "the first small message never arrived"
    assert pull.recv() == b"small-1"
    first.send(b"x" * 4096)
    assert monitor.poll(int(WAIT_S * 1000)), "the oversized message did not drop the connection"
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    second = push()
    second.send(b"small-2")
    received = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and b"small-2" not in received:
        if pull.poll(100):
            received.append(pull.recv())
    assert b"small-2" in received
    assert all(len(m) <= 1024 for m in received)
    pull.disable_monitor()
    monitor.close()


# ---------------------------------------------------------------------------------------------
# Bind rules and config validation


@pytest.mark.parametrize(
    "address",
    ["tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://192.168.1.10:5556", "tcp://eth0:5556",
     "tcp://[::]:5556", "tcp://camera-box.local:5556"],
)
def test_check_bind_refuses_public_binds_without_curve_or_insecure(address: str, keys: Path):
    with pytest.raises(SecurityError, match=r"^bind: refusing to bind .*curve.*insecure: true"):
        check_bind(address)
    assert check_bind(address, insecure=True).transport == "tcp"
    assert check_bind(address, curve=server_curve(keys)).transport == "tcp"


@pytest.mark.parametrize(
    "address",
    ["tcp://127.0.0.1:5556", "tcp://127.3.2.1:*", "tcp://localhost:5556", "tcp://[::1]:5556",
     "tcp://127.0.0.1:0", "ipc:///run/edgepipe/x.sock", "inproc://frames"],
)
def test_check_bind_accepts_loopback_and_local_transports(address: str):
    assert check_bind(address).loopback


@pytest.mark.parametrize(
    "address, message",
    [
        ("0.0.0.0:5556", "not a ZeroMQ address"),
        ("udp://127.0.0.1:5556", "transport 'udp'"),
        ("tcp://127.0.0.1", "port '127.0.0.1'|no host:port"),
        ("tcp://127.0.0.1:-1", "port '-1'"),
        ("tcp://127.0.0.1:70000", "port '70000'"),
        ("tcp://:5556", "no host:port"),
        ("tcp://::1:5556", "must be bracketed"),
        ("tcp://[zz]:5556", "not an IPv6 address"),
        ("tcp://bad host:5556", "not a host name"),
        ("ipc://", "empty ipc path"),
    ],
)
def test_check_bind_names_bad_syntax(address: str, message: str):
    with pytest.raises(SecurityError, match=message) as info:
        check_bind(address, what="stages.pub.bind")
    text = str(info.value)
    assert text.startswith("stages.pub.bind: ") and "\n" not in text


def test_curve_halves_must_match_the_role(keys: Path):
    with pytest.raises(SecurityError, match="needs curve.server_secret_key"):
        check_bind("tcp://0.0.0.0:5556", curve=client_curve(keys, "allowed/alice.key_secret"))
    with pytest.raises(SecurityError, match="needs curve.client_secret_key"):
        check_connect("tcp://10.0.0.1:5556", curve=server_curve(keys))
    with pytest.raises(SecurityError, match="pick one"):
        check_bind("tcp://0.0.0.0:5556", curve=server_curve(keys), insecure=True)
    with pytest.raises(ValidationError, match="client_public_keys is required together with server_secret_key"):
        CurveConfig(server_secret_key=keys / "server" / "server.key_secret")
    with pytest.raises(ValidationError, match="binding side"):
        CurveConfig()
    with pytest.raises(ValidationError, match="Extra inputs"):
        CurveConfig(server_secret_key="a", client_public_keys=["b"], server_key="c")


class PubConfig(NetworkSecurity, StageConfig):
    bind: str = "tcp://127.0.0.1:5556"


class SubConfig(NetworkSecurity, StageConfig):
    security_address_field = "connect"
    security_role = "connect"
    connect: List[str] = ["tcp://127.0.0.1:5556"]


class PullConfig(NetworkSecurity, StageConfig):
    security_address_field = "address"
    security_bind_flag = "bind"
    address: str = "tcp://127.0.0.1:5560"
    bind: bool = True


def test_network_security_mixin_validates_at_config_time(keys: Path):
    assert PubConfig().bind == "tcp://127.0.0.1:5556"
    with pytest.raises(ValidationError, match="bind: refusing to bind 'tcp://0.0.0.0:5556'"):
        PubConfig(bind="tcp://0.0.0.0:5556")
    assert PubConfig(bind="tcp://0.0.0.0:5556", insecure=True).insecure
    cfg = PubConfig.model_validate(
        {"bind": "tcp://0.0.0.0:5556",
         "curve": {"server_secret_key": "/k/s.key_secret", "client_public_keys": ["/k/clients"]}}
    )  # key files are read when the socket is set up, not at validation
    assert cfg.curve is not None and cfg.curve.server_secret_key == Path("/k/s.key_secret")
    assert SubConfig(connect=["tcp://10.1.2.3:5556"]).connect == ["tcp://10.1.2.3:5556"]
    with pytest.raises(ValidationError, match="connect: transport 'http'"):
        SubConfig(connect=["tcp://10.1.2.3:5556", "http://x:1"])
    with pytest.raises(ValidationError, match="needs curve.client_secret_key"):
        SubConfig(curve={"server_secret_key": "/s", "client_public_keys": ["/c"]})
    with pytest.raises(ValidationError, match="address: refusing to bind 'tcp://\\*:5560'"):
        PullConfig(address="tcp://*:5560")
    assert not PullConfig(address="tcp://*:5560", bind=False).bind


# ---------------------------------------------------------------------------------------------
# Key files


def test_unprotected_or_missing_keys_are_refused(ctx, keys: Path):
    secret = keys / "server" / "server.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(SecurityError, match=r"server.key_secret' is accessible to other users \(mode 0644\)"):
        load_secret_key(secret, "curve.server_secret_key")
    sock = ctx.socket(zmq.PUB)
    with pytest.raises(SecurityError, match="curve.server_secret_key: .*chmod 600"):
        secure_server(sock, server_curve(keys))
    sock.close(0)
    os.chmod(secret, 0o640)  # group-readable is allowed (a service group owning the keys)
    assert load_secret_key(secret)[1]
    os.chmod(keys / "server" / "server.key", 0o600)
    with pytest.raises(SecurityError, match="holds no secret key"):
        load_secret_key(keys / "server" / "server.key")
    with pytest.raises(SecurityError, match="cannot read key file .*nope.key_secret"):
        load_secret_key(keys / "nope.key_secret")
    (keys / "empty").mkdir()
    with pytest.raises(SecurityError, match="curve.client_public_keys: directory .*empty' holds no"):
        server_curve(keys, allow=[str(keys / "empty")]).server_keys()
    bad = keys / "bad.key"
    bad.write_text('curve\n    public-key = "short"\n')
    with pytest.raises(SecurityError, match="malformed key"):
        server_curve(keys, allow=[str(bad)]).server_keys()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True, timeout=60
    )


def test_keys_generate_cli(tmp_path: Path):
    target = tmp_path / "keys"
    done = run_cli("keys", "generate", str(target), "--name", "cam1")
    assert done.returncode == 0, done.stderr
    public_file, secret_file = target / "cam1.key", target / "cam1.key_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    public, no_secret = load_certificate(public_file)
    assert no_secret is None
    assert done.stdout.strip() == public.decode()
    assert load_certificate(secret_file) == load_secret_key(secret_file)
    assert zmq.curve_public(load_secret_key(secret_file)[1]) == public

    again = run_cli("keys", "generate", str(target), "--name", "cam1")
    assert again.returncode != 0
    assert again.stderr.strip().splitlines() == [
        f"edgepipe: error: {str(public_file)!r} exists; pass --force to replace it"
    ]
    assert load_certificate(public_file)[0] == public  # untouched

    forced = run_cli("keys", "generate", str(target), "--name", "cam1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() != public.decode()
    assert load_certificate(public_file)[0].decode() == forced.stdout.strip()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600

    bad = run_cli("keys", "generate", str(target), "--name", "../escape")
    assert bad.returncode != 0 and "is not a key name" in bad.stderr
    assert not (tmp_path / "escape.key").exists()


# ---------------------------------------------------------------------------------------------
# The cross-host frame link: zmq_push sink -> zmq source, both stages as shipped


def test_frame_link_over_curve_admits_only_allowed_senders(keys: Path):
    import numpy as np
    from edgepipe_plugins.sinks.zmq_push import ZmqPushConfig, ZmqPushSink
    from edgepipe_plugins.sources.zmq import ZmqConfig, ZmqSource

    from edgepipe.messages import Frame
    from edgepipe.stage import EndOfStream, StageContext

    port = free_port()
    receiver = ZmqSource(
        ZmqConfig(bind=f"tcp://0.0.0.0:{port}", stop_on_eos=True, live=False,
                  curve=server_curve(keys)),
        StageContext("remote"),
    )
    receiver.check()
    receiver.start()

    def sender(secret: str, name: str) -> ZmqPushSink:
        cfg = ZmqPushConfig(connect=f"tcp://127.0.0.1:{port}", send_timeout=0.5, hwm=1,
                            curve=client_curve(keys, secret))
        sink = ZmqPushSink(cfg, StageContext(name))
        sink.check()
        sink.start()
        return sink

    image = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64)
    stranger = sender("stranger/mallory.key_secret", "mallory")
    allowed = sender("allowed/alice.key_secret", "alice")
    try:
        stranger.process([Frame("evil", k, 1.0, image=image) for k in range(5)])
        allowed.process([Frame("cam", k, 2.0 + k, image=image) for k in range(20)])
        allowed.flush()  # the end marker ends the receiving source
        frames = []
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                frame = receiver.read()
            except EndOfStream:
                break
            if frame is not None:
                frames.append(frame)
    finally:
        allowed.stop()
        stranger.stop()
        receiver.stop()
    assert [f.meta["upstream"] for f in frames] == [{"source": "cam", "frame_id": k} for k in range(20)]
    np.testing.assert_array_equal(frames[-1].image, image)
    # The stranger never completed a handshake: its frames queued, then timed out.
    assert stranger.published.value <= 1
    assert stranger.metrics.dropped.labels("queue_full").value >= 4
