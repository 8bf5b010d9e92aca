"""Verification of a store: every chunk present, readable and checksum-correct."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from masksae.storage.schema import ARRAY_NAMES, ChunkData, chunk_checksum
from masksae.storage.stats import chunk_stats

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
        data = ChunkData(**store.read_chunk(index, ARRAY_NAMES, fresh=True))
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
    # the record's partial statistics (what training normalises with) must be the data's
    stats = chunk_stats(data.activations, data.excluded, store.spec.dtype).to_dict()
    for key, value in stats.items():
        if not np.allclose(np.asarray(record["stats"][key], dtype=np.float64), value, rtol=1e-9):
            return (
                f"{where}: the record's stats.{key} differ from the data's (the record was "
                f"edited); delete {record_hint(store, index)} and rerun the harvest to rewrite it"
            )
    return None


def record_hint(store: ActivationStore, index: int) -> str:
    """Path of the completion record of chunk ``index`` (deleting it forces a rewrite)."""
    from masksae.storage.layout import manifest_key

    return store.location.display(manifest_key(index))


def store_problems(store: ActivationStore) -> list[str]:
    """Store-level problems: array metadata that disagrees with the spec, and group
    attributes (statistics, fingerprint) that disagree with what the chunk records give
    (the statistics the trainer normalises with are recomputed from the records)."""
    problems = list(store.metadata_problems)
    if not store.is_complete:
        return problems  # the writer finalises the attributes once every chunk is complete
    recorded = store.attrs.get("statistics")
    computed = store.stats.to_dict()
    if not isinstance(recorded, dict):
        problems.append(
            "zarr.json: the group attribute 'statistics' is missing or not an object; rerun "
            "the harvest command (it rewrites the attributes of a complete store)"
        )
    else:
        for key, value in computed.items():
            got = recorded.get(key)
            try:
                same = np.allclose(np.asarray(got, dtype=np.float64), value, rtol=1e-9, atol=0)
            except (TypeError, ValueError):
                same = False
            if not same or np.shape(got) != np.shape(value):
                problems.append(
                    f"zarr.json: statistics.{key} differs from the value the chunk records give "
                    f"({_short(got)} vs {_short(value)}): the attributes were edited; rerun the "
                    "harvest command to rewrite them"
                )
                break
    if store.attrs.get("fingerprint") not in (None, store.fingerprint):
        problems.append(
            f"zarr.json: fingerprint {store.attrs.get('fingerprint')!r} differs from the one the "
            f"chunk records give ({store.fingerprint}): the attributes were edited; rerun the "
            "harvest command to rewrite them"
        )
    return problems


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    """Problems found in ``store``: store-level ones (array metadata, group attributes),
    then one line per bad chunk; [] when everything is good."""
    problems = store_problems(store)
    if store.metadata_problems:  # zarr would read every chunk wrongly: nothing more to learn
        return problems
    return problems + list(chunk_problems(store, on_chunk).values())
