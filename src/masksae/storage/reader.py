"""ActivationStore: open, inspect, randomly read and stream a store."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from masksae.errors import StoreError
from masksae.storage import layout
from masksae.storage.schema import ARRAY_NAMES, ChunkData, StoreSpec
from masksae.storage.stats import ActivationStats, ChunkStats, aggregate

log = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER_TOKENS = 1 << 17
"""Default in-memory shuffle buffer of :meth:`ActivationStore.stream` (tokens)."""
DEFAULT_PREFETCH = 2
"""Default number of chunks read ahead by the stream's background thread."""


class UnreadableChunkError(StoreError):
    """A shard of a chunk recorded complete cannot be decoded (truncated or overwritten)."""

    def __init__(self, store: ActivationStore, index: int, array: str, cause: BaseException):
        files = layout.chunk_files(store.path, index)
        file = next((f for f in files if f.relative_to(store.path).parts[0] == array), files[0])
        detail = (str(cause).strip().splitlines() or [""])[0][:120]
        self.index, self.array, self.file = index, array, file
        self.cause = f"{type(cause).__name__}: {detail}" if detail else type(cause).__name__
        super().__init__(
            f"chunk {index} of store {store.path} is unreadable: its {array} shard {file} "
            f"cannot be decoded ({self.cause}); delete its completion record "
            f"{layout.manifest_path(store.path, index)} and rerun the harvest command that "
            "created the store to rewrite that chunk (`masksae store verify` lists every "
            "damaged chunk)"
        )


class ActivationStore:
    """A read-only view of an activation store directory; use :meth:`open`."""

    def __init__(
        self,
        path: Path,
        attrs: dict[str, Any],
        records: dict[int, dict],
        broken: dict[int, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.attrs = attrs
        """The raw group attributes."""
        self.spec: StoreSpec = layout.spec_from_attrs(attrs)
        self._records = records
        self.broken: dict[int, str] = dict(broken or {})
        """Chunks whose record says complete but whose shard files are missing or resized, or
        whose record is damaged, with the reason; they count as incomplete."""
        self._arrays: dict[str, Any] | None = None
        self._plain_rows: int | bool | None = None  # inner rows of plain shards, False: none
        self.metadata_problems: list[str] = []
        """Array zarr.json files that disagree with the spec (see
        ``layout.array_metadata_problems``); reading data is refused while there are any."""

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> ActivationStore:
        """Open the store at ``path``.

        Raises StoreError if ``path`` is missing or not a store, or (with
        ``require_complete``) if some chunks are not complete yet.
        """
        path = Path(path)
        if not path.exists():
            raise StoreError(
                f"activation store {path} does not exist: check the path, or "
                "run `masksae harvest --out PATH` to create it"
            )
        attrs = layout.read_attrs(path)
        if attrs is None:
            raise StoreError(
                f"{path} is not a masksae activation store (no store attributes "
                "in zarr.json): check the path"
            )
        spec = layout.spec_from_attrs(attrs)
        metadata_problems = layout.array_metadata_problems(path, spec)
        if metadata_problems and require_complete:
            raise StoreError(
                f"activation store {path} cannot be read: {metadata_problems[0]}"
                + (
                    f" (and {len(metadata_problems) - 1} more)"
                    if len(metadata_problems) > 1
                    else ""
                )
                + "; restore the original zarr.json (from a copy of the store), or re-harvest "
                "into a new --out"
            )
        damaged: dict[int, str] = {}
        records, broken = layout.split_intact(path, layout.read_manifests(path, spec, damaged))
        store = cls(path, attrs, records, {**broken, **damaged})
        store.metadata_problems = metadata_problems
        if require_complete and not store.is_complete:
            missing = store.missing_chunks
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            damaged = "".join(
                f"; chunk {index}: {reason}" for index, reason in sorted(store.broken.items())[:3]
            )
            raise StoreError(
                f"activation store {path} is incomplete: {len(missing)} of {spec.n_chunks} "
                f"chunks missing ({shown}){damaged}; rerun the harvest command that created "
                "it to resume it (it rewrites exactly those chunks)"
            )
        return store

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
                group = zarr.open_group(store=str(self.path), mode="r", zarr_format=3)
                self._arrays = {name: group[name] for name in ARRAY_NAMES}
            except Exception as exc:  # noqa: BLE001 - any zarr failure means a broken store
                raise StoreError(f"cannot open the arrays of store {self.path}: {exc}") from exc
        return self._arrays

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

    def read_chunk(self, index: int, names: tuple[str, ...] = ARRAY_NAMES) -> dict[str, np.ndarray]:
        """The named arrays of chunk ``index`` (no completeness check).

        A shard that cannot be decoded (truncated, overwritten) raises
        :class:`UnreadableChunkError` naming the chunk, the file and the fix.
        """
        start, stop = self.chunk_bounds(index)
        arrays = self._open_arrays()
        out = {}
        for name in names:
            try:
                out[name] = np.asarray(arrays[name][start:stop])
            except Exception as exc:  # noqa: BLE001 - zarr/codec errors: damaged data
                raise UnreadableChunkError(self, index, name, exc) from exc
        return out

    def activation_views(self, index: int) -> list[np.ndarray] | None:
        """Zero-copy read-only views of chunk ``index``'s activations (inner chunks in
        order, at-rest dtype), or None when the codec is not ``"none"`` (read via zarr)."""
        from masksae.storage import fastread
        from masksae.storage.schema import STORE_DTYPES

        if self._plain_rows is False:
            return None
        if self._plain_rows is None:
            self._plain_rows = fastread.plain_shard_rows(self.path / "activations") or False
            if self._plain_rows is False:
                return None
        start, stop = self.chunk_bounds(index)
        inner = int(self._plain_rows)
        return fastread.shard_views(
            layout.chunk_files(self.path, index)[0],
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
            f"ActivationStore({str(self.path)!r}, n_tokens={self.n_tokens}, "
            f"d_model={self.d_model}, dtype={self.spec.dtype}, "
            f"chunks={len(self._records)}/{self.n_chunks})"
        )
