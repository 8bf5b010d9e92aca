"""A bounded local cache of whole chunks of remote stores, with read-ahead.

Reading a store on object storage one inner chunk at a time would cost a round trip per
4 MiB; the training stream instead fetches each chunk's shard files whole (one GET per
file, the six files of a chunk concurrently), checks them against the chunk's recorded
checksum, and keeps them in a local directory that mirrors the store's layout::

    CACHE_DIR/<store key>/zarr.json, <array>/zarr.json     copies of the store's metadata
    CACHE_DIR/<store key>/<array>/c/<i>[/0]                cached shard files
    CACHE_DIR/<store key>/_cached/<i>.json                 checksum + size of cached chunk i

A cached chunk is used only while its marker's checksum equals the store's current record
(a chunk rewritten remotely is fetched again). The cache directory is then an ordinary
local store for the reader: memory-mapped zero-copy reads for uncompressed shards, zarr
otherwise, so every epoch after the first runs at local speed when the cache holds the
store. The cache is bounded: past ``max_bytes`` the least recently used chunks are evicted
(never the ones this process is about to read). Several processes may share one cache
directory (files are written atomically; a chunk evicted under a reader is fetched again).

The stream's order is decided before any read, so the cache changes where bytes come from,
never which batches come out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masksae.cache_dirs import cache_dir as masksae_cache_dir
from masksae.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from masksae.storage.location import StoreLocation

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 20 << 30
"""Default size limit of the chunk cache (20 GiB)."""
DEFAULT_READ_AHEAD = 4
"""Chunks fetched ahead of the one being read."""
MARKER_DIR = "_cached"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"20GiB"``, ``"500MB"``, ``"0"`` or an int -> bytes; ConfigError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"cache size {text} is negative: expected e.g. 20GiB or 0")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(
            f"cache size {text!r} is not a size: expected e.g. 20GiB, 500MB, 1.5TiB or 0"
        )
    number, unit, binary = match.groups()
    base = 1024 if binary or unit == "" else 1000
    power = " kmgt".index(unit.lower() or " ")
    return int(float(number) * base**power)


def default_cache_dir() -> Path:
    """``$MASKSAE_CACHE/store-cache`` (default ``~/.cache/masksae/store-cache``)."""
    return masksae_cache_dir("store-cache")


def cache_key(url: str) -> str:
    """Folder name of a store in the cache: readable tail + hash of the full URL."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{tail}-{hashlib.blake2b(url.encode(), digest_size=8).hexdigest()}"


