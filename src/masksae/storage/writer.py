"""StoreWriter: create or resume a store and write chunks on a background thread.

A chunk is complete only once (1) its data files are written and fsynced and (2) its
completion record ``_chunks/<index>.json`` (checksum + partial statistics) is atomically
written. Any failure in between (crash, SIGKILL, full disk) leaves no record, so the chunk
reads as incomplete and a resumed writer rewrites it.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from masksae.errors import ProvenanceMismatchError, StoreError
from masksae.storage import layout
from masksae.storage.schema import (
    ARRAY_NAMES,
    FORMAT_VERSION,
    STORE_DTYPES,
    TOKEN_ARRAYS,
    ChunkData,
    StoreSpec,
    chunk_checksum,
    spec_differences,
)
from masksae.storage.stats import ChunkStats, aggregate, chunk_stats

log = logging.getLogger(__name__)

_STOP = object()
RECORD_FIELDS = frozenset(
    {
        "index",
        "start",
        "stop",
        "n_tokens",
        "n_excluded",
        "n_masked",
        "n_masked_excluded",
        "checksum",
        "checksum_algorithm",
        "stats",
        "file_sizes",
    }
)
"""Fields of a chunk completion record written by the writer itself."""


class StoreWriter:
    """Writes the chunks of one store; use :meth:`open`, then as a context manager."""

    def __init__(
        self,
        path: Path,
        spec: StoreSpec,
        completed: set[int],
        queue_size: int,
        *,
        worker: bool = False,
    ) -> None:
        self.path = Path(path)
        self.spec = spec
        self._completed = set(completed)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: tuple[int, BaseException] | None = None
        self._closed = False
        self._arrays: dict[str, Any] | None = None
        self._worker = worker  # chunk writer under a parent's lock: no lock, no finalising
        self._lock_handle = None if worker else layout.lock_store(self.path)
        self._thread = threading.Thread(
            target=self._run, name=f"masksae-store-writer:{self.path.name}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, spec: StoreSpec, *, queue_size: int = 2) -> StoreWriter:
        """Create a store at ``path``, or resume the store there if it has the same spec.

        ``queue_size`` chunks may wait for the writer thread before ``write_chunk`` blocks.
        Raises ProvenanceMismatchError (naming every differing key) if ``path`` holds a store
        made with a different spec or provenance, and StoreError if it is a file or a
        non-empty directory that is not a store.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise StoreError(
                f"output path {path} is a file, not a store directory: choose another --out"
            )
        if not path.exists() or not any(path.iterdir()):
            try:
                layout.create_store(path, spec)
                created = True
            except OSError as exc:
                if layout.read_attrs(path) is None:
                    raise StoreError(
                        f"cannot create the activation store {path}: {exc}; check "
                        "the path, permissions and free disk space"
                    ) from exc
                # another process created the store at the same moment: open it like any
                # existing store (its writer lock then names that process)
                log.debug("store %s was created concurrently by another process", path)
                created = False
            if created:
                return cls(path, spec, set(), queue_size)
        attrs = layout.read_attrs(path)
        if attrs is None:
            raise StoreError(
                f"output path {path} is a non-empty directory that is not an activation "
                "store: choose another --out (an absent or empty directory)"
            )
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"store {path} has format version {attrs.get('format_version')!r}, this "
                f"masksae writes version {FORMAT_VERSION}: choose another --out or delete it"
            )
        existing = layout.spec_from_attrs(attrs)
        diffs = spec_differences(existing, spec)
        if diffs:
            lines = "\n".join(
                f"  {key}: store has {old!r}, requested {new!r}" for key, old, new in diffs
            )
            raise ProvenanceMismatchError(
                f"output path {path} holds a store made with different settings:\n{lines}\n"
                "choose another --out, or delete the old store to rebuild it"
            )
        completed = set(_intact_records(path, spec))
        log.info(
            "resuming store %s: %d of %d chunks already complete",
            path,
            len(completed),
            spec.n_chunks,
        )
        return cls(path, spec, completed, queue_size)

    @classmethod
    def attach(
        cls, path: str | Path, spec: StoreSpec, *, owner_pid: int, queue_size: int = 2
    ) -> StoreWriter:
        """A chunk writer for a worker process of a multi-worker harvest.

        The store must already exist with exactly ``spec`` and its writer lock must be held
        by process ``owner_pid`` (the parent, which created or resumed it with :meth:`open`
        and finalises it). The returned writer takes no lock and does not finalise on close:
        it only writes chunks and their completion records. Workers must write disjoint
        chunks (each chunk is its own set of files, so that is safe).
        """
        path = Path(path)
        attrs = layout.read_attrs(path)
        if attrs is None:
            raise StoreError(
                f"worker cannot attach to {path}: not an activation store "
                "(the parent process creates it first)"
            )
        diffs = spec_differences(layout.spec_from_attrs(attrs), spec)
        if diffs:
            keys = ", ".join(key for key, _old, _new in diffs)
            raise ProvenanceMismatchError(
                f"worker's settings differ from store {path} on: {keys}; every worker must "
                "run the parent's exact configuration"
            )
        holder = layout.lock_holder(path)
        if holder != owner_pid:
            raise StoreError(
                f"worker cannot attach to {path}: its writer lock is held by "
                f"{'pid ' + str(holder) if holder else 'nobody'}, not by the parent pid "
                f"{owner_pid}; start multi-device harvests with `masksae harvest --devices`"
            )
        completed = set(_intact_records(path, spec, quiet=True))
        return cls(path, spec, completed, queue_size, worker=True)

    # ------------------------------------------------------------------ state
    @property
    def n_chunks(self) -> int:
        """Number of chunks of the finished store."""
        return self.spec.n_chunks

    @property
    def completed_chunks(self) -> frozenset[int]:
        """Chunks whose data and completion record are on disk."""
        with self._lock:
            return frozenset(self._completed)

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """Token range [start, stop) of chunk ``index``."""
        return self.spec.chunk_bounds(index)

    # ------------------------------------------------------------------ writing
    def write_chunk(
        self, index: int, data: ChunkData, record_extra: dict[str, Any] | None = None
    ) -> None:
        """Queue chunk ``index`` for the writer thread (blocks only while the queue is full).

        The fields of ``data`` may be numpy arrays or torch tensors (any device); they are
        copied, so the caller may reuse its buffers. ``record_extra`` holds JSON-able
        producer fields added to the chunk's completion record (e.g. ``n_norm_outliers``);
        they may not replace the writer's own fields. An error of an earlier chunk in the
        writer thread is raised here as a StoreError naming that chunk.
        """
        self._raise_pending_error()
        if self._closed:
            raise StoreError(f"store writer for {self.path} is closed")
        extra = dict(record_extra or {})
        clash = sorted(set(extra) & RECORD_FIELDS)
        if clash:
            raise StoreError(
                f"record_extra of chunk {index} may not set {clash}: those are "
                "the writer's own record fields"
            )
        item = (*self._prepare(index, data), extra)
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_pending_error()

    def flush(self) -> None:
        """Wait until every queued chunk is written; raise the writer's error if any."""
        self._queue.join()
        self._raise_pending_error()

    def close(self) -> None:
        """Flush, stop the writer thread, raise any writer error, finalise the attributes.

        When every chunk is complete the attributes get ``complete: true``, the statistics
        and the fingerprint.
        """
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        try:
            self._raise_pending_error()
            if not self._worker:
                self._finalise()
        except OSError as exc:
            raise StoreError(
                f"cannot write the final attributes of store {self.path}: {exc}; "
                "the chunks are complete: fix the cause and rerun to finalise"
            ) from exc
        finally:
            if self._lock_handle is not None:
                layout.unlock_store(self.path, self._lock_handle)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep the chunks already handed over, but never mask the original error
            self.close()
        except Exception as close_exc:  # noqa: BLE001
            log.error("while closing store %s after an error: %s", self.path, close_exc)

    # ------------------------------------------------------------------ internals
    def _prepare(self, index: int, data: ChunkData) -> tuple[ChunkData, int]:
        """Validate and convert ``data`` to the at-rest numpy dtypes (a private copy)."""
        start, stop = self.spec.chunk_bounds(index)
        n_rows = stop - start
        if isinstance(data, dict):
            data = ChunkData(**data)
        acts = _activations_at_rest(data.activations, self.spec.dtype)
        if acts.shape != (n_rows, self.spec.d_model):
            raise StoreError(
                f"chunk {index} activations have shape {tuple(acts.shape)}, expected "
                f"({n_rows}, {self.spec.d_model}) (tokens {start}..{stop} of the store)"
            )
        fields: dict[str, np.ndarray] = {"activations": acts}
        for name, dtype in TOKEN_ARRAYS.items():
            array = layout.as_numpy(getattr(data, name), dtype)
            if array.shape != (n_rows,):
                raise StoreError(
                    f"chunk {index} {name} has shape {tuple(array.shape)}, expected ({n_rows},)"
                )
            fields[name] = np.ascontiguousarray(array)
        return ChunkData(**fields), index

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            index, exc = self._error
            raise StoreError(
                f"writing chunk {index} of store {self.path} failed: {exc!r}. Chunks completed "
                "before it are kept; fix the cause (e.g. free disk space) and rerun the same "
                "command to resume"
            ) from exc

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                data, index, extra = item
                if self._error is None:  # after a failure, drop the rest (never half-written)
                    try:
                        self._write(index, data, extra)
                    except BaseException as exc:  # noqa: BLE001 - surfaced to the caller
                        log.debug("writer thread failed on chunk %d", index, exc_info=True)
                        self._error = (index, exc)
            finally:
                self._queue.task_done()

    def _open_arrays(self) -> dict[str, Any]:
        if self._arrays is None:
            import zarr

            # write_empty_chunks is an array-object setting, not stored metadata, taken from
            # zarr's config when an array is opened: without it an all-fill chunk (every
            # `masked` chunk at p = 0) would never reach disk
            with zarr.config.set({"array.write_empty_chunks": True}):
                group = zarr.open_group(store=str(self.path), mode="r+", zarr_format=3)
                self._arrays = {name: group[name] for name in ARRAY_NAMES}
        return self._arrays

    def _write(self, index: int, data: ChunkData, extra: dict[str, Any]) -> None:
        start, stop = self.spec.chunk_bounds(index)
        with self._lock:
            self._completed.discard(index)
        layout.manifest_path(self.path, index).unlink(missing_ok=True)
        for old in layout.chunk_files(self.path, index):
            # a rewrite starts from nothing: zarr merges a write into an existing shard, and
            # the shard of a chunk being rewritten may be truncated or garbage
            old.unlink(missing_ok=True)
        stats = chunk_stats(data.activations, data.excluded, self.spec.dtype)
        checksum = chunk_checksum(data)
        arrays = self._open_arrays()
        for name in ARRAY_NAMES:
            arrays[name][start:stop] = getattr(data, name)
        files = layout.chunk_files(self.path, index)
        layout.fsync_files(files)
        masked, excluded = data.masked, data.excluded
        record = {
            "index": index,
            "start": start,
            "stop": stop,
            "n_tokens": stop - start,
            "n_excluded": int(excluded.sum()),
            "n_masked": int(masked.sum()),
            "n_masked_excluded": int((masked & excluded).sum()),
            "checksum": checksum,
            "checksum_algorithm": "sha256[:32] over the raw bytes of " + ", ".join(ARRAY_NAMES),
            "stats": stats.to_dict(),
            # the reader compares these at open: a truncated or extended shard is refused
            # (and rewritten by a rerun harvest) before anything reads it
            "file_sizes": {f.relative_to(self.path).as_posix(): f.stat().st_size for f in files},
            **extra,
        }
        layout.write_manifest(self.path, index, record)
        with self._lock:
            self._completed.add(index)
        log.debug("store %s: chunk %d complete", self.path, index)

    def _finalise(self) -> None:
        records = _intact_records(self.path, self.spec, quiet=True)
        done = len(records)
        updates: dict[str, Any] = {"complete": done == self.n_chunks, "chunks_complete": done}
        if done == self.n_chunks:
            ordered = [records[i] for i in range(self.n_chunks)]
            stats = aggregate(
                [ChunkStats.from_dict(r["stats"]) for r in ordered], self.spec.d_model
            )
            updates["statistics"] = stats.to_dict()
            updates["fingerprint"] = layout.store_fingerprint(
                self.spec, [r["checksum"] for r in ordered]
            )
            log.info(
                "store %s complete: %d tokens, mean norm %.4g",
                self.path,
                self.spec.total_tokens,
                stats.mean_norm,
            )
        else:
            log.warning(
                "store %s closed with %d of %d chunks complete; rerun to resume",
                self.path,
                done,
                self.n_chunks,
            )
        layout.update_attrs(self.path, updates)


