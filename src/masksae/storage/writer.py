"""StoreWriter: create or resume a store and write chunks on a background thread.

A chunk is complete only once (1) its data files are written and fsynced and (2) its
completion record ``_chunks/<index>.json`` (checksum + partial statistics) is atomically
written. Any failure in between (crash, SIGKILL, full disk) leaves no record, so the chunk
reads as incomplete and a resumed writer rewrites it.

On an object store (``s3://...``) each file is one object written by one PUT, which is
atomic; the record's PUT starts only after every data PUT of its chunk has succeeded, so
the same rule holds without renames (see :mod:`masksae.storage.location`).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from masksae.errors import ProvenanceMismatchError, StoreError
from masksae.storage import direct_io, fastread, layout
from masksae.storage import lock as store_lock
from masksae.storage.location import StoreLocation
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
        location: StoreLocation | Path,
        spec: StoreSpec,
        completed: set[int],
        queue_size: int,
        *,
        writer_lock: store_lock.WriterLock | None = None,
        worker: bool = False,
    ) -> None:
        self.location = StoreLocation.parse(location)
        """Where the store lives (a local directory or an object-store URL)."""
        self.path: Path | str = self.location.local_path or self.location.url
        """The store directory (local stores) or its URL."""
        # the layout helpers take a Path for local stores, the location otherwise
        self._target: Path | StoreLocation = self.location.local_path or self.location
        self.spec = spec
        self._completed = set(completed)
        # data files of incomplete chunks found at open (torn by a killed writer): removed
        # before their chunk is rewritten, since zarr would read a torn shard back in
        self._stale = _stale_files(self.location, self._completed, spec)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: tuple[int, BaseException] | None = None
        self._closed = False
        self._arrays: dict[str, Any] | None = None
        self._worker = worker  # chunk writer under another's lock: no lock, no finalising
        # at-rest activation buffers handed back after each chunk's write: a harvest then
        # copies into memory it already touched instead of faulting in a fresh chunk-sized
        # allocation per chunk (tens of MB; the kernel zeroes every page of a fresh one)
        self._spare_buffers: list[np.ndarray] = []
        self._plain_rows: int | None = None  # see _plain_inner_rows
        self._max_spare = max(1, queue_size) + 1
        # the checksum and statistics run on this helper while the writer thread writes
        # the files (both only read the chunk; hashlib, numpy and file I/O release the GIL)
        self._summary_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"masksae-store-summary:{self.location.name}"
        )
        self.writer_lock = writer_lock
        """The writer lock held by this writer (None for workers attached under another's)."""
        self._thread = threading.Thread(
            target=self._run, name=f"masksae-store-writer:{self.location.name}", daemon=True
        )
        self._thread.start()

    @property
    def lock_owner(self) -> str | None:
        """Owner token of the writer lock this writer holds (workers attach with it)."""
        return None if self.writer_lock is None else self.writer_lock.owner

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | Path | StoreLocation,
        spec: StoreSpec,
        *,
        queue_size: int = 2,
        storage_options: dict[str, Any] | None = None,
        break_lock: bool = False,
        lease_s: float = store_lock.DEFAULT_LEASE_S,
    ) -> StoreWriter:
        """Create a store at ``path``, or resume the store there if it has the same spec.

        ``path`` is a local directory or an fsspec URL (``s3://bucket/prefix``, ...;
        ``storage_options`` go to its filesystem). ``queue_size`` chunks may wait for the
        writer thread before ``write_chunk`` blocks. The store's writer lock is taken first
        (``break_lock`` removes a remote lease left by a dead writer; ``lease_s`` is the
        lifetime of a remote lease). Raises ProvenanceMismatchError (naming every differing
        key) if ``path`` holds a store made with a different spec or provenance, and
        StoreError if it is a file or a non-empty directory that is not a store.
        """
        loc = StoreLocation.parse(path, storage_options)
        if loc.local_path is not None:
            return cls._open_local(loc, spec, queue_size, break_lock)
        writer_lock = store_lock.acquire(loc, break_lock=break_lock, lease_s=lease_s)
        try:
            listing = loc.listing()
            if layout.read_attrs(loc) is None:
                _refuse_foreign_objects(loc, listing)
                try:
                    layout.create_remote_store(loc, spec)
                except OSError as exc:
                    raise StoreError(
                        f"cannot create the activation store {loc}: {exc}; check the URL, "
                        "the credentials (AWS_* variables or --storage-option) and the bucket"
                    ) from exc
                return cls(loc, spec, set(), queue_size, writer_lock=writer_lock)
            existing = _check_resumable(loc, spec)
            completed = set(_intact_records(loc, existing, listing=listing))
        except BaseException:
            writer_lock.release()
            raise
        log.info(
            "resuming store %s: %d of %d chunks already complete",
            loc,
            len(completed),
            spec.n_chunks,
        )
        return cls(loc, spec, completed, queue_size, writer_lock=writer_lock)

    @classmethod
    def _open_local(
        cls, loc: StoreLocation, spec: StoreSpec, queue_size: int, break_lock: bool
    ) -> StoreWriter:
        path = loc.local_path
        assert path is not None
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
                writer_lock = store_lock.acquire(loc, break_lock=break_lock)
                return cls(loc, spec, set(), queue_size, writer_lock=writer_lock)
        _check_resumable(loc, spec)
        writer_lock = store_lock.acquire(loc, break_lock=break_lock)
        try:
            completed = set(_intact_records(path, spec))
        except BaseException:
            writer_lock.release()
            raise
        log.info(
            "resuming store %s: %d of %d chunks already complete",
            path,
            len(completed),
            spec.n_chunks,
        )
        return cls(loc, spec, completed, queue_size, writer_lock=writer_lock)

    @classmethod
    def attach(
        cls,
        path: str | Path | StoreLocation,
        spec: StoreSpec,
        *,
        owner: str,
        queue_size: int = 2,
        storage_options: dict[str, Any] | None = None,
    ) -> StoreWriter:
        """A chunk writer for a rank of a distributed harvest other than the owner.

        The store must already exist with exactly ``spec`` and its writer lock must be held
        by ``owner`` (the owner token of rank 0's writer, :attr:`lock_owner`, which created
        or resumed it with :meth:`open` and finalises it). The returned writer takes no lock
        and does not finalise on close: it only writes chunks and their completion records.
        Ranks must write disjoint chunks (each chunk is its own set of files, so that is
        safe).
        """
        loc = StoreLocation.parse(path, storage_options)
        attrs = layout.read_attrs(loc)
        if attrs is None:
            raise StoreError(
                f"cannot attach to {loc}: not an activation store (rank 0 creates it first)"
            )
        diffs = spec_differences(layout.spec_from_attrs(attrs), spec)
        if diffs:
            keys = ", ".join(key for key, _old, _new in diffs)
            raise ProvenanceMismatchError(
                f"this rank's settings differ from store {loc} on: {keys}; every rank must "
                "run the exact same harvest command"
            )
        holder = store_lock.holder(loc)
        if holder != owner:
            raise StoreError(
                f"cannot attach to {loc}: its writer lock is held by {holder or 'nobody'}, "
                f"not by rank 0's writer {owner}; start distributed harvests with torchrun, "
                "accelerate launch or `masksae harvest --devices`, and let one harvest write "
                "a store at a time"
            )
        completed = set(_intact_records(loc.local_path or loc, spec, quiet=True))
        return cls(loc, spec, completed, queue_size, worker=True)

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
        if self.writer_lock is not None:
            self.writer_lock.check()
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

    def write_raw_chunk(
        self, index: int, files: dict[str, bytes], record: dict[str, Any], *, verify: bool = True
    ) -> None:
        """Write chunk ``index`` from the raw bytes of its files and its completion record
        (``masksae store copy``), synchronously: the record goes last, as for
        :meth:`write_chunk`. The caller has checked ``files`` against ``record``; with
        ``verify`` the files are read back and compared byte for byte before the record is
        written (verified on arrival)."""
        from masksae.storage.location import StoreLocation

        self._raise_pending_error()
        if self.writer_lock is not None:
            self.writer_lock.check()
        expected = set(layout.chunk_keys(index))
        if set(files) != expected:
            raise StoreError(
                f"chunk {index}: raw files {sorted(files)} are not the chunk's files "
                f"{sorted(expected)}"
            )
        loc = StoreLocation.parse(self.location)
        with self._lock:
            self._completed.discard(index)
        layout.delete_manifest(self._target, index)
        for key, data in files.items():
            loc.write_bytes(key, data)
        if verify:
            arrived = loc.read_many(list(files))
            bad = [key for key, data in files.items() if arrived.get(key) != data]
            if bad:
                raise StoreError(
                    f"chunk {index} did not arrive intact at {loc} ({', '.join(bad)} differ "
                    "from what was sent): rerun the copy to retry it"
                )
        layout.write_manifest(self._target, index, record)
        with self._lock:
            self._completed.add(index)

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
        self._summary_pool.shutdown()
        try:
            self._raise_pending_error()
            if not self._worker:
                if self.writer_lock is not None:
                    self.writer_lock.check()
                self._finalise()
        except OSError as exc:
            raise StoreError(
                f"cannot write the final attributes of store {self.path}: {exc}; "
                "the chunks are complete: fix the cause and rerun to finalise"
            ) from exc
        finally:
            if self.writer_lock is not None:
                self.writer_lock.release()

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
        shape = tuple(getattr(data.activations, "shape", np.shape(data.activations)))
        if shape != (n_rows, self.spec.d_model):
            raise StoreError(
                f"chunk {index} activations have shape {shape}, expected "
                f"({n_rows}, {self.spec.d_model}) (tokens {start}..{stop} of the store)"
            )
        acts = _activations_at_rest(data.activations, self.spec.dtype, self._buffer(n_rows))
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
                self._recycle(data.activations)
            finally:
                self._queue.task_done()

    def _plain_inner_rows(self) -> int | None:
        """Rows per inner chunk when the activations are plain shards of a local store
        (written by :func:`fastread.write_plain_shard`), else None (zarr writes them)."""
        if self._plain_rows is None:
            local = self.location.local_path
            self._plain_rows = (local and fastread.plain_shard_rows(local / "activations")) or 0
        return self._plain_rows or None

    def _buffer(self, n_rows: int) -> np.ndarray:
        """An at-rest activation buffer for ``n_rows`` rows: a spare one if any."""
        with self._lock:
            spare = self._spare_buffers.pop() if self._spare_buffers else None
        if spare is None:
            dtype = STORE_DTYPES[self.spec.dtype]
            # page-aligned: a full chunk's shard can then be written around the page cache
            spare = direct_io.aligned_empty((self.spec.chunk_tokens, self.spec.d_model), dtype)
        return spare[:n_rows]

    def _recycle(self, acts: np.ndarray) -> None:
        """Hand a written chunk's activation buffer back for a later chunk."""
        whole = acts.base if isinstance(acts.base, np.ndarray) else acts
        if whole.shape != (self.spec.chunk_tokens, self.spec.d_model):
            return
        with self._lock:
            if len(self._spare_buffers) < self._max_spare:
                self._spare_buffers.append(whole)

    def _open_arrays(self) -> dict[str, Any]:
        if self._arrays is None:
            import zarr

            # write_empty_chunks is an array-object setting, not stored metadata, taken from
            # zarr's config when an array is opened: without it an all-fill chunk (every
            # `masked` chunk at p = 0) would never reach disk
            with zarr.config.set({"array.write_empty_chunks": True}):
                group = zarr.open_group(
                    store=self.location.zarr_store(read_only=False), mode="r+", zarr_format=3
                )
                self._arrays = {name: group[name] for name in ARRAY_NAMES}
        return self._arrays

    def _write(self, index: int, data: ChunkData, extra: dict[str, Any]) -> None:
        start, stop = self.spec.chunk_bounds(index)
        with self._lock:
            self._completed.discard(index)
        layout.delete_manifest(self._target, index)
        # a rewrite starts from nothing: zarr merges a write into an existing shard, and the
        # shard of a chunk being rewritten may be truncated or garbage
        if self.location.local_path is not None:
            for old in layout.chunk_files(self.location.local_path, index):
                old.unlink(missing_ok=True)
        else:  # only the objects found at open: no DELETE request for absent ones
            for key in layout.chunk_keys(index):
                if key in self._stale:
                    self.location.delete(key)
                    self._stale.discard(key)
        summary = self._summary_pool.submit(_summarise, data, self.spec.dtype)
        try:
            arrays = self._open_arrays()
            names = ARRAY_NAMES
            local = self.location.local_path
            inner_rows = self._plain_inner_rows()
            if local is not None and inner_rows and stop - start == self.spec.chunk_tokens:
                # a full plain shard: the rows and zarr's index, without zarr's encode copies
                activations_file = layout.chunk_files(local, index)[0]  # ARRAY_NAMES order
                fastread.write_plain_shard(activations_file, data.activations, inner_rows)
                names = ARRAY_NAMES[1:]
            for name in names:
                arrays[name][start:stop] = getattr(data, name)
            if local is not None:  # object PUTs are durable once they return
                layout.fsync_files(layout.chunk_files(local, index))
        except BaseException:
            wait([summary])  # never leave it reading a buffer about to be recycled
            raise
        stats, checksum = summary.result()
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
            "file_sizes": self.location.sizes(layout.chunk_keys(index)),
            **extra,
        }
        layout.write_manifest(self._target, index, record)
        with self._lock:
            self._completed.add(index)
        log.debug("store %s: chunk %d complete", self.path, index)

    def _finalise(self) -> None:
        records = _intact_records(self._target, self.spec, quiet=True)
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
        layout.update_attrs(self._target, updates)


