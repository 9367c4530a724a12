"""`edgepipe keys generate`: CURVE key pairs for tcp links and the detection PUB socket.

Writes pyzmq-format certificate files: ``NAME.key`` (the public key, to hand to the other side)
and ``NAME.key_secret`` (both keys, mode 0600, stays on this host). The public key is printed
alone on stdout so a script can capture it; what was written goes to stderr.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    keys_app = typer.Typer(
        name="keys", help="CURVE keys for encrypted, authenticated links.", no_args_is_help=True
    )

    @keys_app.command("generate")
    def generate(
        directory: Path = typer.Argument(..., help="Directory to write the key files in (created 0700)."),
        name: str = typer.Option("edgepipe", "--name", help="Base name: writes NAME.key and NAME.key_secret."),
        force: bool = typer.Option(False, "--force", help="Replace existing key files of that name."),
    ) -> None:
        """Generate a CURVE key pair: NAME.key (public) and NAME.key_secret (0600)."""
        from edgepipe.cli import fail
        from edgepipe.security import SecurityError, generate_keys

        try:
            public_path, secret_path, public = generate_keys(directory, name, force=force)
        except SecurityError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            raise fail(f"cannot write keys in {str(directory)!r}: {exc.strerror}") from None
        typer.echo(f"Wrote {str(public_path)!r} (public) and {str(secret_path)!r} (secret, 0600)", err=True)
        typer.echo(public.decode("ascii"))

    app.add_typer(keys_app)
