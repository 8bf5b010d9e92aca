"""Creating a store directory, its attributes, and its per-chunk completion records.

Zarr itself only sees the group and its arrays; everything masksae adds lives in the
group attributes (``zarr.json``, rewritten atomically) and in ``_chunks/<index>.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from masksae.atomic import fsync_dir
from masksae.errors import StoreError
from masksae.storage.codecs import METADATA_COMPRESSION, zarr_compressors
from masksae.storage.location import StoreLocation
from masksae.storage.schema import (
    ARRAY_NAMES,
    EXCLUDED_TOKEN_POLICY,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_DIR,
    STORE_DTYPES,
    TOKEN_ARRAYS,
    StoreSpec,
)

log = logging.getLogger(__name__)

GROUP_METADATA = "zarr.json"
_INNER_CHUNK_BYTES = 4 << 20  # target uncompressed size of one inner (compression) chunk


def inner_chunk_rows(chunk_tokens: int, d_model: int, itemsize: int) -> int:
    """Rows per inner chunk of an activation shard: a divisor of ``chunk_tokens`` near 4 MiB."""
    target = max(1, _INNER_CHUNK_BYTES // (d_model * itemsize))
    if target >= chunk_tokens:
        return chunk_tokens
    best = max(d for d in range(1, target + 1) if chunk_tokens % d == 0)
    # a tiny divisor (chunk_tokens prime-ish) would make thousands of inner chunks
    return best if best * 8 >= target else chunk_tokens


def read_attrs(target: Path | StoreLocation) -> dict[str, Any] | None:
    """The masksae attributes of the store at ``target``, or None if it is not a store."""
    try:
        meta = json.loads(StoreLocation.parse(target).read_bytes(GROUP_METADATA))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    attrs = meta.get("attributes") or {}
    if meta.get("node_type") != "group" or attrs.get("format") != FORMAT_NAME:
        return None
    return attrs


def update_attrs(target: Path | StoreLocation, updates: dict[str, Any]) -> None:
    """Merge ``updates`` into the group attributes, atomically rewriting zarr.json (a temp
    file and a rename locally, one PUT on an object store)."""
    loc = StoreLocation.parse(target)
    meta = json.loads(loc.read_bytes(GROUP_METADATA))
    meta.setdefault("attributes", {}).update(updates)
    loc.write_bytes(GROUP_METADATA, _json_bytes(meta))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def base_attrs(spec: StoreSpec) -> dict[str, Any]:
    """The attributes written when a store is created."""
    from masksae import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "spec": {k: v for k, v in spec.to_dict().items() if k != "provenance"},
        "provenance": spec.provenance,
        "storage_dtype": spec.dtype,
        "n_chunks": spec.n_chunks,
        "excluded_token_policy": EXCLUDED_TOKEN_POLICY,
        "complete": False,
    }


def spec_from_attrs(attrs: dict[str, Any]) -> StoreSpec:
    """Rebuild the StoreSpec recorded in a store's attributes."""
    return StoreSpec.from_dict({**attrs["spec"], "provenance": attrs.get("provenance", {})})


def create_store(path: Path, spec: StoreSpec) -> None:
    """Create an empty store at ``path`` (absent or an empty directory), atomically.

    The skeleton is built in a hidden sibling directory and renamed into place, so a crash
    never leaves a half-created store.
    """
    import zarr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = zarr.open_group(store=str(tmp), mode="w-", zarr_format=3)
        config = {"write_empty_chunks": True}
        rows = inner_chunk_rows(spec.chunk_tokens, spec.d_model, spec.itemsize)
        group.create_array(
            "activations",
            shape=(spec.total_tokens, spec.d_model),
            dtype=STORE_DTYPES[spec.dtype],
            chunks=(rows, spec.d_model),
            shards=(spec.chunk_tokens, spec.d_model),
            compressors=zarr_compressors(spec.compression, spec.itemsize),
            filters=(),
            fill_value=0,
            attributes={"storage_dtype": spec.dtype, "compression": spec.compression},
            dimension_names=("token", "d_model"),
            config=config,
        )
        for name, dtype in TOKEN_ARRAYS.items():
            group.create_array(
                name,
                shape=(spec.total_tokens,),
                dtype=dtype,
                chunks=(spec.chunk_tokens,),
                compressors=zarr_compressors(METADATA_COMPRESSION, dtype.itemsize),
                filters=(),
                fill_value=0,
                dimension_names=("token",),
                config=config,
            )
        (tmp / MANIFEST_DIR).mkdir()
        update_attrs(tmp, base_attrs(spec))
        if path.exists():
            path.rmdir()  # an empty directory (checked by the caller)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "created activation store %s (%d chunks of %d tokens, %s, %s)",
        path,
        spec.n_chunks,
        spec.chunk_tokens,
        spec.dtype,
        spec.compression,
    )


