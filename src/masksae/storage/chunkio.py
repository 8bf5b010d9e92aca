"""Decoding a chunk from the raw bytes of its shard files (no filesystem involved).

Remote reads fetch a chunk's files whole (one GET each) and decode them here, through
zarr itself over an in-memory store holding the store's metadata and those files, so
every codec zarr supports decodes exactly as it would from disk. A file missing from the
given bytes is an error, never fill values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from masksae.errors import StoreError
from masksae.storage.schema import ARRAY_NAMES

GROUP_METADATA = "zarr.json"


def metadata_keys() -> list[str]:
    """Relative names of every metadata document of a store (group first)."""
    return [GROUP_METADATA] + [f"{name}/{GROUP_METADATA}" for name in ARRAY_NAMES]


def array_keys(index: int) -> dict[str, str]:
    """Array name -> relative name of its file in chunk ``index``."""
    from masksae.storage.layout import chunk_keys

    return dict(zip(ARRAY_NAMES, chunk_keys(index), strict=True))


def decode_chunk(
    metadata: dict[str, bytes],
    index: int,
    n_rows: int,
    start: int,
    files: dict[str, bytes],
    names: tuple[str, ...] = ARRAY_NAMES,
) -> dict[str, np.ndarray]:
    """The arrays ``names`` of chunk ``index`` (``n_rows`` tokens from token ``start``)
    decoded from ``files`` (relative name -> bytes)."""
    import zarr
    from zarr.core.buffer import cpu
    from zarr.storage import MemoryStore

    keys = array_keys(index)
    wanted = {name: keys[name] for name in names}
    lost = [key for key in wanted.values() if key not in files]
    if lost:
        raise StoreError(f"chunk {index}: shard file(s) missing ({', '.join(lost)})")
    content: dict[str, Any] = {key: cpu.Buffer.from_bytes(data) for key, data in metadata.items()}
    for key in wanted.values():
        content[key] = cpu.Buffer.from_bytes(files[key])
    group = zarr.open_group(store=MemoryStore(content, read_only=True), mode="r", zarr_format=3)
    return {name: np.asarray(group[name][start : start + n_rows]) for name in names}
