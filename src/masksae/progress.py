"""Progress bars (tqdm on stderr) and whether they are shown.

Long work deep inside a metric (the absorption probes, the CE/KL passes) asks
:func:`progress_bar` for its bar instead of taking a ``progress`` flag through every call:
the command (or API call) sets the switch once with :func:`show_progress`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("masksae_progress", default=True)


def progress_enabled() -> bool:
    """Whether bars are shown in this context (default True)."""
    return _ENABLED.get()


@contextlib.contextmanager
def show_progress(enabled: bool) -> Iterator[None]:
    """Show (or hide) every :func:`progress_bar` made inside the block."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def progress_bar(
    total: int | None, desc: str, unit: str = "it", *, leave: bool = False, **kwargs: Any
) -> Any:
    """A tqdm bar on stderr with rate and ETA (hidden when progress is off).

    Inner bars (one metric of one checkpoint) do not ``leave`` a line behind: the log line
    that follows the work says what it gave.
    """
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not progress_enabled(),
        **kwargs,
    )