class ChunkCache:
    """The local chunk cache of one remote store (see the module docstring)."""

    def __init__(
        self,
        location: StoreLocation,
        metadata: dict[str, bytes],
        checksums: dict[int, str],
        fetch: Any,
        *,
        cache_dir: str | Path | None = None,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        workers: int = DEFAULT_READ_AHEAD,
    ) -> None:
        """``metadata``: relative name -> bytes of every zarr.json of the store;
        ``checksums``: the recorded checksum of each complete chunk; ``fetch(index)``:
        returns ``{relative name: bytes}`` of the chunk's files, checksum-verified."""
        self.location = location
        self.root = Path(cache_dir or default_cache_dir()).expanduser() / cache_key(location.url)
        self.max_bytes = int(max_bytes)
        self._checksums = checksums
        self._fetch = fetch
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._upcoming: set[int] = set()  # the read-ahead window: not evicted
        self._reading: set[int] = set()  # being made local for a reader: not evicted
        self._held: dict[int, int] = {}  # chunks inside reading() blocks: not evicted
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="masksae-fetch")
        self.fetched_bytes = 0
        """Bytes downloaded by this process (statistics for benchmarks and logs)."""
        self.hits = 0
        self.misses = 0
        try:
            for rel, data in metadata.items():
                target = self.root / rel
                if not target.is_file() or target.read_bytes() != data:
                    from masksae.atomic import atomic_write_bytes

                    atomic_write_bytes(target, data)
            (self.root / MARKER_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot use the chunk cache folder {self.root}: {exc}; choose another "
                "--cache-dir (a writable local folder)"
            ) from exc
        self._sizes = self._scan()

    # ------------------------------------------------------------------ state
    def _marker(self, index: int) -> Path:
        return self.root / MARKER_DIR / f"{index}.json"

    def _scan(self) -> dict[int, int]:
        sizes: dict[int, int] = {}
        for marker in (self.root / MARKER_DIR).glob("*.json"):
            try:
                sizes[int(marker.stem)] = int(json.loads(marker.read_text())["bytes"])
            except (OSError, ValueError, KeyError):
                marker.unlink(missing_ok=True)
        return sizes

    def cached_bytes(self) -> int:
        """Bytes of the chunks this cache holds."""
        with self._lock:
            return sum(self._sizes.values())

    def is_cached(self, index: int) -> bool:
        """True when chunk ``index`` is in the cache with the store's current checksum."""
        from masksae.storage.layout import chunk_keys

        try:
            marker = json.loads(self._marker(index).read_text())
        except (OSError, ValueError):
            return False
        if marker.get("checksum") != self._checksums.get(index):
            return False
        return all((self.root / key).is_file() for key in chunk_keys(index))

    # ------------------------------------------------------------------ reading
    def read_ahead(self, indices: list[int]) -> None:
        """Fetch ``indices`` in the background (those not cached or in flight yet); they are
        protected from eviction until the next call."""
        with self._lock:
            self._upcoming = set(indices)
        for index in indices:
            with self._lock:
                if index in self._pending or self.is_cached(index):
                    continue
                self._pending[index] = self._pool.submit(self._download, index)

    def local_file(self, index: int, key: str) -> Path:
        """Local path of file ``key`` of chunk ``index``, fetched first if needed."""
        self._ensure(index)
        return self.root / key

    @contextmanager
    def reading(self, index: int) -> Iterator[Path]:
        """Chunk ``index`` made local and kept from eviction by this process while the
        block runs; yields the cache root (a local store holding the chunk)."""
        with self._lock:
            self._held[index] = self._held.get(index, 0) + 1
        try:
            self._ensure(index)
            yield self.root
        finally:
            with self._lock:
                self._held[index] -= 1
                if not self._held[index]:
                    del self._held[index]

    def read_files(self, index: int, keys: list[str]) -> dict[str, bytes]:
        """The bytes of files ``keys`` of chunk ``index`` (fetched first if needed)."""
        for attempt in range(2):
            self._ensure(index)
            try:
                return {key: (self.root / key).read_bytes() for key in keys}
            except FileNotFoundError:  # evicted by another process meanwhile: fetch again
                if attempt:
                    raise
                self._marker(index).unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def _ensure(self, index: int) -> None:
        with self._lock:
            future = self._pending.get(index)
            self._reading.add(index)
        try:
            if future is None and self.is_cached(index):
                self.hits += 1
                os.utime(self._marker(index))  # most recently used
                return
            if future is None:
                with self._lock:
                    future = self._pending.get(index) or self._pool.submit(self._download, index)
                    self._pending[index] = future
            try:
                future.result()
            finally:
                with self._lock:
                    if self._pending.get(index) is future:
                        del self._pending[index]
        finally:
            with self._lock:
                self._reading.discard(index)

    def close(self) -> None:
        """Stop the fetch threads (downloads in flight finish; queued ones are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ internals
    def _download(self, index: int) -> None:
        from masksae.atomic import atomic_write_bytes, atomic_write_text

        if self.is_cached(index):  # another process fetched it meanwhile
            return
        self.misses += 1
        files = self._fetch(index)
        size = sum(len(data) for data in files.values())
        self._make_room(size, keep=index)
        self._marker(index).unlink(missing_ok=True)
        for rel, data in files.items():
            atomic_write_bytes(self.root / rel, data)
        marker = {"checksum": self._checksums.get(index), "bytes": size, "at": time.time()}
        atomic_write_text(self._marker(index), json.dumps(marker))
        with self._lock:
            self._sizes[index] = size
            self.fetched_bytes += size

    def _make_room(self, incoming: int, keep: int) -> None:
        """Evict least recently used chunks until ``incoming`` more bytes fit."""
        from masksae.storage.layout import chunk_keys

        with self._lock:
            total = sum(self._sizes.values())
            if total + incoming <= self.max_bytes:
                return
            protected = self._upcoming | self._reading | set(self._held) | set(self._pending)
            protected.add(keep)
            candidates = [i for i in self._sizes if i not in protected]

        def last_used(i: int) -> float:
            try:
                return self._marker(i).stat().st_mtime
            except OSError:
                return 0.0

        for index in sorted(candidates, key=last_used):
            if total + incoming <= self.max_bytes:
                break
            # marker first: a half-removed chunk then reads as not cached
            self._marker(index).unlink(missing_ok=True)
            for key in chunk_keys(index):
                (self.root / key).unlink(missing_ok=True)
            with self._lock:
                total -= self._sizes.pop(index, 0)
        log.debug("chunk cache %s: %d bytes after eviction", self.root, total)
