"""The shuffled, prefetching batch stream of an ActivationStore.

Per epoch: a seeded permutation of the chunks; a background thread reads whole chunks in
that order (zero-copy mmap views for uncompressed shards, zarr otherwise) and marks the
tokens to keep; the main thread mixes tokens through a slot buffer: it draws a random half
of the buffer's slots as batches, then refills exactly those slots, in random order, with
the next incoming tokens. Because tokens land in random slots, a batch can be gathered in
ascending slot order (memory locality) and still be in random token order. For a local
store with uncompressed shards a slot holds a reference (mapped chunk, row), and each token
is copied once, from the page cache into its batch (:class:`_RowReferences`); otherwise
the slot holds a copy of the row (:class:`_CopiedRows`), copied in and later out. Both give
the same batches. All randomness comes from generators
seeded by (seed, epoch), so the stream is a pure function of its arguments and
``skip_batches`` replays it without materialising the skipped batches.

Data movement uses numpy on rows viewed as wide machine words (single-threaded, vectorised
copies that do not suffer from OpenMP barriers on a busy machine); only the final dtype
conversion and device transfer of each batch use torch (bf16 -> float32 on CPU is an exact
numpy bit shift).

Memory: the buffer holds ``max(shuffle_buffer_tokens, 2 * batch_size)`` slots (copies:
131072 x 576 bf16 = 151 MB by default; references: 12 bytes each, plus the address space of
the mapped chunks they point into) and ``prefetch`` chunks read ahead.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from masksae.devices import resolve_dtype
from masksae.errors import ConfigError, StoreError
from masksae.storage.schema import STORE_DTYPES

if TYPE_CHECKING:
    from masksae.storage.reader import ActivationStore

log = logging.getLogger(__name__)

_EPOCH_END = object()
_READ_AHEAD_MAX = 64  # chunks named to the store's read-ahead (it takes what it is set to)


def chunk_order(chunks: list[int], seed: int, epoch: int) -> list[int]:
    """The seeded chunk visiting order of one epoch."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EED, int(epoch)])
    return [chunks[i] for i in rng.permutation(len(chunks))]