def create_remote_store(loc: StoreLocation, spec: StoreSpec) -> None:
    """Create an empty store on an object store (no rename there).

    The skeleton is built in a local temporary directory and uploaded one object per PUT:
    the arrays' metadata first, the group's ``zarr.json`` (with the masksae attributes) last.
    Until that last PUT the prefix holds no store; a creator killed before it leaves only
    array metadata, which :func:`is_half_created` recognises and a rerun overwrites.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="masksae-skeleton-") as tmp:
        skeleton = Path(tmp) / "store"
        create_store(skeleton, spec)
        files = sorted(
            str(f.relative_to(skeleton)).replace(os.sep, "/")
            for f in skeleton.rglob("*")
            if f.is_file() and f.name == GROUP_METADATA
        )
        files.remove(GROUP_METADATA)
        for rel in [*files, GROUP_METADATA]:
            loc.write_bytes(rel, (skeleton / rel).read_bytes())
    log.info("created activation store %s on %s", loc, type(loc.fs).__name__)


def is_half_created(listing: dict[str, int]) -> bool:
    """True when a prefix holds only array metadata of a store whose creation was cut short
    (no group ``zarr.json``, nothing but ``<array>/zarr.json`` objects and a lock)."""
    from masksae.storage.lock import LOCK_FILE

    names = set(listing) - {LOCK_FILE}
    allowed = {f"{name}/{GROUP_METADATA}" for name in ARRAY_NAMES}
    return bool(names) and GROUP_METADATA not in names and names <= allowed


def chunk_keys(index: int) -> list[str]:
    """Relative names of the data files of chunk ``index`` (one per array, in ARRAY_NAMES
    order; default v3 chunk key encoding)."""
    return [f"activations/c/{index}/0"] + [f"{name}/c/{index}" for name in TOKEN_ARRAYS]


def chunk_files(path: Path, index: int) -> list[Path]:
    """The data files of chunk ``index`` of the local store at ``path``."""
    return [Path(path) / key for key in chunk_keys(index)]


def missing_chunk_files(path: Path, index: int) -> list[Path]:
    """The data files of chunk ``index`` that are absent (local store).

    The store's rule: every array of a complete chunk has its shard file, even when all its
    values equal the fill value (the writer writes empty chunks explicitly). zarr would
    read an absent shard back as fill values, so an absent file is never taken as data.
    """
    return [f for f in chunk_files(path, index) if not f.is_file()]


def resized_chunk_files(
    path: Path | StoreLocation, record: dict[str, Any], listing: dict[str, int] | None = None
) -> list[str]:
    """``file (N bytes, recorded M)`` for each data file of a chunk whose size differs from
    the one in its completion record (records from before 0.2 hold no sizes: []).
    ``listing`` (relative name -> size) saves a stat per file."""
    sizes = record.get("file_sizes")
    if not isinstance(sizes, dict):
        return []
    present = StoreLocation.parse(path).listing() if listing is None else listing
    changed = []
    for rel, expected in sizes.items():
        actual = present.get(rel)
        if actual is None:
            continue  # missing files are reported as missing
        if actual != expected:
            changed.append(f"{rel} ({actual} bytes, recorded {expected})")
    return changed


def split_intact(
    target: Path | StoreLocation,
    records: dict[int, dict[str, Any]],
    listing: dict[str, int] | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Split completion records into intact chunks and broken ones (shard files missing, or
    of another size than recorded: truncated or overwritten).

    Returns ``(intact, broken)``, ``broken`` mapping each chunk index to a one-line reason
    naming the files. A broken chunk counts as incomplete everywhere: the writer rewrites it
    on resume, the reader refuses it, and verify names its files. ``listing`` (relative
    name -> size, from :meth:`StoreLocation.listing`) is taken once per open; it is listed
    here when not given.
    """
    present = StoreLocation.parse(target).listing() if listing is None else listing
    intact: dict[int, dict[str, Any]] = {}
    broken: dict[int, str] = {}
    for index, record in records.items():
        lost = [key for key in chunk_keys(index) if key not in present]
        resized = resized_chunk_files(target, record, present)
        if lost:
            broken[index] = f"shard file(s) missing ({', '.join(lost)})"
        elif resized:
            broken[index] = (
                f"shard file(s) truncated or overwritten: size differs from the chunk's record "
                f"({', '.join(resized)})"
            )
        else:
            intact[index] = record
    return intact, broken


