"""An on-disk cache of SAE-independent arrays, one entry per JSON-able key.

The evaluation stages that run the LLM (absorption prompts, probing texts) depend only on the
model, its revision, the layer and their own settings, never on the SAE; the first checkpoint
of a sweep writes them here and every later checkpoint on the same model and layer reads them.

An entry is ``<prefix>-<digest>.npz`` (the arrays, uncompressed) plus ``<prefix>-<digest>.json``
(``{"key": key, **meta}``), where the digest is the first 20 hex digits of the SHA-256 of the
key's sorted JSON. Both files are written atomically and the JSON last, so an interrupted
write never leaves an entry that reads as complete; an entry whose stored key differs from
the requested one (a digest collision, a hand-edited file) is ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from masksae.atomic import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


def key_digest(key: dict[str, Any]) -> str:
    """20 hex digits identifying ``key`` (stable across runs and machines)."""
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class KeyedCache:
    """Entries ``<root>/<prefix>-<digest>.{npz,json}``; ``root`` None caches nothing."""

    def __init__(self, root: str | Path | None, prefix: str) -> None:
        self.root = None if root is None else Path(root)
        self.prefix = prefix

    def _stem(self, key: dict[str, Any]) -> Path:
        assert self.root is not None
        return self.root / f"{self.prefix}-{key_digest(key)}"

    def contains(self, key: dict[str, Any]) -> bool:
        """True when a complete entry for ``key`` is on disk (its key is not checked)."""
        return self.root is not None and self._stem(key).with_suffix(".json").is_file()

    def load(self, key: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """``(arrays, meta)`` of the entry for ``key``, or None when absent, unreadable or
        made with another key (both logged: the caller recomputes)."""
        if self.root is None:
            return None
        stem = self._stem(key)
        meta_path, arrays_path = stem.with_suffix(".json"), stem.with_suffix(".npz")
        if not (meta_path.is_file() and arrays_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != json.loads(json.dumps(key, default=str)):
                log.warning("cache entry %s has a different key; recomputing", meta_path)
                return None
            with np.load(arrays_path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (OSError, ValueError, KeyError) as err:
            log.warning("cache entry %s unreadable (%s); recomputing", stem, err)
            return None
        meta.pop("key", None)
        return arrays, meta

    def save(
        self, key: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None
    ) -> Path | None:
        """Write the entry (arrays first, then the JSON that makes it valid); return the npz
        path, or None when caching is off."""
        if self.root is None:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        stem = self._stem(key)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(stem.with_suffix(".npz"), buf.getvalue())
        atomic_write_json(stem.with_suffix(".json"), {"key": key, **(meta or {})})
        return stem.with_suffix(".npz")
