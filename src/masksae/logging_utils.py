"""Logging set-up for the CLI (library modules only call ``logging.getLogger``)."""

from __future__ import annotations

import logging
import sys


class TqdmLoggingHandler(logging.Handler):
    """Writes records to stderr through ``tqdm.write``: a log line printed while progress
    bars are on screen appears above them instead of being glued onto a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """Send masksae's log records to stderr (through tqdm, see :class:`TqdmLoggingHandler`),
    INFO by default and DEBUG when verbose.

    May be called again (``-v`` after a subcommand): the levels follow the last call.
    """
    level = logging.DEBUG if verbose else logging.INFO
    handler = TqdmLoggingHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    )
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger().setLevel(level)
    # third-party chatter stays at WARNING unless the user asked for everything
    for noisy in ("transformers", "urllib3", "fsspec", "numcodecs", "zarr", "filelock"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
