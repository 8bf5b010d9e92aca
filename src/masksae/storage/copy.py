"""``masksae store copy SRC DST``: copy a store between any two locations, resumably.

Each chunk's files are copied as raw bytes (no re-encoding), checked against the source
record's checksum before they are written, and, with ``verify``, read back from the
destination and compared byte for byte before the destination's completion record is
written: a chunk counts at the destination only once it arrived intact. Chunks the
destination already holds with the same checksum are skipped, so an interrupted copy
resumes where it stopped. The destination's writer lock, provenance check and final
attributes (statistics, fingerprint) are those of a harvest (:class:`StoreWriter`); the
finished copy has the source's fingerprint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from masksae.errors import StoreError
from masksae.storage.location import StoreLocation
from masksae.storage.schema import ChunkData, chunk_checksum

log = logging.getLogger(__name__)

#: attributes the destination computes itself when it is finalised
_COMPUTED_ATTRS = frozenset({"complete", "chunks_complete", "statistics", "fingerprint"})


@dataclass
class CopyResult:
    """What a copy did."""

    source: str
    """Source location."""
    destination: str
    """Destination location."""
    copied_chunks: int
    """Chunks copied by this run."""
    skipped_chunks: int
    """Chunks the destination already held with the same checksum."""
    copied_bytes: int
    """Bytes of chunk files copied by this run."""
    seconds: float
    """Wall time."""
    complete: bool
    """Whether the destination now holds every chunk."""
    fingerprint: str
    """The destination's fingerprint (equals the source's when complete)."""


def copy_store(
    source: str | Any,
    destination: str | Any,
    *,
    source_options: dict[str, Any] | None = None,
    destination_options: dict[str, Any] | None = None,
    verify: bool = True,
    break_lock: bool = False,
    workers: int = 4,
    on_chunk: Callable[[int, int], None] | None = None,
) -> CopyResult:
    """Copy the store at ``source`` to ``destination`` (see the module docstring).

    ``on_chunk(index, n_bytes)`` is called after each chunk copied or skipped (0 bytes).
    """
    from masksae.storage import layout
    from masksae.storage.chunkio import metadata_keys
    from masksae.storage.reader import ActivationStore
    from masksae.storage.writer import StoreWriter

    start_time = time.perf_counter()
    src = ActivationStore.open(source, require_complete=False, storage_options=source_options)
    if not src.is_complete:
        log.warning(
            "source %s is incomplete (%d of %d chunks): copying the complete chunks only",
            src.path,
            len(src.completed_chunks),
            src.n_chunks,
        )
    dst_loc = StoreLocation.parse(destination, destination_options)
    if dst_loc.display() == src.location.display():
        raise StoreError(f"store copy: source and destination are both {dst_loc}")
    writer = StoreWriter.open(dst_loc, src.spec, break_lock=break_lock)
    copied = skipped = n_bytes = 0
    try:
        # the destination's metadata documents are the source's (array layout and codecs as
        # written, attributes such as the package version kept), still marked incomplete
        src_meta = src.location.read_many(metadata_keys())
        dst_meta = dst_loc.read_many(metadata_keys())
        for key in metadata_keys()[1:]:
            if key in src_meta and dst_meta.get(key) != src_meta[key]:
                dst_loc.write_bytes(key, src_meta[key])
        layout.update_attrs(
            dst_loc, {k: v for k, v in src.attrs.items() if k not in _COMPUTED_ATTRS}
        )
        dst_records = layout.read_manifests(dst_loc, src.spec)
        todo: list[int] = []
        for index in sorted(src.records):
            record = src.records[index]
            have = dst_records.get(index)
            if (
                index in writer.completed_chunks
                and have is not None
                and have.get("checksum") == record["checksum"]
            ):
                skipped += 1
                if on_chunk is not None:
                    on_chunk(index, 0)
            else:
                todo.append(index)

        def copy_one(index: int) -> int:
            files = src.fetch_chunk_files(index)
            data = ChunkData(**src.decode_chunk_files(index, files))
            if chunk_checksum(data) != src.records[index]["checksum"]:
                raise StoreError(
                    f"chunk {index} of the source {src.path} does not match its recorded "
                    f"checksum: not copied; run `masksae store verify {src.path}`"
                )
            writer.write_raw_chunk(index, files, src.records[index], verify=verify)
            return sum(len(b) for b in files.values())

        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="masksae-copy") as pool:
            for index, size in zip(todo, pool.map(copy_one, todo), strict=True):
                copied += 1
                n_bytes += size
                if on_chunk is not None:
                    on_chunk(index, size)
    finally:
        writer.close()
    dst = ActivationStore.open(dst_loc, require_complete=False)
    return CopyResult(
        source=str(src.path),
        destination=str(dst.path),
        copied_chunks=copied,
        skipped_chunks=skipped,
        copied_bytes=n_bytes,
        seconds=time.perf_counter() - start_time,
        complete=dst.is_complete,
        fingerprint=dst.fingerprint,
    )
