"""Text corpora: a Hugging Face dataset, local files/folders, or the bundled offline text.

Every source yields documents (strings) in a deterministic order. ``describe()`` gives the
JSON-able identity recorded in a store's provenance.

- ``bundled``: real English text from the pip-installed ``gensim`` test data: the English
  Wikipedia excerpt (redirect pages dropped, markup removed with ``filter_wiki``) followed by
  the Lee news corpus (``lee_background.cor`` then ``lee.cor``, one article per line), about
  0.8M tokens.
- a local ``.txt`` file (one document per file), ``.jsonl`` (one record per line, text in
  ``field``), ``.parquet`` (column ``field``, needs pyarrow), or a folder holding such files
  (recursively, in sorted path order).
- anything else is a Hugging Face dataset id, streamed with ``datasets`` (``pip install
  masksae[hub]``), e.g. ``monology/pile-uncopyrighted`` with filter
  ``meta.pile_set_name=Pile-CC``.

Filters are ``key=value`` strings (dotted keys reach into nested records); a record is kept
when every filter matches.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masksae.errors import CorpusError

OFFLINE_HINT = "offline? use --corpus bundled or a local path"
BUNDLED = "bundled"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_FILES = ("lee_background.cor", "lee.cor")


@dataclass(frozen=True)
class CorpusSpec:
    """Where documents come from."""

    source: str = BUNDLED
    """"bundled", a local file/folder, or a Hugging Face dataset id."""
    field: str = "text"
    """Record field holding the text (jsonl, parquet, Hugging Face datasets)."""
    filters: tuple[str, ...] = ()
    """``key=value`` conditions a record must meet (jsonl, parquet, Hugging Face datasets)."""
    split: str = "train"
    """Dataset split (Hugging Face datasets)."""


def parse_filters(filters: Sequence[str]) -> list[tuple[list[str], str]]:
    """``["a.b=c"]`` -> ``[(["a", "b"], "c")]``; ConfigError-like CorpusError when malformed."""
    parsed = []
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CorpusError(
                f"corpus filter {item!r} is malformed: expected key=value, "
                "e.g. --corpus-filter pile_set_name=Pile-CC"
            )
        parsed.append((key.strip().split("."), value))
    return parsed


def _matches(record: dict[str, Any], filters: list[tuple[list[str], str]]) -> bool:
    for keys, expected in filters:
        value: Any = record
        for key in keys:
            if isinstance(value, str):  # some datasets store `meta` as a JSON string
                try:
                    value = json.loads(value)
                except ValueError:
                    return False
            if not isinstance(value, dict) or key not in value:
                return False
            value = value[key]
        if str(value) != expected:
            return False
    return True


def _text_of(record: dict[str, Any], field_name: str, where: str) -> str:
    if field_name not in record:
        raise CorpusError(
            f"{where}: record has no field {field_name!r} (fields: {sorted(record)[:20]}): "
            "choose the text field with --corpus-field"
        )
    value = record[field_name]
    return value if isinstance(value, str) else str(value)


class Corpus:
    """An iterable of documents from a :class:`CorpusSpec`."""

    def __init__(self, spec: CorpusSpec) -> None:
        self.spec = spec
        self._filters = parse_filters(spec.filters)
        self.kind = self._kind()

    def _kind(self) -> str:
        if self.spec.source == BUNDLED:
            return "bundled"
        path = Path(self.spec.source).expanduser()
        if path.exists():
            if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
                raise CorpusError(
                    f"corpus file {self.spec.source!r} has unsupported type {path.suffix!r}: "
                    f"expected one of {list(LOCAL_SUFFIXES)}"
                )
            return "local"
        if self.spec.source.startswith((".", "/", "~")) or self.spec.source.endswith(
            LOCAL_SUFFIXES
        ):
            raise CorpusError(f"corpus path {self.spec.source!r} does not exist ({OFFLINE_HINT})")
        return "hub"

    # ------------------------------------------------------------------ identity
    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the corpus for provenance."""
        info: dict[str, Any] = {
            "source": self.spec.source,
            "kind": self.kind,
            "field": self.spec.field,
            "filters": list(self.spec.filters),
            "split": self.spec.split,
        }
        if self.kind == "bundled":
            import gensim

            info["revision"] = f"gensim-{gensim.__version__}"
            info["files"] = [_WIKI_FILE, *_LEE_FILES]
        elif self.kind == "local":
            digest = hashlib.sha256()
            for path in self._local_files():
                digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            info["revision"] = "local:" + digest.hexdigest()[:16]
        return info

    # ------------------------------------------------------------------ documents
    def __iter__(self) -> Iterator[str]:
        if self.kind == "bundled":
            yield from _bundled_documents()
        elif self.kind == "local":
            for path in self._local_files():
                yield from self._local_documents(path)
        else:
            yield from self._hub_documents()

    def _local_files(self) -> list[Path]:
        root = Path(self.spec.source).expanduser()
        if root.is_file():
            return [root]
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise CorpusError(
                f"corpus folder {self.spec.source!r} holds no {'/'.join(LOCAL_SUFFIXES)} files"
            )
        return files

    def _local_documents(self, path: Path) -> Iterator[str]:
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as exc:
                        raise CorpusError(f"{path}:{lineno} is not valid JSON: {exc}") from None
                    if _matches(record, self._filters):
                        yield _text_of(record, self.spec.field, f"{path}:{lineno}")
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise CorpusError(f"reading {path} needs pyarrow: pip install pyarrow") from None
            table = pq.read_table(path)
            for record in table.to_pylist():
                if _matches(record, self._filters):
                    yield _text_of(record, self.spec.field, str(path))

    def _hub_documents(self) -> Iterator[str]:
        source = self.spec.source
        try:
            import datasets
        except ImportError:
            raise CorpusError(
                f"corpus {source!r} looks like a Hugging Face dataset id, which needs the "
                f"`datasets` package: pip install 'masksae[hub]' ({OFFLINE_HINT})"
            ) from None
        try:
            dataset = datasets.load_dataset(source, split=self.spec.split, streaming=True)
            iterator = iter(dataset)
        except Exception as exc:  # connection, not found, offline mode ...
            raise CorpusError(
                f"cannot open Hugging Face dataset {source!r} (split {self.spec.split!r}): "
                f"{type(exc).__name__}: {str(exc)[:200]} ({OFFLINE_HINT})"
            ) from exc
        while True:
            try:
                record = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                raise CorpusError(
                    f"reading Hugging Face dataset {source!r} failed: {type(exc).__name__}: "
                    f"{str(exc)[:200]} ({OFFLINE_HINT})"
                ) from exc
            if _matches(record, self._filters):
                yield _text_of(record, self.spec.field, f"dataset {source!r}")


