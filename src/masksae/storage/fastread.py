"""Zero-copy reads of uncompressed activation shards (the ``"none"`` codec).

With ``compression="none"`` a shard file (zarr v3 ``sharding_indexed`` codec) holds its
inner chunks as raw little-endian bytes followed by an index of (offset, nbytes) uint64
pairs and a crc32c. Memory-mapping the file and viewing each inner chunk in place skips
zarr's decode copies: the stream then copies each row exactly once, from the page cache
into its shuffle buffer. Any other layout returns None and callers fall back to zarr.
"""

from __future__ import annotations

import json
import mmap
import sys
from pathlib import Path

import numpy as np

_EMPTY = np.uint64(2**64 - 1)
_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}


def plain_shard_rows(array_dir: Path | bytes) -> int | None:
    """Rows per inner chunk if the activations array uses plain uncompressed shards
    (``array_dir``: the array's folder, or the bytes of its ``zarr.json``)."""
    if sys.byteorder != "little":
        return None
    try:
        text = array_dir if isinstance(array_dir, bytes) else (Path(array_dir) / "zarr.json")
        meta = json.loads(text if isinstance(text, bytes) else text.read_text(encoding="utf-8"))
        (codec,) = meta["codecs"]
        config = codec["configuration"]
        plain = (
            codec["name"] == "sharding_indexed"
            and config["codecs"] == [_BYTES_LE]
            and config["index_codecs"] == [_BYTES_LE, {"name": "crc32c"}]
            and config.get("index_location", "end") == "end"
            and meta["chunk_key_encoding"]["name"] == "default"
            and meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/"
        )
        return int(config["chunk_shape"][0]) if plain else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _map(fd: int) -> mmap.mmap:
    """A read-only mapping of the whole file, its pages mapped up front where the OS can
    (MAP_POPULATE: one call instead of a page fault per 4 KiB on first touch, which cost
    the stream about a tenth of its time)."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        try:
            return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
        except (OSError, ValueError, TypeError):
            pass
    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        try:
            mapped.madvise(mmap.MADV_WILLNEED)
        except OSError:
            pass
    return mapped


def shard_views(
    file: Path, n_rows: int, d_model: int, dtype: np.dtype, inner_rows: int, inner_per_shard: int
) -> list[np.ndarray] | None:
    """Read-only [rows, D] views of the inner chunks covering ``n_rows`` rows of a shard.

    Returns None when the file is missing or its index does not describe complete, in-bounds
    inner chunks (the caller then reads through zarr, which reports the problem).
    """
    try:
        with open(file, "rb") as fh:
            mapped = _map(fh.fileno())
    except (OSError, ValueError):
        return None
    return buffer_views(
        np.frombuffer(mapped, dtype=np.uint8), n_rows, d_model, dtype, inner_rows, inner_per_shard
    )


def buffer_views(
    raw: np.ndarray,
    n_rows: int,
    d_model: int,
    dtype: np.dtype,
    inner_rows: int,
    inner_per_shard: int,
) -> list[np.ndarray] | None:
    """:func:`shard_views` over the bytes of a shard already in memory (uint8 array)."""
    index_bytes = inner_per_shard * 16 + 4
    if raw.shape[0] < index_bytes:
        return None
    index = raw[-index_bytes:-4].view("<u8").reshape(inner_per_shard, 2)
    row_bytes = d_model * dtype.itemsize
    spans: list[list[int]] = []  # [start, stop) byte ranges; adjacent inner chunks merged
    for j in range(inner_per_shard):
        rows = min(inner_rows, n_rows - j * inner_rows)
        if rows <= 0:
            break
        offset, nbytes = index[j]
        if (
            offset == _EMPTY
            or nbytes != inner_rows * row_bytes
            or offset + nbytes > raw.shape[0] - index_bytes
        ):
            return None
        start = int(offset)
        if spans and spans[-1][1] == start:  # written back to back: one view (and one
            spans[-1][1] = start + rows * row_bytes  # source for the stream's references)
        else:
            spans.append([start, start + rows * row_bytes])
    return [raw[a:b].view(dtype).reshape(-1, d_model) for a, b in spans]
