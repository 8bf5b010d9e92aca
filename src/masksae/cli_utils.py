"""Helpers shared by the stage command modules."""

from __future__ import annotations

import errno
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from masksae.errors import ConfigError, MasksaeError

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
        except OSError as exc:
            if exc.errno not in _PATH_ERRNOS:
                raise
            # a path the user named is unusable (a file where a folder belongs, no
            # permission, full disk): one line, not a traceback
            where = f" {str(exc.filename)!r}" if exc.filename else ""
            typer.echo(
                f"error: cannot use{where}: {exc.strerror}: check the paths given "
                "(--out, --cache, ...) and the disk",
                err=True,
            )
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: completed work is saved; rerun the same command to resume "
                "(with --resume for masksae train)",
                err=True,
            )
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


#: OSError numbers that mean "this path cannot be used", reported as user errors.
_PATH_ERRNOS = frozenset(
    {
        errno.EEXIST,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EROFS,
        errno.EDQUOT,
    }
)


def check_output_dir(path: Path, flag: str) -> None:
    """Refuse an output folder ``path`` that is a file or lies under a file.

    Raises :class:`ConfigError` naming ``flag`` (e.g. ``--out``) and the offending path.
    """
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"lies under the file {str(p)!r}"
            raise ConfigError(
                f"{flag} {str(path)!r} {what}, not a folder: choose another {flag} "
                "(a new or existing folder)"
            )
        if p.exists():
            return