def manifest_key(index: int) -> str:
    """Relative name of the completion record of chunk ``index``."""
    return f"{MANIFEST_DIR}/{index:06d}.json"


def manifest_path(path: Path, index: int) -> Path:
    """Completion record of chunk ``index`` of the local store at ``path``."""
    return Path(path) / manifest_key(index)


def write_manifest(target: Path | StoreLocation, index: int, record: dict[str, Any]) -> None:
    """Atomically write the completion record of chunk ``index`` (after its data)."""
    StoreLocation.parse(target).write_bytes(manifest_key(index), _json_bytes(record))


def delete_manifest(target: Path | StoreLocation, index: int) -> None:
    """Remove the completion record of chunk ``index`` (before rewriting its data)."""
    StoreLocation.parse(target).delete(manifest_key(index))


#: fields every completion record holds, with their JSON types
_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "index": int,
    "start": int,
    "stop": int,
    "n_tokens": int,
    "n_excluded": int,
    "n_masked": int,
    "n_masked_excluded": int,
    "checksum": str,
    "stats": dict,
}
_STATS_TYPES: dict[str, type | tuple[type, ...]] = {
    "count": int,
    "sum_D": list,
    "sumsq_D": list,
    "sum_norm": (int, float),
    "sum_sq_norm": (int, float),
}


