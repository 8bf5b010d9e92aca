"""ActivationStore: open, inspect, randomly read and stream a store.

A store is a local directory or an fsspec URL (see :mod:`masksae.storage.location`).
Opening one lists it once (records and shard files come from that listing). Chunk reads
of a remote store go through a bounded local chunk cache (:mod:`masksae.storage.cache`):
whole shard files, fetched ahead and checked against the recorded checksum.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from masksae.errors import StoreError
from masksae.storage import layout
from masksae.storage.cache import DEFAULT_CACHE_BYTES, DEFAULT_READ_AHEAD
from masksae.storage.location import StoreLocation
from masksae.storage.schema import ARRAY_NAMES, ChunkData, StoreSpec, chunk_checksum
from masksae.storage.stats import ActivationStats, ChunkStats, aggregate

log = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER_TOKENS = 1 << 17
"""Default in-memory shuffle buffer of :meth:`ActivationStore.stream` (tokens)."""
DEFAULT_PREFETCH = 2
"""Default number of chunks read ahead by the stream's background thread."""


class UnreadableChunkError(StoreError):
    """A shard of a chunk recorded complete cannot be decoded (truncated or overwritten)."""

    def __init__(self, store: ActivationStore, index: int, array: str, cause: BaseException):
        keys = layout.chunk_keys(index)
        key = next((k for k in keys if k.split("/", 1)[0] == array), keys[0])
        file = store.location.display(key)
        detail = (str(cause).strip().splitlines() or [""])[0][:120]
        self.index, self.array, self.file = index, array, file
        self.cause = f"{type(cause).__name__}: {detail}" if detail else type(cause).__name__
        super().__init__(
            f"chunk {index} of store {store.path} is unreadable: its {array} shard {file} "
            f"cannot be decoded ({self.cause}); delete its completion record "
            f"{store.location.display(layout.manifest_key(index))} and rerun the harvest "
            "command that created the store to rewrite that chunk (`masksae store verify` "
            "lists every damaged chunk)"
        )


