"""Where masksae keeps what it builds or fetches once per machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    """``$MASKSAE_CACHE/<name>`` (default ``~/.cache/masksae/<name>``): bundled models,
    remote-store chunks, the compiled CPU kernels."""
    root = os.environ.get("MASKSAE_CACHE") or os.path.join("~", ".cache", "masksae")
    return Path(root).expanduser() / name
