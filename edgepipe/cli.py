"""The `edgepipe` command line.

Each command group lives beside the code it drives and registers itself here through a
``register(app)`` function, so this module stays small and importing it stays cheap (no torch):
heavy imports happen inside the command bodies. Every command exits 0 on success and non-zero with
a one-line reason on stderr otherwise.

Help is click's plain layout (``rich_markup_mode=None``): recent typer releases draw every option
in their rich panels with its type, a flag too ("--help <bool>"), as if it took a value; the plain
layout shows a flag as a flag. ``-h`` works wherever ``--help`` does (contexts inherit it), and
command lists show each command's whole summary, wrapped, where click would cut it off at the
terminal's width.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from edgepipe import __version__


class _Group(TyperGroup):
    """A command group whose help lists every command with its whole first paragraph."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    name="edgepipe",
    help="Streaming 1-channel YOLOv5 detection daemon: plugin stages over ZeroMQ.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: Optional[bool]) -> None:
    if value:
        typer.echo(f"edgepipe {__version__}")
        raise typer.Exit()


@app.callback()
def _top(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass

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

# Groups that commands modules added (weights, keys) list their commands the same way.
# (A group's own class, when it names one, is kept.)
for _info in app.registered_groups:
    if not isinstance(_info.cls, type):
        _info.cls = _Group


def main() -> None:
    try:
        # "edgepipe" in usage lines even when started as `python -m edgepipe`.
        app(prog_name="edgepipe")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
