"""User-facing errors.

Every error a user can cause derives from :class:`MasksaeError`. The CLI prints its message
(no traceback) and exits with status 2, so messages must name the bad value, what was
expected, and what to do about it.
"""

from __future__ import annotations


class MasksaeError(Exception):
    """Base class for errors caused by user input or by the state of files on disk."""


class ConfigError(MasksaeError):
    """A configuration value is missing, unknown or out of range."""


class CorpusError(MasksaeError):
    """A text corpus cannot be found, reached or read, or yields no text."""


class ModelError(MasksaeError):
    """A language model cannot be loaded or does not fit the requested hook."""


class StoreError(MasksaeError):
    """An activation store is missing, incomplete, corrupted or unreadable."""


class ProvenanceMismatchError(StoreError):
    """An existing store or run was made with different settings than requested."""


class CheckpointError(MasksaeError):
    """A checkpoint is missing, incomplete, or does not match the requested run."""