def _stale_files(loc: StoreLocation, completed: set[int], spec: StoreSpec) -> set[str]:
    """Data files present for chunks that are not complete (one listing; remote stores only:
    a local writer simply unlinks a chunk's files before rewriting it)."""
    if loc.local_path is not None:
        return set()
    listing = loc.listing()
    stale: set[str] = set()
    for index in range(spec.n_chunks):
        if index not in completed:
            stale.update(key for key in layout.chunk_keys(index) if key in listing)
    return stale


def existing_chunks(
    path: str | Path | StoreLocation,
    spec: StoreSpec,
    *,
    storage_options: dict[str, Any] | None = None,
) -> set[int] | None:
    """Read-only look at ``path`` before any expensive work: None when no store is there
    yet (absent or empty), else the chunks already complete of a store ``spec`` may resume.

    Raises what :meth:`StoreWriter.open` would (ProvenanceMismatchError naming every
    differing key, StoreError for a file or a foreign directory), without taking the lock
    or creating anything.
    """
    loc = StoreLocation.parse(path, storage_options)
    if loc.local_path is not None:
        local = loc.local_path
        if local.exists() and not local.is_dir():
            raise StoreError(
                f"output path {local} is a file, not a store directory: choose another --out"
            )
        if not local.exists() or not any(local.iterdir()):
            return None
        _check_resumable(loc, spec)
        return set(_intact_records(local, spec, quiet=True))
    listing = loc.listing()
    if layout.read_attrs(loc) is None:
        _refuse_foreign_objects(loc, listing)
        return None
    _check_resumable(loc, spec)
    return set(_intact_records(loc, spec, quiet=True, listing=listing))


