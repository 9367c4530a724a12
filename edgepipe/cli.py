"""The `edgepipe` command line.

Each command group lives beside the code it drives and registers itself here through a
``register(app)`` function, so this module stays small and importing it stays cheap (no torch):
heavy imports happen inside the command bodies. Every command exits 0 on success and non-zero with
a one-line reason on stderr otherwise.
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="edgepipe",
    help="Streaming 1-channel YOLOv5 detection daemon: plugin stages over ZeroMQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that add commands to `app`; each defines register(app).
_COMMAND_MODULES = (
    "edgepipe.commands.daemon",  # run, validate, plugins, schema, subscribe
    "edgepipe.commands.model",  # weights convert/info, export
    "edgepipe.commands.detect",  # detect
    "edgepipe.commands.keys",  # keys generate
    "edgepipe.commands.bench",  # bench
)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    typer.echo(f"edgepipe: error: {message}", err=True)
    return typer.Exit(code)


for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if exc.name != _name:
            raise
        continue
    _module.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
