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
when every filter matches. They apply to records (jsonl, parquet, Hub datasets) only: a
corpus holding ``.txt`` files, or the bundled one, refuses them.

Records whose text field is null are skipped and counted (``Corpus.stats``); a text field
holding anything else but a string is refused. Local files are decoded as UTF-8: undecodable
bytes become U+FFFD with a warning naming the file and the count, and a ``.txt`` file that is
mostly not text (undecodable or control bytes) is refused unless ``allow_undecodable``.

A local corpus's ``revision`` is a SHA-256 over the relative path, size and bytes of every
file, computed once per ``Corpus`` (so an edit that keeps the size is a different corpus).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masksae.errors import CorpusError

log = logging.getLogger(__name__)

OFFLINE_HINT = "offline? use --corpus bundled or a local path"
BUNDLED = "bundled"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_FILES = ("lee_background.cor", "lee.cor")
#: a .txt file with more than this fraction of undecodable or control bytes is not text
MAX_BINARY_FRACTION = 0.3
_CONTROL_DELETE = bytes(sorted(set(range(32)) - {9, 10, 11, 12, 13} | {127}))
_SURROGATES = re.compile("[\udc80-\udcff]")


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
    allow_undecodable: bool = False
    """Harvest ``.txt`` files that are mostly not UTF-8 text anyway (bytes -> U+FFFD)."""
    revision: str | None = None
    """Hugging Face datasets: the dataset revision (commit sha, tag or branch) to stream;
    None follows the Hub's default branch (not reproducible)."""
    config_name: str | None = None
    """Hugging Face datasets: the dataset configuration (``name=`` of load_dataset), e.g.
    ``wikitext-103-raw-v1``; None = the dataset's default."""


@dataclass
class CorpusStats:
    """What the last pass over a corpus met besides documents."""

    documents: int = 0
    """Documents yielded."""
    null_texts: int = 0
    """Records whose text field was null (skipped)."""
    undecodable_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes replaced by U+FFFD, per local file that had any."""


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


def _matches(record: Any, filters: list[tuple[list[str], str]]) -> bool:
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


def _text_of(record: dict[str, Any], field_name: str, where: str) -> str | None:
    """The record's text; None when the field is null (the caller skips and counts it)."""
    if not isinstance(record, dict):
        raise CorpusError(
            f"{where}: record is a JSON {type(record).__name__}, expected an object with a "
            f"{field_name!r} field: one JSON object per line"
        )
    if field_name not in record:
        raise CorpusError(
            f"{where}: record has no field {field_name!r} (fields: {sorted(record)[:20]}): "
            "choose the text field with --corpus-field"
        )
    value = record[field_name]
    if value is None or isinstance(value, str):
        return value
    raise CorpusError(
        f"{where}: field {field_name!r} holds a {type(value).__name__} "
        f"({str(value)[:40]!r}), expected a string: choose the text field with --corpus-field"
    )


def _decode(data: bytes) -> tuple[str, int]:
    """UTF-8 text of ``data`` with undecodable bytes as U+FFFD, and how many there were."""
    text = data.decode("utf-8", errors="surrogateescape")
    bad = len(_SURROGATES.findall(text))
    return (_SURROGATES.sub("\ufffd", text) if bad else text), bad