def _gensim_test_data() -> Path:
    try:
        import gensim
    except ImportError:
        raise CorpusError("the bundled corpus needs gensim: pip install gensim") from None
    folder = Path(gensim.__file__).parent / "test" / "test_data"
    if not (folder / _WIKI_FILE).is_file():
        raise CorpusError(
            f"gensim at {folder.parent.parent} lacks its test data ({_WIKI_FILE}): "
            "reinstall gensim from PyPI (pip install --force-reinstall gensim)"
        )
    return folder


_BLANK_RUNS = re.compile(r"\n\s*\n+")


def _bundled_documents() -> Iterator[str]:
    yield from _bundled_texts()


@functools.lru_cache(maxsize=1)
def _bundled_texts() -> tuple[str, ...]:
    """The cleaned bundled documents (~3.5 MB of text), parsed once per process."""
    return tuple(_read_bundled())


def _read_bundled() -> Iterator[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    folder = _gensim_test_data()
    with bz2.open(folder / _WIKI_FILE) as fh:
        for _title, text, _pageid in extract_pages(fh):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            clean = _BLANK_RUNS.sub("\n\n", filter_wiki(text)).strip()
            if len(clean) > 200:
                yield clean
    for name in _LEE_FILES:
        with (folder / name).open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    yield line.strip()
