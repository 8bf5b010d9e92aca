"""Zero-copy reads and writes of uncompressed activation shards (the ``"none"`` codec).

With ``compression="none"`` a shard file (zarr v3 ``sharding_indexed`` codec) holds its
inner chunks as raw little-endian bytes followed by an index of (offset, nbytes) uint64
pairs and a crc32c. Memory-mapping the file and viewing each inner chunk in place skips
zarr's decode copies: the stream then copies each row exactly once, from the page cache
into its shuffle buffer. Any other layout returns None and callers fall back to zarr.

Writing a full shard of that layout is the rows themselves followed by that index, so
:func:`write_plain_shard` writes the caller's buffer as is, skipping zarr's encode copies
(a fill-valued buffer and a copy per inner chunk, then one concatenation of the shard:
three chunk-sized passes, measured at as much harvest time as the file write itself). The
bytes are exactly zarr's (tests compare the files); anything else goes through zarr.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from pathlib import Path

import numpy as np

from masksae.storage import direct_io

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


def plain_shard_index(inner_per_shard: int, inner_bytes: int) -> bytes:
    """The encoded index of a shard whose ``inner_per_shard`` inner chunks of
    ``inner_bytes`` each are written back to back in order: (offset, nbytes) uint64 pairs,
    little-endian, then their crc32c (zarr's ``index_codecs``: bytes, crc32c)."""
    import google_crc32c  # zarr's own crc32c implementation (a zarr dependency)

    offsets = np.arange(inner_per_shard, dtype="<u8") * np.uint64(inner_bytes)
    pairs = np.stack([offsets, np.full(inner_per_shard, inner_bytes, dtype="<u8")], axis=1)
    raw = pairs.astype("<u8").tobytes()
    return raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()


def write_plain_shard(file: Path, rows: np.ndarray, inner_rows: int) -> None:
    """Write ``rows`` ([shard rows, D], every inner chunk full) as a plain shard file, the
    bytes zarr's sharding codec writes for them, atomically: a temporary file in the same
    folder, renamed over ``file`` (the caller fsyncs). Rows in inner-chunk order are the
    inner chunks in zarr's (morton) order, since the shard's chunk grid is one column."""
    if sys.byteorder != "little" or rows.ndim != 2 or rows.shape[0] % inner_rows:
        raise ValueError(f"not a plain shard: {rows.shape} rows in inner chunks of {inner_rows}")
    data = np.ascontiguousarray(rows)
    inner_bytes = inner_rows * data.shape[1] * data.dtype.itemsize
    index = plain_shard_index(data.shape[0] // inner_rows, inner_bytes)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.partial")
    try:
        # the rows around the page cache where the filesystem allows (written once, not read
        # back by the harvest: see direct_io), the index after them
        direct_io.write_new_file(tmp, data, index)
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
