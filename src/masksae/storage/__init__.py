"""The activation store: a Zarr v3 cache of LLM activations with per-chunk checksums.

Public API (see docs/architecture.md): :class:`ChunkData`, :class:`StoreSpec`,
:class:`StoreWriter`, :class:`ActivationStore`, :class:`ActivationStats`.
Excluded-token policy: special tokens, position 0 and (harvest option
``--outlier-norm-factor``) norm outliers are stored and flagged (``excluded``); the reader
skips them by default and statistics ignore them.
"""

from masksae.storage.codecs import DEFAULT_COMPRESSION, parse_compression
from masksae.storage.reader import ActivationStore
from masksae.storage.schema import EXCLUDED_TOKEN_POLICY, ChunkData, StoreSpec
from masksae.storage.stats import ActivationStats
from masksae.storage.writer import StoreWriter

__all__ = [
    "DEFAULT_COMPRESSION",
    "EXCLUDED_TOKEN_POLICY",
    "ActivationStats",
    "ActivationStore",
    "ChunkData",
    "StoreSpec",
    "StoreWriter",
    "parse_compression",
]
