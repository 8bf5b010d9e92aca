"""The activation store: a Zarr v3 cache of LLM activations with per-chunk checksums.

Public API (see docs/architecture.md): :class:`ChunkData`, :class:`StoreSpec`,
:class:`StoreWriter`, :class:`ActivationStore`, :class:`ActivationStats`.
Excluded-token policy: special tokens, position 0 and (harvest option
``--outlier-norm-factor``) norm outliers are stored and flagged (``excluded``); the reader
skips them by default and statistics ignore them.
"""

from __future__ import annotations

from masksae.lazy_exports import lazy_exports

# imported on first use (PEP 562) so ``masksae --help`` does not import torch or zarr
_EXPORTS = {
    "DEFAULT_COMPRESSION": "masksae.storage.codecs",
    "parse_compression": "masksae.storage.codecs",
    "ActivationStore": "masksae.storage.reader",
    "EXCLUDED_TOKEN_POLICY": "masksae.storage.schema",
    "ChunkData": "masksae.storage.schema",
    "StoreSpec": "masksae.storage.schema",
    "ActivationStats": "masksae.storage.stats",
    "StoreWriter": "masksae.storage.writer",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
