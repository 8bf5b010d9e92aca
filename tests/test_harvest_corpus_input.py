"""Corpus input hardening: null and non-string text fields, content revision, non-UTF-8
files, filters where there are no records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from masksae.errors import CorpusError
from masksae.harvest.corpus import Corpus, CorpusSpec
from masksae.harvest.runner import HarvestResult


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- null / non-string
def test_null_text_fields_are_skipped_and_counted(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "alpha"}, {"text": None}, {"text": "beta"}, {"text": None}],
    )
    corpus = Corpus(CorpusSpec(str(path)))
    with caplog.at_level(logging.WARNING, logger="masksae.harvest.corpus"):
        docs = list(corpus)
    assert docs == ["alpha", "beta"]  # never the document "None"
    assert corpus.stats.null_texts == 2 and corpus.stats.documents == 2
    assert sum("null 'text' field" in r.getMessage() for r in caplog.records) == 1
    assert list(corpus) == ["alpha", "beta"] and corpus.stats.null_texts == 2  # per pass


def test_null_texts_in_parquet_are_skipped(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", None, "two"]}), path)
    corpus = Corpus(CorpusSpec(str(path)))
    assert list(corpus) == ["one", "two"] and corpus.stats.null_texts == 1


@pytest.mark.parametrize(
    "record, match",
    [
        ({"text": 42}, r"field 'text' holds a int \('42'\), expected a string"),
        ({"text": ["a", "b"]}, r"holds a list"),
        ({"text": {"x": 1}}, r"holds a dict"),
        (["not", "an", "object"], r"record is a JSON list, expected an object"),
    ],
)
def test_non_string_text_fields_are_refused(tmp_path, record, match):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, record])
    with pytest.raises(CorpusError, match=match + r".*(--corpus-field|one JSON object)"):
        list(Corpus(CorpusSpec(str(path))))


def test_summary_names_skipped_nulls_and_undecodable_bytes():
    result = HarvestResult(Path("s"), 10, 10, 1, 0, 1.0, 0.3, 0, 3, 7)
    line = result.summary()
    assert "3 corpus records with a null text skipped" in line
    assert "7 undecodable corpus bytes replaced by U+FFFD" in line
    assert "null" not in HarvestResult(Path("s"), 10, 10, 1, 0, 1.0, 0.3).summary()


# ---------------------------------------------------------------------------- revision
def test_local_revision_hashes_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, word in ((a, "cat"), (b, "dog")):  # same names, same sizes, other text
        folder.mkdir()
        (folder / "doc.txt").write_text(f"the {word} sat\n")
    rev_a = Corpus(CorpusSpec(str(a))).describe()["revision"]
    rev_b = Corpus(CorpusSpec(str(b))).describe()["revision"]
    assert rev_a.startswith("sha256:") and rev_a != rev_b
    assert Corpus(CorpusSpec(str(a))).describe()["revision"] == rev_a  # deterministic
    # a same-size edit of one file is a different corpus
    (a / "doc.txt").write_text("the bat sat\n")
    assert Corpus(CorpusSpec(str(a))).describe()["revision"] != rev_a
    # the relative path counts: the same file moved into a sub-folder
    (b / "sub").mkdir()
    (b / "doc.txt").rename(b / "sub" / "doc.txt")
    assert Corpus(CorpusSpec(str(b))).describe()["revision"] != rev_b
    assert "bytes" in Corpus(CorpusSpec(str(b))).describe()["revision_covers"]


# ---------------------------------------------------------------------------- non-UTF-8
def test_latin1_text_is_read_with_a_warning_naming_the_count(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème brûlée, naïve façade\n".encode("latin-1"))
    corpus = Corpus(CorpusSpec(str(path)))
    with caplog.at_level(logging.WARNING, logger="masksae.harvest.corpus"):
        (doc,) = list(corpus)
        list(corpus)  # a second pass does not warn again
    assert doc.count("\ufffd") == 6 and doc.startswith("caf\ufffd cr\ufffdme")
    assert corpus.stats.undecodable_bytes == {str(path): 6}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "latin1.txt" in warnings[0] and "6 of its 32 bytes" in warnings[0]


def test_jsonl_with_invalid_utf8_is_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe byte"}\n')
    corpus = Corpus(CorpusSpec(str(path)))
    with caplog.at_level(logging.WARNING, logger="masksae.harvest.corpus"):
        docs = list(corpus)
    assert docs == ["ok", "bad \ufffd\ufffd byte"]
    assert corpus.stats.undecodable_bytes == {str(path): 2}
    assert any("2 of its" in r.getMessage() for r in caplog.records)


def test_binary_file_with_a_text_suffix_is_refused_unless_forced(tmp_path):
    import numpy as np

    path = tmp_path / "image.txt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(CorpusError, match=r"image.txt' does not look like text: .*--corpus-allow"):
        list(Corpus(CorpusSpec(str(path))))
    (doc,) = list(Corpus(CorpusSpec(str(path), allow_undecodable=True)))
    assert "\ufffd" in doc


def test_harvest_refuses_a_binary_corpus_before_creating_the_store(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from masksae.cli import app

    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    res = CliRunner().invoke(
        app,
        [
            "harvest",
            "--model",
            str(tiny_model_dir),
            "--corpus",
            str(binary),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert res.exit_code == 2 and "does not look like text" in res.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- filters
def test_filters_are_refused_where_there_are_no_records(tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("some text\n")
    with pytest.raises(CorpusError, match=r"--corpus-filter \['a=b'\] cannot apply to .*doc.txt"):
        Corpus(CorpusSpec(str(txt), filters=("a=b",)))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "r.jsonl", [{"text": "x", "a": "b"}])
    (mixed / "z.txt").write_text("plain\n")
    with pytest.raises(CorpusError, match=r"z.txt.*drop --corpus-filter"):
        Corpus(CorpusSpec(str(mixed), filters=("a=b",)))
    with pytest.raises(CorpusError, match="the bundled corpus"):
        Corpus(CorpusSpec("bundled", filters=("a=b",)))
    # records: the filter applies
    only = tmp_path / "only.jsonl"
    write_jsonl(only, [{"text": "x", "a": "b"}, {"text": "y", "a": "c"}])
    assert list(Corpus(CorpusSpec(str(only), filters=("a=b",)))) == ["x"]