def record_problem(record: Any, index: int, spec: StoreSpec) -> str | None:
    """What is wrong with a parsed completion record of chunk ``index`` (None if sound)."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    for table, types, where in (
        (record, _RECORD_TYPES, ""),
        (record.get("stats"), _STATS_TYPES, "stats."),
    ):
        for key, kind in types.items():
            value = table.get(key) if isinstance(table, dict) else None
            if isinstance(value, bool) or not isinstance(value, kind):
                return f"field {where}{key} is {value!r}, expected a {getattr(kind, '__name__', 'number')}"
    start, stop = spec.chunk_bounds(index)
    if (record["index"], record["start"], record["stop"]) != (index, start, stop):
        return (
            f"describes chunk {record['index']} = tokens {record['start']}..{record['stop']}, "
            f"expected chunk {index} = tokens {start}..{stop}"
        )
    if len(record["stats"]["sum_D"]) != spec.d_model or len(record["stats"]["sumsq_D"]) != (
        spec.d_model
    ):
        return f"stats hold {len(record['stats']['sum_D'])} dimensions, expected {spec.d_model}"
    return None


def read_manifests(
    target: Path | StoreLocation,
    spec: StoreSpec,
    damaged: dict[int, str] | None = None,
    listing: dict[str, int] | None = None,
) -> dict[int, dict[str, Any]]:
    """Valid completion records by chunk index. Unreadable or malformed ones are skipped
    (the chunk counts as incomplete, so a rerun harvest rewrites it); with ``damaged`` given,
    each skipped chunk's reason is put there.

    The record names come from ``listing`` (listed here when not given); their contents are
    fetched together (concurrently on object stores).
    """
    loc = StoreLocation.parse(target)
    present = loc.listing() if listing is None else listing
    prefix = f"{MANIFEST_DIR}/"
    names = sorted(k for k in present if k.startswith(prefix) and k.endswith(".json"))
    names = [k for k in names if "/" not in k[len(prefix) :] and not k[len(prefix)].startswith(".")]
    records: dict[int, dict[str, Any]] = {}
    indices: dict[str, int] = {}
    for key in names:
        try:
            index = int(key[len(prefix) : -len(".json")])
            spec.chunk_bounds(index)
        except (ValueError, StoreError):
            log.warning("ignoring stray file %s among the chunk records", loc.display(key))
            continue
        indices[key] = index
    contents = loc.read_many(list(indices))
    for key, index in indices.items():
        try:
            record = json.loads(contents[key])
        except (ValueError, KeyError) as exc:
            problem: str | None = f"is unreadable ({type(exc).__name__})"
        else:
            problem = record_problem(record, index, spec)
        if problem is not None:
            reason = f"completion record {key} {problem}"
            log.warning("store %s: chunk %d: ignoring its %s", loc, index, reason)
            if damaged is not None:
                damaged[index] = reason
            continue
        records[index] = record
    return records


def array_metadata_problems(target: Path | StoreLocation, spec: StoreSpec) -> list[str]:
    """Differences between each array's zarr.json (shape, data type, chunk shape) and the
    store's spec: an edited or swapped array metadata file, which would make zarr read the
    data wrongly (e.g. rows of another width)."""
    expected = {
        "activations": (
            [spec.total_tokens, spec.d_model],
            STORE_DTYPES[spec.dtype].name,
            [spec.chunk_tokens, spec.d_model],
        ),
        **{
            name: ([spec.total_tokens], dtype.name, [spec.chunk_tokens])
            for name, dtype in TOKEN_ARRAYS.items()
        },
    }
    loc = StoreLocation.parse(target)
    keys = [f"{name}/{GROUP_METADATA}" for name in expected]
    contents = loc.read_many(keys)
    problems = []
    for (shape, dtype, chunks), key in zip(expected.values(), keys, strict=True):
        meta_file = loc.display(key)
        try:
            meta = json.loads(contents[key])
            found = (
                meta["shape"],
                meta["data_type"],
                meta["chunk_grid"]["configuration"]["chunk_shape"],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{meta_file} is missing or unreadable ({type(exc).__name__})")
            continue
        for what, want, got in zip(
            ("shape", "data_type", "chunk shape"), (shape, dtype, chunks), found, strict=True
        ):
            if got != want:
                problems.append(
                    f"{meta_file}: {what} {got!r} differs from the store's spec {want!r} "
                    "(the array metadata was edited or replaced)"
                )
    return problems


def store_fingerprint(spec: StoreSpec, checksums: list[str]) -> str:
    """blake2b-128 of the spec (with provenance) and every chunk checksum in order."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for checksum in checksums:
        digest.update(checksum.encode())
    return digest.hexdigest()


def fsync_files(files: list[Path]) -> None:
    """fsync each existing file (best effort: data first, then its completion record)."""
    for file in files:
        fsync_dir(file)


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def as_numpy(value: Any, dtype: np.dtype, *, copy: bool = True) -> np.ndarray:
    """A numpy array of ``dtype`` from a numpy array or a torch tensor (any device)."""
    if hasattr(value, "detach"):  # torch tensor
        tensor = value.detach()
        copy = copy and tensor.device.type == "cpu"  # .cpu() of a device tensor is a copy
        value = tensor.cpu().numpy()
    array = np.asarray(value)
    if array.dtype != dtype:
        return array.astype(dtype)
    return array.copy() if copy else array
