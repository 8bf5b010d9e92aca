"""Logging set-up for the CLI (library modules only call ``logging.getLogger``)."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool = False) -> None:
    """Send masksae's log records to stderr, INFO by default and DEBUG when verbose."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # third-party chatter stays at WARNING unless the user asked for everything
    for noisy in ("transformers", "urllib3", "fsspec", "numcodecs", "zarr", "filelock"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