def _intact_records(path: Path, spec: StoreSpec, *, quiet: bool = False) -> dict[int, dict]:
    """Completion records of the chunks whose shard files are all present.

    A record whose files are missing (e.g. a store written by masksae 0.1.0, which skipped
    all-fill chunks) is treated as incomplete, so rerunning the harvest rewrites the chunk.
    """
    intact, broken = layout.split_intact(path, layout.read_manifests(path, spec))
    if not quiet:
        for index, reason in sorted(broken.items()):
            log.warning("store %s: chunk %d %s; rewriting it", path, index, reason)
    return intact


def _activations_at_rest(value: Any, dtype: str) -> np.ndarray:
    """Activations (numpy or torch, any float dtype) as the store's at-rest numpy array."""
    import torch

    target = STORE_DTYPES[dtype]
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if dtype == "bfloat16":
            if tensor.dtype == torch.int16 or tensor.dtype == torch.uint16:
                bits = tensor
            else:
                bits = tensor.to(torch.bfloat16).view(torch.int16)
            array = bits.cpu().numpy().view(np.uint16)
        else:
            array = tensor.to(getattr(torch, dtype)).cpu().numpy()
        return array.copy() if tensor.device.type == "cpu" else array  # .cpu() already copied
    array = np.asarray(value)
    if dtype == "bfloat16" and array.dtype != np.uint16:
        if array.dtype.kind != "f":
            raise StoreError(
                f"bfloat16 activations must be floats or uint16 bits, got {array.dtype}"
            )
        return (
            torch.from_numpy(np.ascontiguousarray(array))
            .to(torch.bfloat16)
            .view(torch.int16)
            .numpy()
            .view(np.uint16)
        )
    return array.astype(target, copy=True)
