"""Where a store lives: a local directory, or an fsspec URL (s3://, gs://, hf://, file://).

:class:`StoreLocation` is the one place that knows the difference. Local stores keep their
POSIX guarantees (temporary file + rename for every metadata write, fsync, an flock writer
lock, memory-mapped reads). Object stores have no rename, but every PUT of an object is
atomic (a reader sees the old object or the new one, never a torn one): each file of a
store is one object written by one PUT, and the order of PUTs carries the meaning (a
chunk's completion record after its data; the group attributes after the array metadata).

Credentials come the standard way of each filesystem (for S3: the ``AWS_*`` environment
variables, ``AWS_ENDPOINT_URL`` included, or ``~/.aws``), plus ``storage_options`` given
on the command line as ``--storage-option KEY=VALUE``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from masksae.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

#: URL scheme -> the pip extra of masksae that installs its filesystem
SCHEME_EXTRAS: dict[str, str] = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf"}


def is_url(target: str | os.PathLike) -> bool:
    """True for ``scheme://...`` strings (``file://`` included)."""
    return not isinstance(target, os.PathLike) and "://" in str(target)


def parse_storage_options(items: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> a dict; JSON values (true, 3, {"a": 1}) are decoded.

    ``client_kwargs.region_name=eu-west-1`` (a dotted key) sets a nested value.
    """
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--storage-option {item!r} is not KEY=VALUE: e.g. "
                "--storage-option endpoint_url=http://127.0.0.1:9000 or anon=true"
            )
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        target = options
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--storage-option {item!r}: {part!r} is already a value")
        target[leaf] = value
    return options


class StoreLocation:
    """The root of one store: an fsspec filesystem and a path in it.

    ``local_path`` is set for stores on the local filesystem (a plain path or ``file://``);
    the other members work for both kinds. Relative names (``"zarr.json"``,
    ``"activations/c/3/0"``) always use ``/``.
    """

    def __init__(
        self, url: str, fs: Any, root: str, local_path: Path | None, options: dict[str, Any]
    ) -> None:
        self.url = url
        """The location as the user gave it (URLs) or the local path as a string."""
        self.fs = fs
        """The fsspec filesystem (a LocalFileSystem for local stores)."""
        self.root = root.rstrip("/")
        """Path of the store root inside ``fs``."""
        self.local_path = local_path
        """The store directory when it is on the local filesystem, else None."""
        self.storage_options = dict(options)
        """Options the filesystem was built with (credentials, endpoint, ...)."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(
        cls, target: str | os.PathLike | StoreLocation, storage_options: dict | None = None
    ) -> StoreLocation:
        """A location from a local path, a ``file://`` URL or any fsspec URL."""
        if isinstance(target, StoreLocation):
            return target
        options = dict(storage_options or {})
        text = os.fspath(target) if isinstance(target, os.PathLike) else str(target)
        if not is_url(target) or text.startswith("file://"):
            local = Path(text.removeprefix("file://")).expanduser()
            from fsspec.implementations.local import LocalFileSystem

            return cls(str(local), LocalFileSystem(), str(local.absolute()), local, {})
        scheme = text.split("://", 1)[0].lower()
        # other processes write the same store (ranks, teammates): never answer from a
        # cached listing (s3fs would even report a file written since as missing)
        options = {"use_listings_cache": False, **options}
        try:
            import fsspec

            fs, root = fsspec.url_to_fs(text, **options)
        except ImportError as exc:
            extra = SCHEME_EXTRAS.get(scheme)
            hint = f"pip install 'masksae[{extra}]'" if extra else "install its fsspec package"
            raise StoreError(
                f"store URL {text!r} needs a filesystem package for {scheme}:// that is not "
                f"installed ({exc}): {hint}"
            ) from None
        except ValueError as exc:
            raise StoreError(
                f"store URL {text!r} is not usable: {exc}; expected a local path or an "
                "fsspec URL such as s3://bucket/prefix, gs://bucket/prefix, "
                "hf://datasets/org/name/prefix"
            ) from None
        except TypeError as exc:
            raise ConfigError(
                f"--storage-option values are not accepted by the {scheme}:// filesystem: "
                f"{exc}; check the option names"
            ) from None
        return cls(text.rstrip("/"), fs, root, None, options)

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def name(self) -> str:
        """Last component of the location (for thread names and messages)."""
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def path(self, rel: str = "") -> str:
        """Path of ``rel`` inside ``fs``."""
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str = "") -> str:
        """``rel`` as the user would write it (a URL for remote stores)."""
        if self.local_path is not None:
            return str(self.local_path / rel) if rel else str(self.local_path)
        return f"{self.url}/{rel}" if rel else self.url

    def __str__(self) -> str:
        return self.display()

    def __repr__(self) -> str:
        return f"StoreLocation({self.display()!r})"

    # ------------------------------------------------------------------ reading
    def exists(self, rel: str = "") -> bool:
        if self.local_path is not None:
            return (self.local_path / rel).exists()
        self.fs.invalidate_cache(self.path(rel))
        return bool(self.fs.exists(self.path(rel)))

    def listing(self) -> dict[str, int]:
        """Every file under the root, relative name -> size in bytes (one listing call)."""
        if self.local_path is not None:
            out: dict[str, int] = {}
            root = str(self.local_path)
            for folder, _dirs, files in os.walk(root):
                rel_dir = os.path.relpath(folder, root)
                for name in files:
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
                    try:
                        out[rel] = os.path.getsize(os.path.join(folder, name))
                    except OSError:  # removed while listing
                        pass
            return out
        self.fs.invalidate_cache(self.root)  # other writers may have added objects
        try:
            found = self.fs.find(self.root, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        return {
            path[len(prefix) :]: int(info.get("size") or 0)
            for path, info in found.items()
            if path.startswith(prefix) and info.get("type", "file") == "file"
        }

    def sizes(self, rels: list[str]) -> dict[str, int]:
        """Size in bytes of each file ``rels`` (FileNotFoundError if one is absent)."""
        if self.local_path is not None:
            return {rel: (self.local_path / rel).stat().st_size for rel in rels}
        return {rel: int(self.fs.size(self.path(rel))) for rel in rels}

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of ``rel`` (FileNotFoundError if absent)."""
        if self.local_path is not None:
            return (self.local_path / rel).read_bytes()
        return self.fs.cat_file(self.path(rel))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """The bytes of several files, fetched concurrently where the filesystem can; absent
        files are left out of the result (other errors are raised)."""
        if not rels:
            return {}
        if self.local_path is not None:
            out = {}
            for rel in rels:
                try:
                    out[rel] = (self.local_path / rel).read_bytes()
                except OSError:
                    pass
            return out
        paths = [self.path(rel) for rel in rels]
        got = self.fs.cat(paths, on_error="return")
        if not isinstance(got, dict):  # a single path may come back bare
            got = {paths[0]: got}
        out = {}
        for path, rel in zip(paths, rels, strict=True):
            data = got.get(path, FileNotFoundError(path))
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):  # network or permission trouble: not "absent"
                raise data
            out[rel] = data
        return out

    def get_file(self, rel: str, local: Path) -> None:
        """Download ``rel`` to the local file ``local`` (written atomically)."""
        from masksae.atomic import atomic_write

        if self.local_path is not None:
            import shutil

            atomic_write(local, lambda tmp: shutil.copyfile(self.local_path / rel, tmp))
            return
        atomic_write(local, lambda tmp: self.fs.get_file(self.path(rel), str(tmp)))

    # ------------------------------------------------------------------ writing
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically: temp file + rename locally, one PUT on object stores."""
        if self.local_path is not None:
            from masksae.atomic import atomic_write_bytes

            atomic_write_bytes(self.local_path / rel, data)
            return
        self.fs.pipe_file(self.path(rel), data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` only if it does not exist; False when it already does.

        Object stores use a conditional PUT (S3 ``If-None-Match: *``); a filesystem without
        conditional writes falls back to check-then-write (a race window, logged once).
        """
        if self.local_path is not None:
            target = self.local_path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        try:
            self.fs.pipe_file(self.path(rel), data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError) as exc:
            if isinstance(exc, ValueError) and "mode" not in str(exc):
                raise
            log.warning(
                "%s does not support conditional writes; the writer lock of %s falls back "
                "to check-then-write (two writers starting in the same instant could both "
                "pass it)",
                type(self.fs).__name__,
                self.display(),
            )
            if self.exists(rel):
                return False
            self.fs.pipe_file(self.path(rel), data)
            return True

    def delete(self, rel: str) -> None:
        """Remove ``rel`` (no error if it is absent)."""
        if self.local_path is not None:
            (self.local_path / rel).unlink(missing_ok=True)
            return
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ zarr
    def zarr_store(self, *, read_only: bool) -> Any:
        """A zarr store over this location (zarr's own fsspec store for URLs)."""
        if self.local_path is not None:
            from zarr.storage import LocalStore

            return LocalStore(str(self.local_path), read_only=read_only)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            self.url, storage_options=self.storage_options, read_only=read_only
        )