class ActivationStore:
    """A read-only view of an activation store (local or remote).

    ``ActivationStore("store")`` (or ``ActivationStore.open("store", ...)``) opens the store
    at a path or URL; the other constructor arguments are the state :meth:`open` reads.
    """

    def __init__(
        self,
        path: str | Path | StoreLocation,
        attrs: dict[str, Any] | None = None,
        records: dict[int, dict] | None = None,
        broken: dict[int, str] | None = None,
        *,
        metadata: dict[str, bytes] | None = None,
        cache_dir: str | Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        read_ahead: int = DEFAULT_READ_AHEAD,
        require_complete: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if attrs is None:  # ActivationStore("path"): open it (require_complete as in open)
            opened = type(self).open(
                path,
                require_complete=require_complete,
                storage_options=storage_options,
                cache_dir=cache_dir,
                cache_bytes=cache_bytes,
                read_ahead=read_ahead,
            )
            self.__dict__.update(opened.__dict__)
            return
        self.location = StoreLocation.parse(path)
        """Where the store lives."""
        self.path: Path | str = self.location.local_path or self.location.url
        """The store directory (local stores) or its URL (remote ones)."""
        self.attrs = attrs
        """The raw group attributes."""
        self.spec: StoreSpec = layout.spec_from_attrs(attrs)
        self._records = records or {}
        self.broken: dict[int, str] = dict(broken or {})
        """Chunks whose record says complete but whose shard files are missing or resized, or
        whose record is damaged, with the reason; they count as incomplete."""
        self._arrays: dict[str, Any] | None = None
        self._plain_rows: int | bool | None = None  # inner rows of plain shards, False: none
        self.metadata_problems: list[str] = []
        """Array zarr.json files that disagree with the spec (see
        ``layout.array_metadata_problems``); reading data is refused while there are any."""
        self._metadata = metadata or {}
        self._cache_dir = cache_dir
        self._cache_bytes = int(cache_bytes)
        self._read_ahead = int(read_ahead)
        self._cache: Any = None
        self._cached_arrays: dict[str, Any] | None = None

    @classmethod
    def open(
        cls,
        path: str | Path | StoreLocation,
        *,
        require_complete: bool = True,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        read_ahead: int = DEFAULT_READ_AHEAD,
    ) -> ActivationStore:
        """Open the store at ``path`` (a directory or an fsspec URL such as
        ``s3://bucket/prefix``; ``storage_options`` go to its filesystem).

        Remote stores read chunks through a local cache in ``cache_dir`` (default
        ``$MASKSAE_CACHE/store-cache``) of at most ``cache_bytes``, fetching ``read_ahead``
        chunks ahead of the stream. Raises StoreError if ``path`` is missing or not a store,
        or (with ``require_complete``) if some chunks are not complete yet.
        """
        loc = StoreLocation.parse(path, storage_options)
        remote = loc.local_path is None
        if not remote and not loc.local_path.exists():
            raise StoreError(
                f"activation store {loc} does not exist: check the path, or "
                "run `masksae harvest --out PATH` to create it"
            )
        listing = loc.listing()
        if remote and not listing:
            raise StoreError(
                f"activation store {loc} does not exist (nothing under that prefix): check "
                "the URL and the credentials (AWS_* variables or --storage-option), or run "
                "`masksae harvest --out URL` to create it"
            )
        attrs = layout.read_attrs(loc)
        if attrs is None:
            raise StoreError(
                f"{loc} is not a masksae activation store (no store attributes "
                "in zarr.json): check the path"
            )
        spec = layout.spec_from_attrs(attrs)
        metadata_problems = layout.array_metadata_problems(loc, spec)
        if metadata_problems and require_complete:
            raise StoreError(
                f"activation store {loc} cannot be read: {metadata_problems[0]}"
                + (
                    f" (and {len(metadata_problems) - 1} more)"
                    if len(metadata_problems) > 1
                    else ""
                )
                + "; restore the original zarr.json (from a copy of the store), or re-harvest "
                "into a new --out"
            )
        damaged: dict[int, str] = {}
        records, broken = layout.split_intact(
            loc.local_path or loc, layout.read_manifests(loc, spec, damaged, listing), listing
        )
        broken = {**broken, **damaged}
        metadata = None
        if remote:
            from masksae.storage.chunkio import metadata_keys

            metadata = loc.read_many(metadata_keys())
        store = cls(
            loc,
            attrs,
            records,
            broken,
            metadata=metadata,
            cache_dir=cache_dir,
            cache_bytes=cache_bytes,
            read_ahead=read_ahead,
        )
        store.metadata_problems = metadata_problems
        if require_complete and not store.is_complete:
            missing = store.missing_chunks
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            damaged = "".join(
                f"; chunk {index}: {reason}" for index, reason in sorted(broken.items())[:3]
            )
            raise StoreError(
                f"activation store {loc} is incomplete: {len(missing)} of {spec.n_chunks} "
                f"chunks missing ({shown}){damaged}; rerun the harvest command that created "
                "it to resume it (it rewrites exactly those chunks)"
            )
        return store

    @property
    def is_remote(self) -> bool:
        """True for stores on object storage (read through the chunk cache)."""
        return self.location.local_path is None

    # ------------------------------------------------------------------ properties
    @property
    def provenance(self) -> dict:
        """How the activations were made (verbatim from the harvest)."""
        return self.spec.provenance

    @property
    def d_model(self) -> int:
        """Width of each activation vector."""
        return self.spec.d_model

    @property
    def n_tokens(self) -> int:
        """Tokens in the (finished) store, excluded ones included."""
        return self.spec.total_tokens

    @property
    def n_chunks(self) -> int:
        """Number of chunks."""
        return self.spec.n_chunks

    @property
    def dtype(self):
        """At-rest activation dtype as a torch dtype."""
        import torch

        return getattr(torch, self.spec.dtype)

    @property
    def completed_chunks(self) -> frozenset[int]:
        """Chunks with a completion record."""
        return frozenset(self._records)

    @property
    def missing_chunks(self) -> list[int]:
        """Chunks without a completion record, in order."""
        return [i for i in range(self.n_chunks) if i not in self._records]

    @property
    def is_complete(self) -> bool:
        """True when every chunk has a completion record."""
        return len(self._records) == self.n_chunks

    @property
    def records(self) -> dict[int, dict]:
        """Completion records by chunk index (checksum, counts, partial statistics)."""
        return dict(self._records)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the spec (with provenance) and every chunk checksum."""
        checksums = [
            self._records[i]["checksum"] if i in self._records else "missing"
            for i in range(self.n_chunks)
        ]
        return layout.store_fingerprint(self.spec, checksums)

    @cached_property
    def stats(self) -> ActivationStats:
        """Statistics over non-excluded tokens (of the complete chunks, in chunk order)."""
        parts = [
            ChunkStats.from_dict(self._records[i]["stats"])
            for i in range(self.n_chunks)
            if i in self._records
        ]
        return aggregate(parts, self.d_model)

    def norm_scale(self) -> float:
        """The scale s with E||s x||^2 = d_model: sqrt(d_model / mean squared norm)."""
        return self.stats.norm_scale()

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """Token range [start, stop) of chunk ``index``."""
        return self.spec.chunk_bounds(index)

    def count_tokens(
        self,
        *,
        include_masked: bool = True,
        include_excluded: bool = False,
        chunk_range: tuple[int, int] | None = None,
    ) -> int:
        """Tokens a stream with these options would draw from (per epoch, before dropping
        the last partial batch), over the complete chunks in ``chunk_range``."""
        first, last = self._check_chunk_range(chunk_range)
        total = 0
        for i in range(first, last):
            record = self._records.get(i)
            if record is None:
                continue
            n = record["n_tokens"]
            if not include_excluded:
                n -= record["n_excluded"]
                if not include_masked:
                    n -= record["n_masked"] - record["n_masked_excluded"]
            elif not include_masked:
                n -= record["n_masked"]
            total += n
        return total

    # ------------------------------------------------------------------ reading
    def _open_arrays(self) -> dict[str, Any]:
        if self.metadata_problems:
            raise StoreError(
                f"activation store {self.path} cannot be read: {self.metadata_problems[0]}; "
                "restore the original zarr.json (from a copy of the store), or re-harvest"
            )
        if self._arrays is None:
            import zarr

            try:
                group = zarr.open_group(
                    store=self.location.zarr_store(read_only=True), mode="r", zarr_format=3
                )
                self._arrays = {name: group[name] for name in ARRAY_NAMES}
            except Exception as exc:  # noqa: BLE001 - any zarr failure means a broken store
                raise StoreError(f"cannot open the arrays of store {self.path}: {exc}") from exc
        return self._arrays

    def chunk_cache(self) -> Any:
        """The local chunk cache of a remote store (created on first use), else None."""
        if not self.is_remote:
            return None
        if self._cache is None:
            from masksae.storage.cache import ChunkCache

            checksums = {i: r["checksum"] for i, r in self._records.items()}
            self._cache = ChunkCache(
                self.location,
                self._metadata,
                checksums,
                self._fetch_verified,
                cache_dir=self._cache_dir,
                max_bytes=self._cache_bytes,
                workers=max(1, self._read_ahead),
            )
        return self._cache

    def read_ahead(self, indices: list[int]) -> None:
        """Hint that chunks ``indices`` are read next (remote stores fetch them now)."""
        if self.is_remote and self._read_ahead > 0:
            self.chunk_cache().read_ahead(list(indices)[: self._read_ahead])

    def fetch_chunk_files(self, index: int, keys: list[str] | None = None) -> dict[str, bytes]:
        """The raw bytes of chunk ``index``'s files (all of them by default) read from the
        store itself (never the cache); StoreError naming any file that is missing."""
        from masksae.storage.layout import chunk_keys

        keys = chunk_keys(index) if keys is None else keys
        files = self.location.read_many(keys)
        lost = [key for key in keys if key not in files]
        if lost:
            raise StoreError(
                f"chunk {index} of store {self.path}: cannot read {', '.join(lost)} (missing "
                f"or unreachable); run `masksae store verify {self.path}`"
            )
        return files

    def decode_chunk_files(
        self, index: int, files: dict[str, bytes], names: tuple[str, ...] = ARRAY_NAMES
    ) -> dict[str, np.ndarray]:
        """Arrays ``names`` of chunk ``index`` decoded from the raw bytes of its files."""
        from masksae.storage.chunkio import decode_chunk, metadata_keys

        if self.metadata_problems:
            self._open_arrays()  # raises the problem
        if not self._metadata:
            self._metadata = self.location.read_many(metadata_keys())
        start, stop = self.chunk_bounds(index)
        out = {}
        for name in names:  # one array at a time: a damaged shard is named
            try:
                out.update(decode_chunk(self._metadata, index, stop - start, start, files, (name,)))
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - zarr/codec errors: damaged data
                raise UnreadableChunkError(self, index, name, exc) from exc
        return out

    def _fetch_verified(self, index: int) -> dict[str, bytes]:
        """Chunk ``index``'s files from the store, checked against its recorded checksum."""
        files = self.fetch_chunk_files(index)
        data = ChunkData(**self.decode_chunk_files(index, files))
        record = self._records.get(index)
        if record is not None and chunk_checksum(data) != record["checksum"]:
            raise StoreError(
                f"chunk {index} of store {self.path} does not match its recorded checksum "
                f"after download: the stored data is corrupted; run `masksae store verify "
                f"{self.path}` and rerun the harvest to rewrite it"
            )
        return files

    def read(self, start: int, stop: int) -> ChunkData:
        """Every array for tokens [start, stop) (may span chunks), at-rest dtypes.

        bfloat16 activations come back as uint16 bits; use
        ``ChunkData.activations_torch("bfloat16")`` for a torch bf16 tensor.
        """
        if not 0 <= start <= stop <= self.n_tokens:
            raise StoreError(
                f"token range [{start}, {stop}) is outside this store's [0, {self.n_tokens})"
            )
        if stop > start:
            first, last = start // self.spec.chunk_tokens, (stop - 1) // self.spec.chunk_tokens
            missing = [i for i in range(first, last + 1) if i not in self._records]
            if missing:
                raise StoreError(
                    f"token range [{start}, {stop}) touches incomplete chunks "
                    f"{missing} of store {self.path}: rerun the harvest to finish it"
                )
        return self._read_range(start, stop, ARRAY_NAMES)

    def read_chunk(
        self, index: int, names: tuple[str, ...] = ARRAY_NAMES, *, fresh: bool = False
    ) -> dict[str, np.ndarray]:
        """The named arrays of chunk ``index`` (no completeness check).

        Remote stores read through the chunk cache, or with ``fresh`` straight from the
        store (what ``verify`` checks). A shard that cannot be decoded (truncated,
        overwritten) raises :class:`UnreadableChunkError` naming the chunk, the file and the
        fix.
        """
        start, stop = self.chunk_bounds(index)
        if self.is_remote:
            from masksae.storage.chunkio import array_keys

            if fresh:
                keys = [array_keys(index)[name] for name in names]
                return self.decode_chunk_files(index, self.fetch_chunk_files(index, keys), names)
            return self._read_cached(index, names)
        arrays = self._open_arrays()
        out = {}
        for name in names:
            try:
                out[name] = np.asarray(arrays[name][start:stop])
            except Exception as exc:  # noqa: BLE001 - zarr/codec errors: damaged data
                raise UnreadableChunkError(self, index, name, exc) from exc
        return out

    def _read_cached(self, index: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Chunk ``index`` of a remote store read from the chunk cache, a local zarr store
        mirroring the layout (opened once). zarr reads an absent file as fill values, so the
        chunk is held from eviction during the read and checked to be still whole after it
        (another process sharing the cache folder may evict it); if it is not, it is read
        again from fetched bytes."""
        import zarr

        cache = self.chunk_cache()
        start, stop = self.chunk_bounds(index)
        with cache.reading(index) as root:
            if self._cached_arrays is None:
                group = zarr.open_group(store=str(root), mode="r", zarr_format=3)
                self._cached_arrays = {name: group[name] for name in ARRAY_NAMES}
            out = {}
            for name in names:
                try:
                    out[name] = np.asarray(self._cached_arrays[name][start:stop])
                except Exception as exc:  # noqa: BLE001 - zarr/codec errors: damaged data
                    raise UnreadableChunkError(self, index, name, exc) from exc
            if cache.is_cached(index):
                return out
        from masksae.storage.chunkio import array_keys

        keys = [array_keys(index)[name] for name in names]
        return self.decode_chunk_files(index, cache.read_files(index, keys), names)

    def _plain_shard_rows(self) -> int | bool:
        """Inner rows per chunk of the activations' plain uncompressed shards, or False."""
        from masksae.storage import fastread

        if self._plain_rows is None:
            where: Any = (
                self._metadata.get("activations/zarr.json", b"")
                if self.is_remote
                else self.location.local_path / "activations"
            )
            self._plain_rows = fastread.plain_shard_rows(where) or False
        return self._plain_rows

    def memory_mapped_reads(self) -> bool:
        """True when chunks are read as memory-mapped views of files that no one else
        deletes: a local store with uncompressed shards (remote stores map files of the
        bounded chunk cache, which evicts them)."""
        return not self.is_remote and bool(self._plain_shard_rows())

    def activation_views(self, index: int) -> list[np.ndarray] | None:
        """Zero-copy read-only views of chunk ``index``'s activations (inner chunks in
        order, at-rest dtype), or None when the codec is not ``"none"`` (read via zarr)."""
        from masksae.storage import fastread
        from masksae.storage.schema import STORE_DTYPES

        if not self._plain_shard_rows():
            return None
        start, stop = self.chunk_bounds(index)
        inner = int(self._plain_rows)
        key = layout.chunk_keys(index)[0]
        if self.is_remote:
            file = self.chunk_cache().local_file(index, key)
        else:
            file = self.location.local_path / key
        return fastread.shard_views(
            file,
            stop - start,
            self.d_model,
            np.dtype(STORE_DTYPES[self.spec.dtype]),
            inner,
            -(-self.spec.chunk_tokens // inner),
        )

    def _read_range(self, start: int, stop: int, names: tuple[str, ...]) -> ChunkData:
        arrays = self._open_arrays()
        try:
            return ChunkData(**{name: np.asarray(arrays[name][start:stop]) for name in names})
        except Exception:  # noqa: BLE001 - find and name the damaged chunk
            if stop > start:
                step = self.spec.chunk_tokens
                for index in range(start // step, (stop - 1) // step + 1):
                    self.read_chunk(index, names)  # raises UnreadableChunkError
            raise

    def stream(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        include_masked: bool = True,
        include_excluded: bool = False,
        shuffle_buffer_tokens: int = DEFAULT_SHUFFLE_BUFFER_TOKENS,
        prefetch: int = DEFAULT_PREFETCH,
        dtype: Any = "float32",
        device: Any = "cpu",
        skip_batches: int = 0,
        chunk_range: tuple[int, int] | None = None,
        epochs: int = 1,
    ) -> Iterator[Any]:
        """Shuffled batches [batch_size, D] of activations, deterministic given ``seed``.

        Each epoch visits the chunks of ``chunk_range`` (default all) in a seeded random
        order, read whole by a background thread (``prefetch`` chunks ahead), drops excluded
        tokens (unless ``include_excluded``) and masked ones (if not ``include_masked``), and
        mixes tokens through an in-memory buffer of ``shuffle_buffer_tokens`` tokens (at
        least 2 * batch_size). Every kept token appears exactly once per epoch, except the
        last partial batch of each epoch, which is dropped. ``skip_batches`` skips the first
        batches without materialising them: the following batches are exactly those of an
        uninterrupted stream.
        """
        from masksae.storage.stream import stream_batches

        return stream_batches(
            self,
            batch_size,
            seed=seed,
            include_masked=include_masked,
            include_excluded=include_excluded,
            shuffle_buffer_tokens=shuffle_buffer_tokens,
            prefetch=prefetch,
            dtype=dtype,
            device=device,
            skip_batches=skip_batches,
            chunk_range=chunk_range,
            epochs=epochs,
        )

    def batches_per_epoch(
        self,
        batch_size: int,
        *,
        include_masked: bool = True,
        include_excluded: bool = False,
        chunk_range: tuple[int, int] | None = None,
    ) -> int:
        """Batches one epoch of :meth:`stream` yields with these options."""
        return (
            self.count_tokens(
                include_masked=include_masked,
                include_excluded=include_excluded,
                chunk_range=chunk_range,
            )
            // batch_size
        )

    def verify(self) -> list[str]:
        """Problems found (missing chunks, unreadable data, checksum mismatches); [] if good."""
        from masksae.storage.verify import verify_store

        return verify_store(self)

    def _check_chunk_range(self, chunk_range: tuple[int, int] | None) -> tuple[int, int]:
        if chunk_range is None:
            return 0, self.n_chunks
        first, last = int(chunk_range[0]), int(chunk_range[1])
        if not 0 <= first < last <= self.n_chunks:
            raise StoreError(
                f"chunk_range {chunk_range!r} is invalid: expected (first, last) "
                f"with 0 <= first < last <= {self.n_chunks}"
            )
        return first, last

    def __repr__(self) -> str:
        return (
            f"ActivationStore({self.location.display()!r}, n_tokens={self.n_tokens}, "
            f"d_model={self.d_model}, dtype={self.spec.dtype}, "
            f"chunks={len(self._records)}/{self.n_chunks})"
        )
