"""How every command reports a user error: a red ``error:`` line on stderr, no traceback, and an exit status."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
