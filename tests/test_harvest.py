"""masksae.harvest: masking, packing, corpora, validation and a tiny end-to-end harvest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from masksae.errors import ConfigError, CorpusError, ModelError, ProvenanceMismatchError
from masksae.harvest import (
    Corpus,
    CorpusSpec,
    HarvestConfig,
    mask_draw,
    mask_sequences,
    pack_sequences,
    plan_harvest,
    resolve_mask_token,
    run_harvest,
)
from masksae.harvest.masking import special_token_ids, validate_mask_prob
from masksae.harvest.tokenize import resolve_context_length
from masksae.models import load_model

WORDS = (
    "the cat sat on a mat while dogs ran far away into green hills and rivers of light "
    "under skies made from numbers like seven eleven forty two"
).split()


def write_jsonl(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as fh:
        for i in range(n_docs):
            words = rng.choice(WORDS, size=int(rng.integers(5, 60)))
            kind = "web" if i % 3 else "books"
            fh.write(json.dumps({"text": " ".join(words), "meta": {"set": kind}}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def tiny_gemma(tiny_gemma_dir):
    return load_model(str(tiny_gemma_dir), device="cpu")


@pytest.fixture()
def corpus_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl")


# ---------------------------------------------------------------------------- masking
def test_mask_rate_within_binomial_bounds_and_specials_untouched():
    rng = np.random.default_rng(1)
    n_seq, length, p, mask_id = 400, 128, 0.3, 9
    specials = np.array([0, 1, 2, 3])
    ids = rng.integers(10, 500, size=(n_seq, length)).astype(np.int32)
    special_pos = rng.random((n_seq, length)) < 0.05
    ids[special_pos] = rng.choice(specials, size=int(special_pos.sum()))
    out, masked, excluded = mask_sequences(
        ids, np.arange(n_seq), seed=3, p=p, mask_id=mask_id, special_ids=specials
    )
    eligible = ~special_pos
    eligible[:, 0] = False
    n = int(eligible.sum())
    k = int(masked.sum())
    assert abs(k - n * p) < 4 * np.sqrt(n * p * (1 - p))
    assert not masked[:, 0].any() and not masked[special_pos].any()
    assert np.array_equal(excluded, special_pos | (np.arange(length) == 0)[None, :])
    assert np.array_equal(out[masked], np.full(k, mask_id))
    assert np.array_equal(out[~masked], ids[~masked])  # specials and position 0 untouched
    assert out.dtype == np.int32


def test_mask_is_pure_function_of_seed_and_sequence_index():
    ids = np.random.default_rng(0).integers(10, 500, size=(12, 64)).astype(np.int32)
    kw = dict(seed=5, p=0.4, mask_id=7, special_ids=np.array([0, 1]))
    whole, masked_all, _ = mask_sequences(ids, np.arange(100, 112), **kw)
    # different batching / order / workers give the same per-sequence masks
    parts = [
        mask_sequences(ids[i : i + 5], np.arange(100 + i, 100 + min(i + 5, 12)), **kw)[0]
        for i in range(0, 12, 5)
    ]
    assert np.array_equal(np.concatenate(parts), whole)
    rev = mask_sequences(ids[::-1], np.arange(111, 99, -1), **kw)[0]
    assert np.array_equal(rev[::-1], whole)
    assert np.array_equal(mask_draw(5, 103, 64, 0.4), mask_draw(5, 103, 64, 0.4))
    assert not np.array_equal(mask_draw(5, 103, 64, 0.4), mask_draw(6, 103, 64, 0.4))
    assert not np.array_equal(mask_draw(5, 103, 64, 0.4), mask_draw(5, 104, 64, 0.4))
    plain, masked0, _ = mask_sequences(
        ids, np.arange(12), seed=5, p=0.0, mask_id=7, special_ids=np.array([0, 1])
    )
    assert np.array_equal(plain, ids) and not masked0.any()


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, True])
def test_mask_prob_out_of_range(p):
    with pytest.raises(ConfigError, match="0 <= p < 1"):
        validate_mask_prob(p)


def test_mask_token_resolution(tiny_lm):
    tok = tiny_lm.tokenizer
    mask_id, string = resolve_mask_token(tok, "...", None, len(tok))
    assert tok.encode("...", add_special_tokens=False) == [mask_id] and string == "..."
    with pytest.raises(ConfigError, match=r"encodes to \d+ tokens \[.*--mask-token-id"):
        resolve_mask_token(tok, "elephants dancing", None, len(tok))
    assert resolve_mask_token(tok, "ignored words", 42, len(tok))[0] == 42
    with pytest.raises(ConfigError, match="out of range"):
        resolve_mask_token(tok, "...", len(tok), len(tok))
    with pytest.raises(ConfigError, match="special"):
        resolve_mask_token(tok, "...", tok.eos_token_id, len(tok))
    assert set(special_token_ids(tok).tolist()) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------- packing
def test_packing_eos_separators(tiny_lm):
    tok = tiny_lm.tokenizer
    docs = ["the cat sat on a mat", "dogs ran far away", "green hills and rivers of light"] * 5
    seqs = list(pack_sequences(docs, tok, 16, prepend_bos=False, docs_per_batch=4))
    stream = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    assert len(seqs) == len(stream) // 16
    assert all(s.shape == (16,) and s.dtype == np.int32 for s in seqs)
    assert np.array_equal(np.concatenate(seqs), np.asarray(stream[: 16 * len(seqs)]))


def test_packing_bos_for_gemma(tiny_gemma):
    tok = tiny_gemma.tokenizer
    assert tiny_gemma.prepend_bos
    docs = ["the cat sat on a mat", "dogs ran far away"] * 6
    seqs = list(pack_sequences(docs, tok, 12, prepend_bos=True))
    stream = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    assert all(s[0] == tok.bos_token_id for s in seqs)
    body = np.concatenate([s[1:] for s in seqs])
    assert np.array_equal(body, np.asarray(stream[: 11 * len(seqs)]))
    assert tok.bos_token_id not in body


def test_context_length_rules():
    assert resolve_context_length(None, 256, bundled=False) == 256
    assert resolve_context_length(None, 8192, bundled=False) == 1024
    assert resolve_context_length(None, 8192, bundled=True) == 128
    with pytest.raises(ModelError, match="allows \\(256 positions\\).*--context-length 256"):
        resolve_context_length(512, 256, bundled=False)


# ---------------------------------------------------------------------------- corpora
def test_local_corpora(tmp_path, corpus_file):
    docs = list(Corpus(CorpusSpec(str(corpus_file))))
    assert len(docs) == 60
    books = list(Corpus(CorpusSpec(str(corpus_file), filters=("meta.set=books",))))
    assert len(books) == 20 and books == docs[0::3]
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second doc")
    (folder / "a.txt").write_text("first doc")
    (folder / "sub" / "c.txt").write_text("third doc")
    assert list(Corpus(CorpusSpec(str(folder)))) == ["first doc", "second doc", "third doc"]
    with pytest.raises(CorpusError, match="no field 'body'"):
        list(Corpus(CorpusSpec(str(corpus_file), field="body")))
    with pytest.raises(CorpusError, match="key=value"):
        Corpus(CorpusSpec(str(corpus_file), filters=("nonsense",)))
    with pytest.raises(CorpusError, match="does not exist.*--corpus bundled"):
        Corpus(CorpusSpec(str(tmp_path / "missing.jsonl")))


def test_bundled_corpus_is_real_english_and_deterministic():
    import itertools

    first = list(itertools.islice(Corpus(CorpusSpec("bundled")), 3))
    again = list(itertools.islice(Corpus(CorpusSpec("bundled")), 3))
    assert first == again
    assert first[0].startswith("Anarchism") or "anarch" in first[0].lower()
    assert all(len(d) > 200 and "[[" not in d for d in first)
    assert Corpus(CorpusSpec("bundled")).describe()["revision"].startswith("gensim-")


def test_hub_corpus_without_datasets_or_offline(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not importable, installed or not
    # refused when the corpus is made (before any model is loaded), not when first read
    with pytest.raises(CorpusError, match=r"masksae\[hub\].*offline\? use --corpus bundled"):
        Corpus(CorpusSpec("monology/pile-uncopyrighted", filters=("x=y",)))


# ---------------------------------------------------------------------------- harvest runs
def _cfg(out: Path, model_dir: Path, corpus: Path, **kw) -> HarvestConfig:
    base = dict(
        out=str(out),
        model=str(model_dir),
        layer=1,
        corpus=str(corpus),
        tokens=1000,
        mask_prob=0.3,
        context_length=32,
        batch_size=4,
        chunk_sequences=8,
        device="cpu",
        seed=1,
    )
    base.update(kw)
    return HarvestConfig(**base)


def test_tiny_harvest_store_contents(tmp_path, tiny_lm, tiny_model_dir, corpus_file):
    import torch

    from masksae.models import capture_resid_post
    from masksae.storage import ActivationStore

    cfg = _cfg(tmp_path / "store", tiny_model_dir, corpus_file)
    result = run_harvest(cfg, lm=tiny_lm, progress=False)
    assert result.total_tokens == 1024 and result.n_chunks == 4 and result.skipped_chunks == 0
    store = ActivationStore.open(tmp_path / "store")
    assert store.n_tokens == 1024 and store.d_model == 32 and store.is_complete
    prov = store.provenance
    assert prov["model"] == str(tiny_model_dir) and prov["layer"] == 1
    assert prov["hook"] == "resid_post" and prov["mask_prob"] == 0.3
    assert prov["mask_token_id"] == tiny_lm.tokenizer.encode("...", add_special_tokens=False)[0]
    assert prov["context_length"] == 32 and prov["seed"] == 1
    assert prov["model_revision"] == tiny_lm.revision and prov["corpus"]["kind"] == "local"
    data = store.read(0, 1024)
    assert np.array_equal(data.seq_index, np.repeat(np.arange(32), 32))
    assert np.array_equal(data.position, np.tile(np.arange(32), 32))
    assert np.array_equal(
        data.excluded, (data.position == 0) | np.isin(data.token_ids, [0, 1, 2, 3])
    )
    assert not (data.masked & data.excluded).any()
    # stored activations are exactly the truncated forward of the stored (masked) ids
    ids = torch.from_numpy(data.token_ids.astype(np.int64)).view(32, 32)
    ref = capture_resid_post(tiny_lm, ids, torch.ones_like(ids), 1).reshape(-1, 32)
    assert torch.equal(torch.from_numpy(np.asarray(data.activations)), ref)
    # masks are those of mask_sequences on the packed corpus
    packed = np.stack(
        list(pack_sequences(Corpus(CorpusSpec(str(corpus_file))), tiny_lm.tokenizer, 32))[:32]
    )
    expect, masked, _ = mask_sequences(
        packed,
        np.arange(32),
        seed=1,
        p=0.3,
        mask_id=prov["mask_token_id"],
        special_ids=np.array([0, 1, 2, 3]),
    )
    assert np.array_equal(data.token_ids, expect.reshape(-1))
    assert np.array_equal(data.masked, masked.reshape(-1))
    # rerunning the same command is a no-op resume, and says so
    again = run_harvest(cfg, lm=tiny_lm, progress=False)
    assert again.skipped_chunks == 4 and again.new_tokens == 0
    assert again.summary().endswith("all were complete already, nothing to compute")
    assert "0 tok/s" not in again.summary()


def test_sequences_kept_from_the_size_check_give_the_same_store(
    tmp_path, tiny_lm, tiny_model_dir, corpus_file, monkeypatch
):
    """The corpus size check's packed sequences are reused by the run when they fit the
    budget (no second tokenisation); over it the run tokenises again. Same store either
    way, and a too-small corpus is still counted to the end and refused."""
    from masksae.harvest import runner
    from masksae.storage import ActivationStore

    cfg = _cfg(tmp_path / "kept", tiny_model_dir, corpus_file)
    plan = plan_harvest(cfg, lm=tiny_lm)
    assert plan.packed is not None and plan.packed.shape == (32, 32)
    assert np.array_equal(plan.packed, np.stack(list(plan.sequences())))
    run_harvest(cfg, lm=tiny_lm, progress=False)

    monkeypatch.setattr(runner, "KEEP_PACKED_TOKENS", 100)  # below the 1,024 tokens
    streamed = _cfg(tmp_path / "streamed", tiny_model_dir, corpus_file)
    assert plan_harvest(streamed, lm=tiny_lm).packed is None
    run_harvest(streamed, lm=tiny_lm, progress=False)
    kept_store = ActivationStore.open(tmp_path / "kept")
    assert kept_store.fingerprint == ActivationStore.open(tmp_path / "streamed").fingerprint
    with pytest.raises(CorpusError, match="holds only"):
        plan_harvest(_cfg(tmp_path / "big", tiny_model_dir, corpus_file, tokens=10**7), lm=tiny_lm)


def test_harvest_at_p0_verifies_and_reads_back_through_plain_zarr(
    tmp_path, tiny_lm, tiny_model_dir, corpus_file
):
    """p = 0 makes every `masked` chunk all-fill: each still has its shard file."""
    import zarr

    from masksae.storage import ActivationStore

    cfg = _cfg(tmp_path / "store", tiny_model_dir, corpus_file, mask_prob=0.0)
    run_harvest(cfg, lm=tiny_lm, progress=False)
    store = ActivationStore.open(tmp_path / "store")
    assert store.verify() == []
    data = store.read(0, store.n_tokens)
    assert not data.masked.any()
    group = zarr.open_group(str(tmp_path / "store"), mode="r")
    for name in ("activations", "token_ids", "masked", "excluded", "seq_index", "position"):
        assert np.array_equal(np.asarray(group[name][:]), getattr(data, name)), name


def test_no_progress_also_silences_transformers_bars(
    tmp_path, tiny_lm, tiny_model_dir, corpus_file
):
    import transformers

    cfg = _cfg(tmp_path / "store", tiny_model_dir, corpus_file)
    try:
        run_harvest(cfg, lm=tiny_lm, progress=False)
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.utils.logging.enable_progress_bar()


def test_bad_inputs(tmp_path, tiny_lm, tiny_model_dir, corpus_file):
    def plan(corpus=corpus_file, **kw):
        return plan_harvest(_cfg(tmp_path / "s", tiny_model_dir, corpus, **kw), lm=tiny_lm)

    with pytest.raises(ModelError, match=r"layer 3 .*0\.\.2"):
        plan(layer=3)
    with pytest.raises(ModelError, match=r"0\.\.2"):
        plan(layer=-1)
    with pytest.raises(ConfigError, match="0 <= p < 1"):
        plan(mask_prob=1.0)
    with pytest.raises(ConfigError, match="encodes to .*--mask-token-id"):
        plan(mask_string="the cat sat")
    with pytest.raises(ModelError, match="--context-length 256"):
        plan(context_length=1024)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CorpusError, match="yields no sequence"):
        plan(corpus=empty)
    with pytest.raises(CorpusError, match="holds only .* --tokens"):
        plan(tokens=10_000_000)
    # an output path holding a different cache
    run_harvest(
        _cfg(tmp_path / "s", tiny_model_dir, corpus_file, tokens=256), lm=tiny_lm, progress=False
    )
    with pytest.raises(ProvenanceMismatchError, match="mask_prob"):
        run_harvest(
            _cfg(tmp_path / "s", tiny_model_dir, corpus_file, tokens=256, mask_prob=0.2),
            lm=tiny_lm,
            progress=False,
        )


def test_cli_errors_are_clean(tmp_path, corpus_file):
    from masksae.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "harvest",
            "--model",
            "no-such-org/no-such-model-xyz",
            "--corpus",
            str(corpus_file),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert res.exit_code == 2
    assert "offline? use bundled:smollm2-135m" in res.output
    res = runner.invoke(app, ["harvest", "--mask-prob", "1.2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "0 <= p < 1" in res.output


# ---------------------------------------------------------------------------- norm outliers
def test_flag_norm_outliers_finds_planted_ones():
    import torch

    from masksae.harvest import flag_norm_outliers
    from masksae.harvest.outliers import row_norms, validate_outlier_factor

    rng = np.random.default_rng(0)
    acts = torch.from_numpy(rng.normal(size=(1000, 16)).astype(np.float32))
    excluded = np.zeros(1000, dtype=bool)
    excluded[::100] = True  # "position 0": huge, but already excluded
    acts[::100] *= 1000
    planted = np.array([5, 17, 333, 501, 999])
    acts[planted] *= 150  # attention-sink-like
    flags = flag_norm_outliers(row_norms(acts), excluded, 10.0)
    assert np.array_equal(np.flatnonzero(flags), planted)
    assert not (flags & excluded).any()
    norms = np.linalg.norm(acts.numpy(), axis=1)  # numpy norms work too
    assert np.array_equal(flag_norm_outliers(norms, excluded, 10.0), flags)
    assert not flag_norm_outliers(norms, excluded, 0.0).any()  # 0 disables
    assert not flag_norm_outliers(norms, np.ones(1000, dtype=bool), 10.0).any()
    # bf16 activations give the same flags
    assert np.array_equal(flag_norm_outliers(row_norms(acts.bfloat16()), excluded, 10.0), flags)
    for bad in (-1, 0.5, 1.0, float("inf"), True, "10"):
        with pytest.raises(ConfigError, match="--outlier-norm-factor .* 0 \\(off\\)"):
            validate_outlier_factor(bad)


def test_harvest_flags_norm_outliers(tmp_path, tiny_lm, tiny_model_dir, corpus_file, monkeypatch):
    import masksae.harvest.runner as runner
    from masksae.storage import ActivationStore
    from masksae.storage.commands import _format_info, store_summary

    real_capture = runner.capture_resid_post

    def sink_at_position_1(lm, ids, attention, layer):
        h = real_capture(lm, ids, attention, layer).clone()
        h[:, 1] *= 500  # a planted attention sink in every sequence
        return h

    monkeypatch.setattr(runner, "capture_resid_post", sink_at_position_1)
    ratios = {}
    for factor in (10.0, 0.0):
        out = tmp_path / f"f{factor}"
        result = run_harvest(
            _cfg(out, tiny_model_dir, corpus_file, outlier_norm_factor=factor),
            lm=tiny_lm,
            progress=False,
        )
        store = ActivationStore.open(out)
        data = store.read(0, store.n_tokens)
        base = (data.position == 0) | np.isin(data.token_ids, [0, 1, 2, 3])
        sink = (data.position == 1) & ~base
        prov = store.provenance
        assert prov["outlier_norm_factor"] == factor
        stats = store.stats
        ratios[factor] = np.sqrt(stats.mean_sq_norm) / stats.mean_norm
        if factor:
            assert np.array_equal(data.excluded, base | sink)
            assert (
                result.norm_outliers == int(sink.sum()) == 32 - int(base[data.position == 1].sum())
            )
            assert sum(r["n_norm_outliers"] for r in store.records.values()) == sink.sum()
            assert "norm outliers" in prov["excluded_token_policy"]
            assert "10 x the median norm" in prov["excluded_token_policy"]
            summary = store_summary(out)
            assert summary["tokens_norm_outliers"] == int(sink.sum())
            text = _format_info(summary)
            assert (
                f"excluded     {int(base.sum())} special/position-0, {int(sink.sum())} "
                "norm outliers"
            ) in text
            # statistics ignore the outliers: they equal numpy over the kept rows
            acts = np.asarray(data.activations, dtype=np.float64)[~data.excluded]
            assert stats.n_tokens == acts.shape[0]
            assert stats.mean_norm == pytest.approx(np.linalg.norm(acts, axis=1).mean())
        else:
            assert np.array_equal(data.excluded, base) and result.norm_outliers == 0
            assert "norm outliers" not in prov["excluded_token_policy"]
    assert ratios[10.0] < 1.1 < 5 < ratios[0.0]  # the sinks wreck rms/mean unless flagged
    # the factor is part of the store's identity: resuming with another factor is refused
    with pytest.raises(ProvenanceMismatchError, match="outlier_norm_factor"):
        run_harvest(
            _cfg(tmp_path / "f10.0", tiny_model_dir, corpus_file, outlier_norm_factor=5.0),
            lm=tiny_lm,
            progress=False,
        )


def test_tokenizer_provenance_is_portable(tiny_lm, tiny_model_dir):
    import dataclasses

    from masksae.models import model_summary, tokenizer_id

    assert tokenizer_id(tiny_lm) == str(tiny_model_dir)  # a local model: the user's spec

    class HubTok:
        name_or_path = "HuggingFaceTB/SmolLM2-135M"

    class CacheTok:
        name_or_path = "/root/.cache/masksae/models/smollm2-135m"

    hub = dataclasses.replace(tiny_lm, tokenizer=HubTok(), model_id="HuggingFaceTB/SmolLM2-135M")
    assert tokenizer_id(hub) == "HuggingFaceTB/SmolLM2-135M"
    bundled = dataclasses.replace(tiny_lm, tokenizer=CacheTok(), model_id="bundled:smollm2-135m")
    assert tokenizer_id(bundled) == "bundled:smollm2-135m"
    summary = model_summary(bundled)
    assert summary["tokenizer"] == "bundled:smollm2-135m"
    assert summary["tokenizer_class"] == "CacheTok"