def _mix_generator(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xB0F, int(epoch)])


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 bits -> float32 (exact; single-threaded numpy).

    (A one-pass ``np.left_shift(bits, 16, dtype=np.uint32, out=...)`` measured slower here
    than widening then shifting in place.)
    """
    out = bits.astype(np.uint32)
    out <<= 16
    return out.view(np.float32)


def row_words(array: np.ndarray) -> np.ndarray:
    """A C-contiguous [N, D] array viewed as [N, W] of the widest unsigned word dividing a row
    (no copy for contiguous input)."""
    row_bytes = array.shape[1] * array.itemsize
    word = next(w for w in (8, 4, 2, 1) if row_bytes % w == 0)
    array = np.ascontiguousarray(array)
    if array.__array_interface__["data"][0] % word:  # misaligned view: an aligned copy
        array = array.copy()
    return array.view(np.dtype(f"u{word}"))


Segment = tuple[np.ndarray, "slice | np.ndarray"]
"""Rows of one chunk piece: (row-word array, a slice or an index array of the rows taken)."""

_MIN_RUN = 64  # kept rows per contiguous run below which an index array is cheaper


def kept_runs(kept: np.ndarray) -> list[slice | np.ndarray]:
    """The sorted row indices ``kept`` as slices of contiguous runs (copied into the buffer
    straight from the chunk, one copy per row), or as one index array when the runs are
    short (masked tokens dropped at p = 0.3: a gather through a temporary is cheaper than
    thousands of tiny copies). Excluded tokens are rare (position 0, specials, outliers),
    so the default stream takes the run path."""
    if kept.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(kept) != 1) + 1
    if kept.size < _MIN_RUN * (breaks.size + 1):
        return [kept]
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [kept.size]))
    return [slice(int(kept[a]), int(kept[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


class _Prefetcher:
    """Reads chunks (filtered, as at-rest torch tensors) ahead on a daemon thread."""

    def __init__(
        self,
        store: ActivationStore,
        plan: list[list[int]],
        *,
        include_masked: bool,
        include_excluded: bool,
        prefetch: int,
    ) -> None:
        self._store = store
        self._plan = plan
        self._include_masked = include_masked
        self._include_excluded = include_excluded
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="masksae-store-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            sequence = [index for order in self._plan for index in order]
            position = 0
            for order in self._plan:
                for index in order:
                    position += 1
                    # remote stores fetch the next chunks while this one is read
                    self._store.read_ahead(sequence[position : position + _READ_AHEAD_MAX])
                    if not self._put(self._read(index)):
                        return
                if not self._put(_EPOCH_END):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)

    def _read(self, index: int) -> list[Segment]:
        """Chunk ``index`` as segments of row words with the rows to keep."""
        names = ("excluded",) + (() if self._include_masked else ("masked",))
        try:
            views = self._store.activation_views(index)
            if views is None:
                names = ("activations", *names)
            arrays = self._store.read_chunk(index, names)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything else reading the files
            raise StoreError(
                f"cannot read chunk {index} of store {self._store.path} "
                f"({type(exc).__name__}: {str(exc)[:120]}); `masksae store verify` names the "
                "damage, and rerunning the harvest command that created the store rewrites it"
            ) from exc
        if views is None:
            views = [arrays["activations"]]
        keep = np.ones(arrays["excluded"].shape[0], dtype=bool)
        if not self._include_excluded:
            keep &= ~arrays["excluded"]
        if not self._include_masked:
            keep &= ~arrays["masked"]
        keep_idx = None if keep.all() else np.flatnonzero(keep)
        segments: list[Segment] = []
        offset = 0
        for view in views:
            rows = view.shape[0]
            words = row_words(view)
            if keep_idx is None:
                segments.append((words, slice(0, rows)))
            else:
                lo, hi = np.searchsorted(keep_idx, [offset, offset + rows])
                segments.extend((words, sel) for sel in kept_runs(keep_idx[lo:hi] - offset))
            offset += rows
        return segments

    def get(self) -> Any:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a put waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


_SCATTER_BLOCK = 4096  # rows gathered at a time into a cache-sized temporary


def _segment_rows(segment: Segment) -> int:
    sel = segment[1]
    return sel.stop - sel.start if isinstance(sel, slice) else sel.shape[0]


class _Incoming:
    """Rows of the current epoch, taken in order from the prefetcher's chunks.

    Chunks arrive whole with the indices of their kept rows, so filtering costs no
    extra copy: rows go straight from the chunk into buffer slots.
    """

    def __init__(self, prefetcher: _Prefetcher) -> None:
        self._prefetcher = prefetcher
        self._pending: list[Segment] = []
        self._pending_rows = 0
        self.exhausted = False

    def take(self, n_rows: int) -> list[Segment]:
        """Segments holding up to ``n_rows`` rows (fewer only when the epoch ran out)."""
        while self._pending_rows < n_rows and not self.exhausted:
            item = self._prefetcher.get()
            if item is _EPOCH_END:
                self.exhausted = True
                continue
            for segment in item:
                if _segment_rows(segment):
                    self._pending.append(segment)
                    self._pending_rows += _segment_rows(segment)
        taken: list[Segment] = []
        got = 0
        while self._pending and got < n_rows:
            words, sel = self._pending[0]
            available = _segment_rows((words, sel))
            need = n_rows - got
            if available <= need:
                taken.append(self._pending.pop(0))
                got += available
            elif isinstance(sel, slice):
                taken.append((words, slice(sel.start, sel.start + need)))
                self._pending[0] = (words, slice(sel.start + need, sel.stop))
                got = n_rows
            else:
                taken.append((words, sel[:need]))
                self._pending[0] = (words, sel[need:])
                got = n_rows
        self._pending_rows -= got
        return taken


def scatter_rows(buffer: np.ndarray, slots: np.ndarray, segments: list[Segment]) -> int:
    """Copy the segments' rows into ``buffer[slots[:n]]``; returns n."""
    pos = 0
    for words, sel in segments:
        n = _segment_rows((words, sel))
        if isinstance(sel, slice):
            buffer[slots[pos : pos + n]] = words[sel]
        else:
            for lo in range(0, n, _SCATTER_BLOCK):
                hi = min(lo + _SCATTER_BLOCK, n)
                buffer[slots[pos + lo : pos + hi]] = np.take(words, sel[lo:hi], axis=0)
        pos += n
    return pos


