"""Daemon commands: ``run``, ``validate``, ``plugins``, ``schema``, ``subscribe``.

Each command body imports what it needs, so ``edgepipe --help`` stays cheap; none of them imports
torch (only the stages that need it do, inside their workers).
"""

from __future__ import annotations

import json
import re
import sys
import threading
from typing import List, Optional

import typer

# `subscribe` says what it is waiting on when nothing has arrived after this many seconds.
WAITING_NOTE_S = 2.0
# host:port, [v6]:port: what people type for a TCP endpoint when they leave out "tcp://".
BARE_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):\d{1,5}")


def _fail(message: str, code: int = 1) -> typer.Exit:
    from edgepipe.cli import fail

    return fail(message, code)


def _load(config: str):  # type: ignore[no-untyped-def]
    from edgepipe.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        for line in exc.errors[:-1]:
            typer.echo(f"edgepipe: error: {line}", err=True)
        raise _fail(exc.errors[-1] if exc.errors else "invalid config") from None


def validate(
    configs: List[str] = typer.Argument(..., metavar="CONFIG", help="Pipeline configs (YAML), one or more."),
) -> None:
    """Check configs statically (no device opened): one line per file, OK or its errors."""
    from edgepipe.config import ConfigError, load_config
    from edgepipe.registry import Registry

    registry = Registry.discover()
    failed = 0
    for config in configs:
        try:
            pipeline = load_config(config, registry)
        except ConfigError as exc:
            failed += 1
            for line in exc.errors or ["invalid config"]:
                # With several files, each error names its file (most name it already).
                if len(configs) > 1 and not line.startswith(f"{config}:"):
                    line = f"{config}: {line}"
                typer.echo(f"edgepipe: error: {line}", err=True)
            continue
        stages = ", ".join(f"{n} ({s.type})" for n, s in pipeline.specs.items())
        typer.echo(f"{config}: OK: {len(pipeline.stages)} stages: {stages}")
    if failed:
        raise typer.Exit(1)


def run(
    config: str = typer.Argument(..., help="Pipeline config (YAML)."),
) -> None:
    """Run the pipeline daemon until SIGTERM/SIGINT, or until every finite source has ended."""
    from edgepipe.daemon.supervisor import run_daemon

    pipeline = _load(config)
    code = run_daemon(pipeline)
    raise typer.Exit(code)


def plugins(
    as_json: bool = typer.Option(False, "--json", help="One JSON document with every stage type."),
) -> None:
    """List every installed stage type with its kind and one-line description."""
    from edgepipe.registry import Registry

    registry = Registry.discover()
    rows = registry.describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        width = max((len(r["name"]) for r in rows), default=4)
        for r in rows:
            if r["error"]:
                typer.echo(f"{r['name']:<{width}}  {'broken':<9}  {r['error']}")
            else:
                typer.echo(f"{r['name']:<{width}}  {r['kind']:<9}  {r['description']}")
    for line in registry.conflicts:
        typer.echo(f"edgepipe: warning: {line}", err=True)


def schema(
    what: str = typer.Argument(
        ..., help="'config' (the pipeline config), 'detections' or 'events' (published messages)."
    ),
) -> None:
    """Print a JSON Schema: of the pipeline config (for editors), of the detection message or of
    the event message."""
    from edgepipe.client import SCHEMAS, schema_text

    if what == "config":
        from edgepipe.config import config_model
        from edgepipe.registry import Registry

        model, errors = config_model(Registry.discover())
        for line in errors:
            typer.echo(f"edgepipe: warning: left out of the schema: {line}", err=True)
        typer.echo(json.dumps(model.model_json_schema(), indent=2))
    elif what in SCHEMAS:
        typer.echo(schema_text(what).rstrip("\n"))
    else:
        known = ["'config'"] + [repr(s) for s in SCHEMAS]
        raise _fail(f"schema {what!r}: expected {', '.join(known[:-1])} or {known[-1]}", 2)


def subscribe(
    endpoint: str = typer.Argument(..., help="ZeroMQ endpoint of a zmq_pub sink, e.g. tcp://127.0.0.1:5556."),
    topic: str = typer.Option(
        "detections/", "--topic",
        help="Topic prefix to subscribe to: 'detections/' (per frame), 'events/' (tracked objects), "
        "'detections/cam1' (one source), '' (everything).",
    ),
    count: Optional[int] = typer.Option(None, "--count", min=1, help="Exit after this many messages."),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", min=0.0, help="Exit non-zero when no message arrives within this many seconds."
    ),
    curve_server_key: Optional[str] = typer.Option(
        None, "--curve-server-key", help="CURVE: the publisher's public key file (NAME.key) or Z85 key."
    ),
    curve_secret_key: Optional[str] = typer.Option(
        None, "--curve-secret-key", help="CURVE: this subscriber's NAME.key_secret (its NAME.key must be in the publisher's allow-list)."
    ),
) -> None:
    """Print each message's JSON, bare, one per line (pipe it into jq)."""
    from edgepipe.client import SubscribeTimeout, subscribe_raw
    from edgepipe.security import CurveConfig

    curve = None
    if (curve_server_key is None) != (curve_secret_key is None):
        raise _fail("--curve-server-key and --curve-secret-key go together", 2)
    if curve_server_key is not None:
        curve = CurveConfig.model_validate(
            {"client_secret_key": curve_secret_key, "server_public_key": curve_server_key}
        )
    if BARE_HOST_PORT.fullmatch(endpoint):
        typer.echo(f"edgepipe: note: {endpoint!r} names no transport; subscribing to tcp://{endpoint}", err=True)
        endpoint = f"tcp://{endpoint}"
    received = 0
    # Nothing may ever come (no daemon, another port, a key the publisher does not allow), and
    # a SUB socket cannot tell: say once what is being waited for.
    arrived = threading.Event()
    note = threading.Timer(WAITING_NOTE_S, _waiting_note, (arrived, endpoint, topic, curve is not None))
    note.daemon = True
    note.start()
    try:
        for _topic, payload in subscribe_raw(endpoint, topic=topic, timeout=timeout, curve=curve):
            arrived.set()
            try:
                text = payload.decode("utf-8")
                json.loads(text)
            except ValueError:
                typer.echo(
                    f"edgepipe: warning: skipped a non-JSON message on {_topic.decode(errors='replace')!r}",
                    err=True,
                )
                continue
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            received += 1
            if count is not None and received >= count:
                return
    except SubscribeTimeout as exc:
        raise _fail(str(exc)) from None
    except BrokenPipeError:
        return
    except ValueError as exc:  # a malformed endpoint, an unreadable or unprotected key file
        raise _fail(str(exc), 2) from None
    finally:
        arrived.set()
        note.cancel()


def _waiting_note(arrived: threading.Event, endpoint: str, topic: str, curve: bool) -> None:
    if arrived.is_set():
        return
    hint = "is a zmq_pub stage bound there, and its daemon running?"
    if curve:
        hint = "is a zmq_pub stage bound there, and this client's public key in its allow-list?"
    typer.echo(
        f"edgepipe: waiting for messages from {endpoint} on topic {topic!r}; nothing after "
        f"{WAITING_NOTE_S:g} s ({hint})",
        err=True,
    )


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(validate)
    app.command()(plugins)
    app.command()(schema)
    app.command()(subscribe)
