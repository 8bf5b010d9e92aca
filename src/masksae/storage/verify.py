"""Verification of a store: every chunk present, readable and checksum-correct."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from masksae.storage.schema import ARRAY_NAMES, ChunkData, chunk_checksum

if TYPE_CHECKING:
    from masksae.storage.reader import ActivationStore

log = logging.getLogger(__name__)


def verify_chunk(store: ActivationStore, index: int) -> str | None:
    """The problem with chunk ``index``, or None when it is complete and intact."""
    start, stop = store.chunk_bounds(index)
    where = f"chunk {index} (tokens {start}..{stop})"
    # zarr reads a missing shard back as fill values: name the lost file instead of
    # reporting it as a checksum mismatch
    if index in store.broken:
        return f"{where}: {store.broken[index]}; rerun the harvest command to rewrite it"
    record = store.records.get(index)
    if record is None:
        return (
            f"{where}: missing (no completion record: never written or interrupted); "
            "rerun the harvest command to rewrite it"
        )
    from masksae.storage.reader import UnreadableChunkError

    try:
        data = ChunkData(**store.read_chunk(index, ARRAY_NAMES))
    except UnreadableChunkError as exc:
        return (
            f"{where}: unreadable {exc.array} shard {exc.file} ({exc.cause}); delete "
            f"{record_hint(store, index)} and rerun the harvest to rewrite it"
        )
    except Exception as exc:  # noqa: BLE001 - any other IO failure is corruption too
        return (
            f"{where}: unreadable data ({type(exc).__name__}: {exc}); delete "
            f"{record_hint(store, index)} and rerun the harvest to rewrite it"
        )
    actual = chunk_checksum(data)
    if actual != record["checksum"]:
        return (
            f"{where}: checksum mismatch (recorded {record['checksum']}, data gives "
            f"{actual}): the data is corrupted; delete {record_hint(store, index)} and "
            "rerun the harvest to rewrite it"
        )
    return None


def record_hint(store: ActivationStore, index: int) -> str:
    """Path of the completion record of chunk ``index`` (deleting it forces a rewrite)."""
    from masksae.storage.layout import manifest_path

    return str(manifest_path(store.path, index))


def chunk_problems(
    store: ActivationStore, on_chunk: Callable[[int], None] | None = None
) -> dict[int, str]:
    """The problem of each bad chunk by index, in order; {} when every chunk is good."""
    problems: dict[int, str] = {}
    for index in range(store.n_chunks):
        problem = verify_chunk(store, index)
        if problem is not None:
            log.debug("verify %s: %s", store.path, problem)
            problems[index] = problem
        if on_chunk is not None:
            on_chunk(index)
    return problems


def verify_store(
    store: ActivationStore, on_chunk: Callable[[int], None] | None = None
) -> list[str]:
    """Problems found in ``store``, one line per bad chunk; [] when every chunk is good."""
    return list(chunk_problems(store, on_chunk).values())
