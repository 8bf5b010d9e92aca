"""Held-out evaluation text read through the harvest stage's Corpus API."""

from __future__ import annotations

import itertools
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from masksae.errors import ConfigError, CorpusError
from masksae.evaluate import texts
from masksae.evaluate.data import EvalDataConfig, eval_documents, key_fields, pack_sequences


class _Recorder:
    """Iterable wrapper remembering every document handed out."""

    def __init__(self, docs):
        self._docs = docs
        self.seen: list[str] = []

    def __iter__(self):
        for d in self._docs:
            self.seen.append(d)
            yield d


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _harvest_touched(tokenizer, corpus_source: str, tokens: int, context: int) -> set[str]:
    """Documents a harvest of ``tokens`` tokens reads (harvest's own packer; read-ahead
    included, so this over-approximates)."""
    from masksae.harvest import Corpus, CorpusSpec
    from masksae.harvest import pack_sequences as harvest_pack

    rec = _Recorder(Corpus(CorpusSpec(source=corpus_source)))
    n_seq = -(-tokens // context)
    got = list(itertools.islice(harvest_pack(rec, tokenizer, context), n_seq))
    assert len(got) == n_seq
    return set(rec.seen)


def _eval_consumed(tokenizer, cfg: EvalDataConfig) -> tuple[set[str], int]:
    rec = _Recorder(eval_documents(cfg, tokenizer))
    lm = SimpleNamespace(tokenizer=tokenizer, prepend_bos=False)
    ids = pack_sequences(lm, rec, cfg.n_tokens, cfg)
    return set(rec.seen), ids.numel()


def _smollm_dir() -> Path:
    from masksae.models.bundled import resolve_bundled

    path, _ = resolve_bundled("bundled:smollm2-135m")  # builds the cache on a fresh machine
    return path


@pytest.mark.parametrize("which", ["smollm2", "tiny"])
def test_bundled_eval_text_is_disjoint_from_default_harvest(which, tiny_model_dir):
    from masksae.harvest import HarvestConfig, resolve_context_length

    tok = _tokenizer(_smollm_dir() if which == "smollm2" else tiny_model_dir)
    default = HarvestConfig(out="unused")
    context = resolve_context_length(default.context_length, None, bundled=True)
    harvest = _harvest_touched(tok, "bundled", default.tokens, context)
    cfg = EvalDataConfig()  # defaults: bundled, 16384 tokens, context 128, tail mode
    evald, n_ids = _eval_consumed(tok, cfg)
    assert n_ids >= cfg.n_tokens  # the default evaluation gets all its tokens
    assert harvest and evald
    assert not harvest & evald, f"{len(harvest & evald)} documents shared"
    # the evaluation text is the end of the corpus, its last document first
    from masksae.harvest import Corpus, CorpusSpec

    all_docs = list(Corpus(CorpusSpec("bundled")))
    first_eval = next(iter(eval_documents(cfg, tok)))
    assert first_eval == all_docs[-1]


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    with path.open("w") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"body": d, "meta": {"keep": "y" if i % 2 == 0 else "n"}}) + "\n")
    return path


def test_local_jsonl_tail_and_filters(tmp_path, tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    docs = [f"document number {i} " + "word " * (i % 7 + 3) for i in range(40)]
    path = _write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = EvalDataConfig(corpus=str(path), corpus_field="body", n_tokens=50, context_length=16)
    got = list(eval_documents(cfg, tok))
    assert got == docs[::-1]  # small corpus: all of it fits the tail budget, last first
    cfg = EvalDataConfig(
        corpus=str(path),
        corpus_field="body",
        corpus_filter=("meta.keep=y",),
        n_tokens=50,
        context_length=16,
    )
    assert list(eval_documents(cfg, tok)) == docs[::2][::-1]
    # the corpus settings are part of the cache key
    assert key_fields("m", "r", 1, cfg) != key_fields(
        "m",
        "r",
        1,
        EvalDataConfig(corpus=str(path), corpus_field="body", n_tokens=50, context_length=16),
    )


def test_tail_documents_bounds_memory():
    docs = ["a" * 10, "b" * 10, "c" * 10, "d" * 10]
    assert texts.tail_documents(docs, 25) == ["d" * 10, "c" * 10]
    assert texts.tail_documents(docs, 5) == ["d" * 10]  # at least one document
    assert texts.tail_documents(docs, 1000) == docs[::-1]


def test_skip_tokens_known_answer_and_disjoint_from_harvest(tmp_path, tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    docs = [f"doc {i} " + "the cat sat " * (i % 5 + 1) for i in range(60)]
    path = _write_jsonl(tmp_path / "c.jsonl", docs)
    lengths = [len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"]]
    skip = 200
    cum = list(itertools.accumulate([0, *lengths]))  # cum[i] = text tokens before doc i
    first = next(i for i, c in enumerate(cum) if c >= skip)
    cfg = EvalDataConfig(
        corpus=str(path), corpus_field="body", skip_tokens=skip, n_tokens=50, context_length=16
    )
    got = list(eval_documents(cfg, tok))
    assert got == docs[first:]
    # a harvest of `skip` tokens (its own packer, separators counted) reads none of them
    rec = _Recorder(docs)
    from masksae.harvest import pack_sequences as harvest_pack

    list(itertools.islice(harvest_pack(rec, tok, 16, docs_per_batch=1), skip // 16))
    assert not set(rec.seen) & set(got)
    with pytest.raises(CorpusError, match="ended within"):
        list(
            eval_documents(
                EvalDataConfig(
                    corpus=str(path),
                    corpus_field="body",
                    skip_tokens=10**7,
                    n_tokens=50,
                    context_length=16,
                ),
                tok,
            )
        )


def test_hub_dataset_goes_through_corpus_and_skips(monkeypatch, tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    records = [{"text": f"hub record {i} with some words"} for i in range(30)]
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter(records)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    lengths = [
        len(ids) for ids in tok([r["text"] for r in records], add_special_tokens=False)["input_ids"]
    ]
    monkeypatch.setattr(texts, "HUB_SKIP_TOKENS", sum(lengths[:3]))  # exactly 3 records
    cfg = EvalDataConfig(
        corpus="someone/dataset", corpus_split="validation", n_tokens=20, context_length=8
    )
    got = list(eval_documents(cfg, tok))
    assert calls == [("someone/dataset", "validation", True)]
    assert got[0] == records[3]["text"] and got[-1] == records[-1]["text"]
    assert got == [r["text"] for r in records[3:]]
    # skip_tokens=0 (a held-out split) reads from the first record
    cfg0 = EvalDataConfig(corpus="someone/dataset", skip_tokens=0, n_tokens=20, context_length=8)
    assert next(iter(eval_documents(cfg0, tok))) == records[0]["text"]


def test_clear_errors(tmp_path, tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    with pytest.raises(CorpusError, match="does not exist"):
        eval_documents(EvalDataConfig(corpus=str(tmp_path / "nope.jsonl")), tok)
    with pytest.raises(ConfigError, match="skip_tokens"):
        EvalDataConfig(skip_tokens=-1)
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(CorpusError):
        list(eval_documents(EvalDataConfig(corpus=str(tmp_path / "empty.txt")), tok))