class Corpus:
    """An iterable of documents from a :class:`CorpusSpec`."""

    def __init__(self, spec: CorpusSpec) -> None:
        self.spec = spec
        self._filters = parse_filters(spec.filters)
        self.kind = self._kind()
        self.stats = CorpusStats()
        self._revision: str | None = None
        self._warned: set[str] = set()
        if self._filters:
            self._check_filters_apply()
        if self.kind == "hub":
            _require_datasets(spec.source)
        elif spec.revision is not None or spec.config_name is not None:
            raise CorpusError(
                f"--dataset-revision / --dataset-config apply to Hugging Face datasets only, "
                f"not to the {self.kind} corpus {spec.source!r}: drop them"
            )

    def _check_filters_apply(self) -> None:
        """Refuse --corpus-filter where there are no records to filter (it would be ignored)."""
        if self.kind == "bundled":
            where = "the bundled corpus (plain text, no record fields)"
        elif self.kind == "local":
            txt = [p for p in self._local_files() if p.suffix == ".txt"]
            if not txt:
                return
            where = f"{str(txt[0])!r} (a .txt file is one document, with no record fields)"
        else:
            return
        raise CorpusError(
            f"--corpus-filter {list(self.spec.filters)} cannot apply to {where}: filters "
            "select jsonl/parquet records and Hub dataset rows; drop --corpus-filter"
        )

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
            from importlib.metadata import version

            # the installed distribution's version, without importing gensim (~1 s: scipy)
            info["revision"] = f"gensim-{version('gensim')}"
            info["files"] = [_WIKI_FILE, *_LEE_FILES]
        elif self.kind == "local":
            info["revision"] = self.content_revision()
            info["revision_covers"] = "relative path, size and bytes of every corpus file"
        else:  # only when given: stores made before these options keep their provenance
            if self.spec.revision is not None:
                info["revision"] = self.spec.revision
            if self.spec.config_name is not None:
                info["config"] = self.spec.config_name
        return info

    def content_revision(self) -> str:
        """``sha256:<16 hex>`` over each local file's relative path, size and bytes (streamed,
        computed once per Corpus)."""
        if self._revision is None:
            root = Path(self.spec.source).expanduser()
            digest = hashlib.sha256()
            for path in self._local_files():
                rel = path.name if root.is_file() else path.relative_to(root).as_posix()
                digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
                with path.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
            self._revision = "sha256:" + digest.hexdigest()[:16]
        return self._revision

    # ------------------------------------------------------------------ documents
    def __iter__(self) -> Iterator[str]:
        self.stats = stats = CorpusStats()  # each pass counts afresh
        if self.kind == "bundled":
            docs: Iterator[str | None] = iter(_bundled_documents())
        elif self.kind == "local":
            docs = (doc for path in self._local_files() for doc in self._local_documents(path))
        else:
            docs = self._hub_documents()
        for doc in docs:
            if doc is None:
                if stats.null_texts == 0 and "null" not in self._warned:
                    self._warned.add("null")
                    log.warning(
                        "corpus %s: records with a null %r field are skipped (counted in the "
                        "harvest summary)",
                        self.spec.source,
                        self.spec.field,
                    )
                stats.null_texts += 1
                continue
            stats.documents += 1
            yield doc

    def _undecodable(self, path: Path, bad: int, total: int) -> None:
        """Record (and warn once per file about) ``bad`` undecodable bytes of ``path``."""
        if bad == 0:
            return
        self.stats.undecodable_bytes[str(path)] = bad
        if str(path) not in self._warned:
            self._warned.add(str(path))
            log.warning(
                "corpus file %s is not valid UTF-8: %d of its %d bytes could not be decoded "
                "and were replaced by U+FFFD",
                path,
                bad,
                total,
            )

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

    def _local_documents(self, path: Path) -> Iterator[str | None]:
        if path.suffix == ".txt":
            data = path.read_bytes()
            text, bad = _decode(data)
            binary = bad + len(data) - len(data.translate(None, _CONTROL_DELETE))
            if (
                data
                and binary / len(data) > MAX_BINARY_FRACTION
                and not self.spec.allow_undecodable
            ):
                raise CorpusError(
                    f"corpus file {str(path)!r} does not look like text: {binary} of its "
                    f"{len(data)} bytes ({binary / len(data):.0%}) are undecodable as UTF-8 or "
                    "control bytes; remove it from the corpus, convert it to UTF-8, or pass "
                    "--corpus-allow-undecodable to harvest it with U+FFFD replacements"
                )
            self._undecodable(path, bad, len(data))
            if text.strip():
                yield text
        elif path.suffix == ".jsonl":
            bad_total = size = 0
            with path.open("rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    size += len(raw)
                    line, bad = _decode(raw)
                    bad_total += bad
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as exc:
                        raise CorpusError(f"{path}:{lineno} is not valid JSON: {exc}") from None
                    if _matches(record, self._filters):
                        yield _text_of(record, self.spec.field, f"{path}:{lineno}")
            self._undecodable(path, bad_total, size)
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
        _require_datasets(source)
        import datasets

        from masksae.hub_access import probe_hub

        unreachable = probe_hub(source, "dataset")
        if unreachable is not None:  # streaming needs the Hub: no point in retrying
            raise CorpusError(
                f"cannot stream Hugging Face dataset {source!r}: the Hub is unreachable "
                f"({unreachable}) ({OFFLINE_HINT})"
            )
        try:
            # name / revision only when given (the Hub defaults otherwise)
            extra: dict[str, Any] = {}
            if self.spec.config_name is not None:
                extra["name"] = self.spec.config_name
            if self.spec.revision is not None:
                extra["revision"] = self.spec.revision
            dataset = datasets.load_dataset(source, split=self.spec.split, streaming=True, **extra)
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


def _require_datasets(source: str) -> None:
    """CorpusError unless ``datasets`` can be imported (checked up front, before the LLM is
    loaded; a test's stand-in module in sys.modules counts)."""
    import importlib.util
    import sys

    if sys.modules.get("datasets") is not None:
        return
    try:
        found = importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise CorpusError(
            f"corpus {source!r} looks like a Hugging Face dataset id, which needs the "
            f"`datasets` package: pip install 'masksae[hub]' ({OFFLINE_HINT})"
        )


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
