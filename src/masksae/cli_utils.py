"""Helpers shared by the stage command modules."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from masksae.errors import MasksaeError

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("masksae")


def user_errors(func: F) -> F:
    """Turn a MasksaeError into a one-line message on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MasksaeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: completed work is saved; rerun the same command to resume "
                "(with --resume for masksae train)",
                err=True,
            )
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