class _CopiedRows:
    """Slot buffer holding a copy of each row (any source: zarr-decoded chunks too)."""

    def __init__(self, capacity: int, words_dtype: np.dtype, width: int) -> None:
        self.words_dtype, self.width = words_dtype, width
        self.rows = np.empty((capacity, width), dtype=words_dtype)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def fill(self, slots: np.ndarray, segments: list[Segment]) -> int:
        """Put the segments' rows into ``slots[:n]``; returns n."""
        return scatter_rows(self.rows, slots, segments)

    def compact(self, live: np.ndarray) -> None:
        """Keep only slots ``live`` (renumbered 0..len(live)-1 in that order)."""
        self.rows = np.take(self.rows, live, axis=0)

    def gather(self, index_B: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows of slots ``index_B`` into ``out`` [B, W]."""
        return np.take(self.rows, index_B, axis=0, out=out, mode="clip")


class _RowReferences:
    """Slot buffer holding (source, row) references into memory-mapped chunk views.

    Same slots, same batches as :class:`_CopiedRows`, but filling a slot writes two integers
    instead of copying the row: each row is copied once, from the page cache straight into
    its batch (the copy design wrote it into the buffer first and read it back later, two
    random accesses over the 151 MB buffer). Only for zero-copy views of uncompressed local
    shards: sources stay referenced while a slot points into them (about buffer / (2 chunk)
    x log2(chunk) chunks: ~30 at the defaults), which costs address space and clean,
    reclaimable page cache, not process memory (decoded chunks would stay resident).
    """

    def __init__(self, capacity: int, words_dtype: np.dtype, width: int) -> None:
        self._source = np.zeros(capacity, dtype=np.int32)
        self._row = np.zeros(capacity, dtype=np.int64)
        self._arrays: dict[int, np.ndarray] = {}  # source id -> row-word view
        self._ids: dict[int, int] = {}  # id(view) -> source id, for views still referenced
        self._next_id = 0
        self._in_use = 0
        self._staging: np.ndarray | None = None
        self.words_dtype, self.width = words_dtype, width

    def __len__(self) -> int:
        return self._source.shape[0]

    def _source_id(self, words: np.ndarray) -> int:
        sid = self._ids.get(id(words))
        if sid is None:
            sid = self._next_id
            self._next_id += 1
            self._ids[id(words)] = sid
            self._arrays[sid] = words  # holds the view alive, so id(words) stays unique
        return sid

    def fill(self, slots: np.ndarray, segments: list[Segment]) -> int:
        pos = 0
        for words, sel in segments:
            n = _segment_rows((words, sel))
            targets = slots[pos : pos + n]
            self._source[targets] = self._source_id(words)
            self._row[targets] = np.arange(sel.start, sel.stop) if isinstance(sel, slice) else sel
            pos += n
        if pos:  # slots in use: 0..n-1 after the epoch's first fill, all of them afterwards
            self._in_use = max(self._in_use, int(slots[:pos].max()) + 1)
        self._release_unreferenced()
        return pos

    def compact(self, live: np.ndarray) -> None:
        self._source = self._source[live]
        self._row = self._row[live]
        self._in_use = live.shape[0]
        self._release_unreferenced()

    def _release_unreferenced(self) -> None:
        """Forget the sources no slot in use points into (their views can be unmapped)."""
        used = np.bincount(self._source[: self._in_use], minlength=self._next_id)
        for sid in [sid for sid in self._arrays if not used[sid]]:
            words = self._arrays.pop(sid)
            del self._ids[id(words)]

    def gather(self, index_B: np.ndarray, out: np.ndarray) -> np.ndarray:
        source_B, row_B = self._source[index_B], self._row[index_B]
        order = np.lexsort((row_B, source_B))  # by source, then row: sequential-ish reads
        by_source = source_B[order]
        if self._staging is None or self._staging.shape[0] < order.shape[0]:
            self._staging = np.empty((order.shape[0], self.width), dtype=self.words_dtype)
        staged = self._staging[: order.shape[0]]
        bounds = np.flatnonzero(by_source[1:] != by_source[:-1]) + 1
        for lo, hi in zip(
            np.concatenate(([0], bounds)), np.concatenate((bounds, [order.shape[0]])), strict=True
        ):
            rows = row_B[order[lo:hi]]
            np.take(self._arrays[int(by_source[lo])], rows, axis=0, out=staged[lo:hi], mode="clip")
        # back into slot order: the batch equals the copy design's, row for row
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.shape[0])
        return np.take(staged, inverse, axis=0, out=out, mode="clip")


def stream_batches(
    store: ActivationStore,
    batch_size: int,
    *,
    seed: int,
    include_masked: bool,
    include_excluded: bool,
    shuffle_buffer_tokens: int,
    prefetch: int,
    dtype: Any,
    device: Any,
    skip_batches: int,
    chunk_range: tuple[int, int] | None,
    epochs: int,
) -> Iterator[torch.Tensor]:
    """Implementation of :meth:`ActivationStore.stream` (validates, then returns a generator)."""
    if isinstance(batch_size, bool) or int(batch_size) <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(epochs) < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs!r}")
    if int(skip_batches) < 0:
        raise ConfigError(f"skip_batches must be >= 0, got {skip_batches!r}")
    first, last = store._check_chunk_range(chunk_range)
    chunks = list(range(first, last))
    missing = [i for i in chunks if i not in store.completed_chunks]
    if missing:
        raise StoreError(
            f"cannot stream store {store.path}: chunks {missing[:10]} are "
            "incomplete; rerun the harvest command to finish it"
        )
    out_dtype = resolve_dtype(dtype)
    out_device = torch.device(device)
    per_epoch = store.batches_per_epoch(
        batch_size,
        include_masked=include_masked,
        include_excluded=include_excluded,
        chunk_range=(first, last),
    )
    if per_epoch == 0:
        raise StoreError(
            f"store {store.path} has fewer than batch_size={batch_size} usable "
            f"tokens in chunks {first}..{last - 1}: use a smaller batch size"
        )
    first_epoch = min(int(skip_batches) // per_epoch, int(epochs))
    return _generate(
        store,
        chunks,
        int(batch_size),
        seed=int(seed),
        include_masked=include_masked,
        include_excluded=include_excluded,
        capacity=max(int(shuffle_buffer_tokens), 2 * int(batch_size)),
        prefetch=int(prefetch),
        out_dtype=out_dtype,
        out_device=out_device,
        skip_in_epoch=int(skip_batches) - first_epoch * per_epoch,
        epoch_range=range(first_epoch, int(epochs)),
    )


def _generate(
    store: ActivationStore,
    chunks: list[int],
    batch_size: int,
    *,
    seed: int,
    include_masked: bool,
    include_excluded: bool,
    capacity: int,
    prefetch: int,
    out_dtype: torch.dtype,
    out_device: torch.device,
    skip_in_epoch: int,
    epoch_range: range,
) -> Iterator[torch.Tensor]:
    if not epoch_range:
        return
    plan = [chunk_order(chunks, seed, epoch) for epoch in epoch_range]
    prefetcher = _Prefetcher(
        store,
        plan,
        include_masked=include_masked,
        include_excluded=include_excluded,
        prefetch=prefetch,
    )
    pin = out_device.type == "cuda"
    at_rest = np.dtype(STORE_DTYPES[store.spec.dtype])
    is_bf16 = store.spec.dtype == "bfloat16"

    fast_f32 = is_bf16 and out_dtype == torch.float32 and out_device.type == "cpu"

    def emit(words_BW: np.ndarray) -> torch.Tensor:
        rows = words_BW.view(at_rest)
        if fast_f32:
            return torch.from_numpy(bf16_bits_to_float32(rows))
        batch = (
            torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
            if is_bf16
            else torch.from_numpy(rows)
        )
        if pin:
            batch = batch.pin_memory().to(out_device, non_blocking=True)
        elif out_device.type != "cpu":
            batch = batch.to(out_device)
        return batch.to(out_dtype) if batch.dtype != out_dtype else batch

    scratch: np.ndarray | None = None
    slot_buffer = _RowReferences if store.memory_mapped_reads() else _CopiedRows

    def gather(buffer: _CopiedRows | _RowReferences, index_B: np.ndarray) -> np.ndarray:
        nonlocal scratch
        shape = (index_B.shape[0], buffer.width)
        if not fast_f32:  # the batch itself: a fresh array
            return buffer.gather(index_B, np.empty(shape, dtype=buffer.words_dtype))
        # bf16 -> fp32 on the CPU: the gathered bits are converted into a fresh array right
        # away, so they go to a reused scratch (mode="clip": no internal buffering)
        if scratch is None or scratch.shape != shape or scratch.dtype != buffer.words_dtype:
            scratch = np.empty(shape, dtype=buffer.words_dtype)
        return buffer.gather(index_B, scratch)

    try:
        skip = skip_in_epoch
        for epoch in epoch_range:
            for buffer, index_B in _epoch_batches(
                _Incoming(prefetcher),
                _mix_generator(seed, epoch),
                batch_size,
                capacity,
                slot_buffer,
            ):
                if skip > 0:  # replayed, never materialised
                    skip -= 1
                    continue
                yield emit(gather(buffer, index_B))
            skip = 0
    finally:
        prefetcher.close()


def _epoch_batches(
    incoming: _Incoming,
    rng: np.random.Generator,
    batch_size: int,
    capacity: int,
    slot_buffer: type[_CopiedRows] | type[_RowReferences],
) -> Iterator[tuple[_CopiedRows | _RowReferences, np.ndarray]]:
    """Mix one epoch's rows through a slot buffer of class ``slot_buffer``.

    Yields (buffer, slot indices) per full batch; the consumer must gather the rows before
    resuming the generator (the slots are refilled afterwards).
    """
    first = incoming.take(capacity)
    if not first:
        return
    words = first[0][0]
    buffer = slot_buffer(capacity, words.dtype, words.shape[1])
    n_first = sum(_segment_rows(segment) for segment in first)
    n_rows = buffer.fill(rng.permutation(n_first), first)  # slots 0..n-1, shuffled
    del first, words
    while n_rows == capacity:
        # steady state: buffer full; emit a random half, refill the freed slots
        n_out = (n_rows // 2) // batch_size * batch_size
        perm = rng.permutation(n_rows)
        freed = perm[:n_out]
        for start in range(0, n_out, batch_size):
            yield buffer, np.sort(freed[start : start + batch_size])
        # incoming rows go to the freed slots in random order, so a batch read in ascending
        # slot order (for memory locality) is still in random token order
        n_new = buffer.fill(freed, incoming.take(n_out))
        if n_new < n_out:  # the epoch's data ran out: compact the live slots and drain
            buffer.compact(np.concatenate([perm[n_out:], freed[:n_new]]))
            n_rows = len(buffer)
            break
    perm = rng.permutation(n_rows)
    for start in range(0, n_rows - batch_size + 1, batch_size):
        yield buffer, perm[start : start + batch_size]  # the epoch's tail: random order