def _refuse_foreign_objects(loc: StoreLocation, listing: Any) -> None:
    """A prefix without store metadata may hold only the writer lock or a store whose creation
    was interrupted; anything else is someone else's data."""
    if set(listing) - {store_lock.LOCK_FILE} and not layout.is_half_created(listing):
        raise StoreError(
            f"output location {loc} holds objects but no activation store: "
            "choose another --out (an empty prefix)"
        )


def _check_resumable(loc: StoreLocation, spec: StoreSpec) -> StoreSpec:
    """The spec of the store at ``loc`` if ``spec`` may resume it; StoreError otherwise."""
    attrs = layout.read_attrs(loc)
    if attrs is None:
        raise StoreError(
            f"output path {loc} is a non-empty directory that is not an activation "
            "store: choose another --out (an absent or empty directory)"
        )
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"store {loc} has format version {attrs.get('format_version')!r}, this "
            f"masksae writes version {FORMAT_VERSION}: choose another --out or delete it"
        )
    existing = layout.spec_from_attrs(attrs)
    diffs = spec_differences(existing, spec)
    if diffs:
        lines = "\n".join(
            f"  {key}: store has {old!r}, requested {new!r}" for key, old, new in diffs
        )
        raise ProvenanceMismatchError(
            f"output path {loc} holds a store made with different settings:\n{lines}\n"
            "choose another --out, or delete the old store to rebuild it"
        )
    return existing


def _intact_records(
    target: Path | StoreLocation,
    spec: StoreSpec,
    *,
    quiet: bool = False,
    listing: dict[str, int] | None = None,
) -> dict[int, dict]:
    """Completion records of the chunks whose shard files are all present.

    A record whose files are missing (e.g. a store written by masksae 0.1.0, which skipped
    all-fill chunks) is treated as incomplete, so rerunning the harvest rewrites the chunk.
    One listing of the store serves both the records and the shard files.
    """
    if listing is None:
        listing = StoreLocation.parse(target).listing()
    records = layout.read_manifests(target, spec, listing)
    intact, broken = layout.split_intact(target, records, listing)
    if not quiet:
        for index, reason in sorted(broken.items()):
            log.warning("store %s: chunk %d %s; rewriting it", target, index, reason)
    return intact


def _summarise(data: ChunkData, dtype: str) -> tuple[ChunkStats, str]:
    """A chunk's partial statistics and checksum (run beside the file writes)."""
    return chunk_stats(data.activations, data.excluded, dtype), chunk_checksum(data)


def _activations_at_rest(value: Any, dtype: str, out: np.ndarray) -> np.ndarray:
    """Copy activations (numpy or torch on any device, any float dtype; for bfloat16 also
    the raw bits as int16/uint16) into ``out``, an at-rest numpy array of their shape, in one
    pass (conversion and device transfer included); returns ``out``."""
    import torch

    if dtype == "bfloat16":
        # the bits as int16, so torch can convert into them (round to nearest even)
        bits = torch.from_numpy(out.view(np.int16))
        if isinstance(value, torch.Tensor):
            source = value.detach()
            if source.dtype in (torch.int16, torch.uint16):
                bits.copy_(source.view(torch.int16))
            else:
                bits.view(torch.bfloat16).copy_(source)
            return out
        array = np.asarray(value)
        if array.dtype == np.uint16 or array.dtype == np.int16:
            np.copyto(out, array, casting="unsafe")
        elif array.dtype.kind != "f":
            raise StoreError(
                f"bfloat16 activations must be floats or uint16 bits, got {array.dtype}"
            )
        else:
            bits.view(torch.bfloat16).copy_(torch.from_numpy(np.ascontiguousarray(array)))
        return out
    if isinstance(value, torch.Tensor):
        torch.from_numpy(out).copy_(value.detach())
    else:
        np.copyto(out, np.asarray(value), casting="unsafe")
    return out
