"""Alternative corruptions (masksae.harvest.corruption): rates, exclusions, determinism,
provenance, the noise-scale calibration, and tiny end-to-end harvests of every kind."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from masksae.errors import ConfigError
from masksae.harvest import HarvestConfig, mask_sequences, plan_harvest, run_harvest
from masksae.harvest.corruption import (
    Corruption,
    block_noise,
    calibrate_noise,
    corrupt_block,
    noise_draw,
    replacement_uniforms,
    uniform_table,
    unigram_counts,
    unigram_table,
)
from masksae.models import capture_resid_post, load_model
from masksae.storage import ActivationStore
from masksae.storage.provenance import corruption_label

SPECIALS = np.array([0, 1, 2, 3])
VOCAB = 50


def _ids(n_seqs: int = 300, length: int = 64, seed: int = 0) -> np.ndarray:
    """Random ordinary tokens with a few specials sprinkled in (and BOS-like 2 at 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(n_seqs, length))
    ids[rng.random((n_seqs, length)) < 0.05] = 1
    ids[:, 0] = 2
    return ids.astype(np.int32)


def _corruption(kind: str, p: float = 0.3, **kw) -> Corruption:
    if kind.startswith("random"):
        if kind == "random_uniform":
            ids, cdf = uniform_table(VOCAB, SPECIALS)
        else:
            counts = np.zeros(VOCAB, np.int64)
            counts[[5, 7]] = [90, 10]
            ids, cdf = unigram_table(counts)
        kw.update(replacement_ids=ids, replacement_cdf=cdf)
    if kind == "delete":
        kw.setdefault("fill_id", 1)
    return Corruption(kind=kind, p=p, seed=7, mask_id=40, **kw)


def _eligible(ids: np.ndarray) -> np.ndarray:
    eligible = ~np.isin(ids, SPECIALS)
    eligible[:, 0] = False
    return eligible


@pytest.mark.parametrize("kind", ["mask", "random_uniform", "random_unigram", "delete"])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_rate_within_binomial_bounds_and_specials_untouched(kind, p):
    ids = _ids()
    seqs = np.arange(1000, 1000 + len(ids))
    block = corrupt_block(ids, seqs, _corruption(kind, p), SPECIALS)
    eligible = _eligible(ids)
    n = int(eligible.sum())
    # the drawn positions are the masking's, for every kind
    _, masked_ref, _ = mask_sequences(ids, seqs, seed=7, p=p, mask_id=40, special_ids=SPECIALS)
    hits = block.n_deleted if kind == "delete" else int(block.masked.sum())
    assert hits == int(masked_ref.sum())
    assert abs(hits - n * p) < 4.5 * math.sqrt(n * p * (1 - p))
    if kind == "delete":
        assert not block.masked.any()
        for s in range(len(ids)):
            kept = ids[s][~masked_ref[s]]
            # every special token and position 0 survive, in order; the tail is fill + excluded
            assert np.array_equal(block.ids[s, : len(kept)], kept)
            assert (block.ids[s, len(kept) :] == 1).all() and block.excluded[s, len(kept) :].all()
            assert np.array_equal(
                block.excluded[s, : len(kept)], ~_eligible(ids[s : s + 1])[0][~masked_ref[s]]
            )
            assert kept[0] == 2 and np.isin(ids[s], SPECIALS).sum() == np.isin(kept, SPECIALS).sum()
    else:
        assert np.array_equal(block.masked, masked_ref)
        assert not (block.masked & ~eligible).any()
        assert np.array_equal(block.ids[~block.masked], ids[~block.masked])
        assert np.array_equal(block.excluded, ~eligible)


def test_random_replacements_follow_the_hand_computed_rule():
    ids = _ids(n_seqs=400)
    seqs = np.arange(len(ids))
    uniform = corrupt_block(ids, seqs, _corruption("random_uniform", 0.5), SPECIALS)
    candidates = np.arange(4, VOCAB)
    for s in (0, 17, 399):  # uniform: candidate floor(u * n), u the t-th replacement uniform
        u = replacement_uniforms(7, s, ids.shape[1])
        expect = candidates[np.floor(u * len(candidates)).astype(int)]
        m = uniform.masked[s]
        assert np.array_equal(uniform.ids[s][m], expect[m])
    drawn = uniform.ids[uniform.masked]
    assert not np.isin(drawn, SPECIALS).any() and drawn.max() < VOCAB
    # unigram with counts {5: 90, 7: 10}: only those two, in proportion 0.9
    unigram = corrupt_block(ids, seqs, _corruption("random_unigram", 0.5), SPECIALS)
    drawn = unigram.ids[unigram.masked]
    assert set(np.unique(drawn)) == {5, 7}
    n = drawn.size
    assert abs((drawn == 5).sum() - 0.9 * n) < 4.5 * math.sqrt(n * 0.09)


@pytest.mark.parametrize("kind", ["mask", "random_unigram", "delete"])
def test_corruption_is_a_pure_function_of_seed_and_sequence_index(kind):
    ids = _ids(n_seqs=24)
    seqs = np.arange(500, 524)
    c = _corruption(kind)
    whole = corrupt_block(ids, seqs, c, SPECIALS)
    parts = [corrupt_block(ids[i : i + 5], seqs[i : i + 5], c, SPECIALS) for i in range(0, 24, 5)]
    assert np.array_equal(whole.ids, np.concatenate([b.ids for b in parts]))
    assert whole.n_deleted == sum(b.n_deleted for b in parts)
    rev = corrupt_block(ids[::-1], seqs[::-1], c, SPECIALS)
    assert np.array_equal(rev.ids[::-1], whole.ids)
    other_seed = corrupt_block(ids, seqs, Corruption(**{**c.__dict__, "seed": 8}), SPECIALS)
    assert not np.array_equal(other_seed.ids, whole.ids)


def test_block_noise_is_per_sequence_and_zero_at_excluded_positions():
    excluded = np.zeros((3, 8), dtype=bool)
    excluded[:, 0] = True
    excluded[1, 4] = True
    c = _corruption("noise", noise_sigma=0.5)
    noise = block_noise(np.array([10, 11, 12]), excluded, 6, c)
    assert noise.shape == (24, 6) and noise.dtype == np.float32
    assert np.array_equal(noise[8:16][~excluded[1]], 0.5 * noise_draw(7, 11, 8, 6)[~excluded[1]])
    assert not noise[excluded.reshape(-1)].any()
    single = block_noise(np.array([11]), excluded[1:2], 6, c)
    assert np.array_equal(single, noise[8:16])


def test_unigram_counts_by_hand():
    seqs = [np.array([0, 5, 5, 7]), np.array([5, 9, 1, 9]), np.array([9, 9, 9, 9])]
    counts, n_seqs, n_tokens = unigram_counts(iter(seqs), 12, SPECIALS, max_tokens=6)
    # whole sequences until 6 tokens are seen: the first two; specials 0 and 1 not counted
    assert n_seqs == 2 and n_tokens == 6
    assert counts[5] == 3 and counts[7] == 1 and counts[9] == 2 and counts[[0, 1]].sum() == 0
    ids, cdf = unigram_table(counts)
    assert ids.tolist() == [5, 7, 9] and np.allclose(cdf, [0.5, 4 / 6, 1.0])


def test_noise_calibration_on_a_known_case():
    """A fake 'model' whose activation is the token's embedding row: masking shifts exactly
    the masked positions, by ||E[mask] - E[token]||^2, and nothing else."""
    d_model = 4
    emb = np.zeros((VOCAB, d_model))
    emb[np.arange(VOCAB), np.arange(VOCAB) % d_model] = 1.0 + np.arange(VOCAB) / VOCAB
    ids = _ids(n_seqs=40, length=16)
    mask_id = 40

    def capture(ids_BT):
        return emb[np.asarray(ids_BT)]

    cal = calibrate_noise(
        capture, ids, seed=3, p=0.3, mask_id=mask_id, special_ids=SPECIALS, outlier_norm_factor=0
    )
    _, masked, _ = mask_sequences(
        ids, np.arange(40), seed=3, p=0.3, mask_id=mask_id, special_ids=SPECIALS
    )
    eligible = _eligible(ids)
    shift = ((emb[mask_id] - emb[ids]) ** 2).sum(-1) * masked
    assert cal.tokens == eligible.sum() and cal.masked_tokens == masked.sum()
    assert cal.mean_sq_shift == pytest.approx(shift[eligible].mean(), rel=1e-12)
    assert cal.masked_mean_sq_shift == pytest.approx(shift[masked].mean(), rel=1e-12)
    assert cal.unmasked_mean_sq_shift == 0.0
    assert cal.sigma == pytest.approx(math.sqrt(shift[eligible].mean() / d_model))
    # N(0, sigma^2 I_D) noise then has the measured mean squared norm
    c = Corruption(kind="noise", p=0.3, seed=3, mask_id=mask_id, noise_sigma=cal.sigma)
    noise = block_noise(np.arange(4000), np.zeros((4000, 16), bool), d_model, c)
    assert (noise.astype(np.float64) ** 2).sum(1).mean() == pytest.approx(
        cal.mean_sq_shift, rel=0.01
    )


# ---------------------------------------------------------------------- end to end, tiny


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    from test_harvest import write_jsonl

    work = tmp_path_factory.mktemp("corruption")
    corpus = write_jsonl(work / "docs.jsonl")
    lm = load_model(str(tiny_model_dir), device="cpu")
    return lm, tiny_model_dir, corpus, work


def _harvest(tiny, name: str, **kw) -> ActivationStore:
    lm, model_dir, corpus, work = tiny
    base = dict(
        out=str(work / name),
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
    run_harvest(HarvestConfig(**base), lm=lm, progress=False)
    return ActivationStore.open(work / name)


@pytest.fixture(scope="module")
def stores(tiny):
    return {
        "clean": _harvest(tiny, "clean", mask_prob=0.0),
        "mask": _harvest(tiny, "mask"),
        "random_uniform": _harvest(tiny, "random_uniform", corruption="random_uniform"),
        "random_unigram": _harvest(tiny, "random_unigram", corruption="random_unigram"),
        "delete": _harvest(tiny, "delete", corruption="delete"),
        "noise": _harvest(tiny, "noise", corruption="noise", noise_calibration_sequences=16),
    }


def test_provenance_and_store_info_record_the_corruption(stores):
    from masksae.storage.commands import store_summary

    assert "corruption" not in stores["mask"].provenance  # plain masking: unchanged schema
    assert corruption_label(stores["mask"].provenance) == "mask '...' p=0.3"
    assert corruption_label(stores["clean"].provenance) == "clean"
    uni = stores["random_unigram"].provenance["corruption"]
    assert uni["kind"] == "random_unigram" and uni["unigram"]["sequences_counted"] == 32
    assert uni["unigram"]["tokens_counted"] > 0 and len(uni["unigram"]["counts_sha256"]) == 32
    assert stores["random_uniform"].provenance["corruption"]["candidates"] == 497 - 4
    noise = stores["noise"].provenance["corruption"]
    cal = noise["calibration"]
    assert noise["sigma_source"] == "calibrated" and cal["sequences"] == 16
    assert noise["sigma"] == pytest.approx(math.sqrt(cal["mean_sq_shift"] / 32))
    assert cal["mask_prob"] == 0.3 and cal["tokens"] > 0
    summary = store_summary(stores["delete"].path)
    assert summary["corruption"] == "delete" and summary["corruption_label"] == "delete p=0.3"
    assert summary["tokens_deleted"] == sum(
        r["n_deleted"] for r in stores["delete"].records.values()
    )
    result = CliRunner().invoke(
        __import__("masksae.cli", fromlist=["app"]).app,
        ["store", "info", str(stores["noise"].path)],
    )
    assert result.exit_code == 0 and "corruption   noise sigma=" in result.output


def test_random_and_delete_stores_corrupt_the_masking_positions(stores, tiny):
    lm = tiny[0]
    clean = stores["clean"].read(0, 1024)
    mask = stores["mask"].read(0, 1024)
    for kind in ("random_uniform", "random_unigram"):
        data = stores[kind].read(0, 1024)
        assert np.array_equal(data.masked, mask.masked)
        assert np.array_equal(data.token_ids[~data.masked], clean.token_ids[~data.masked])
        assert not np.isin(data.token_ids[data.masked], [0, 1, 2, 3]).any()
    data = stores["delete"].read(0, 1024)
    assert not data.masked.any()
    assert np.array_equal(data.seq_index, clean.seq_index)
    deleted = sum(r["n_deleted"] for r in stores["delete"].records.values())
    assert deleted == int(mask.masked.sum())
    for s in (0, 5, 31):
        rows = slice(32 * s, 32 * (s + 1))
        kept = clean.token_ids[rows][~mask.masked[rows]]
        n = len(kept)
        assert np.array_equal(data.token_ids[rows][:n], kept)
        assert data.excluded[rows][n:].all()
        # the kept positions are the activations of the short sequence run alone
        short = torch.from_numpy(kept.astype(np.int64))[None]
        ref = capture_resid_post(lm, short, torch.ones_like(short), 1)[0]
        got = torch.from_numpy(np.asarray(data.activations[rows][:n]))
        assert torch.allclose(got, ref, atol=1e-5)


def test_noise_store_is_clean_plus_the_drawn_noise(stores):
    clean = stores["clean"].read(0, 1024)
    noisy = stores["noise"].read(0, 1024)
    sigma = stores["noise"].provenance["corruption"]["sigma"]
    assert np.array_equal(noisy.token_ids, clean.token_ids) and not noisy.masked.any()
    diff = np.asarray(noisy.activations, np.float64) - np.asarray(clean.activations, np.float64)
    expect = np.concatenate([sigma * noise_draw(1, s, 32, 32) for s in range(32)])
    usable = ~clean.excluded
    assert np.allclose(diff[usable], expect[usable], atol=1e-6)
    assert not diff[~usable].any()
    measured = stores["noise"].provenance["corruption"]["calibration"]["mean_sq_shift"]
    assert (diff[usable] ** 2).sum(1).mean() == pytest.approx(measured, rel=0.1)


def test_resume_reuses_the_recorded_calibration_and_is_bit_exact(stores, tiny):
    lm, model_dir, corpus, work = tiny
    # a different batch size, an interrupted store (one chunk removed), then a resume
    full = stores["noise"]
    store = _harvest(
        tiny, "noise-b8", corruption="noise", noise_calibration_sequences=16, batch_size=8
    )
    assert store.fingerprint == full.fingerprint
    kw = dict(
        out=str(work / "noise"),
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
        corruption="noise",
        noise_calibration_sequences=16,
    )
    # a resume reuses the recorded sigma, even where it could not measure it (no weights)
    weightless = load_model(str(model_dir), device="cpu", weights=False)
    plan = plan_harvest(HarvestConfig(**kw), lm=weightless, check_corpus=False)
    assert plan.corruption.noise_sigma == full.provenance["corruption"]["sigma"]
    with pytest.raises(ConfigError, match="--noise-sigma"):
        plan_harvest(HarvestConfig(**{**kw, "out": str(work / "fresh")}), lm=weightless)
    given = plan_harvest(HarvestConfig(**{**kw, "out": str(work / "g"), "noise_sigma": 0.5}), lm=lm)
    assert given.corruption.noise_sigma == 0.5
    assert given.provenance()["corruption"]["sigma_source"] == "given"


def test_mask_token_role_uses_the_tokenizers_own_token(tiny):
    store = _harvest(tiny, "unk", mask_token_role="unk")
    prov = store.provenance
    assert prov["mask_token_id"] == tiny[0].tokenizer.unk_token_id == 3
    assert prov["corruption"] == {"kind": "mask", "mask_token_role": "unk"}
    data = store.read(0, store.n_tokens)
    assert (data.token_ids[data.masked] == 3).all() and data.masked.any()
    assert corruption_label(prov) == f"mask {prov['mask_string']!r} (unk token) p=0.3"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corruption", "shuffle"], "corruption 'shuffle' is unknown"),
        (["--noise-sigma", "0.1"], "--noise-sigma applies to --corruption noise only"),
        (["--corruption", "noise", "--noise-sigma", "-1"], "--noise-sigma -1.0 is invalid"),
        (["--corruption", "delete", "--mask-token-role", "unk"], "does not apply"),
        (["--mask-token-role", "cls"], "--mask-token-role 'cls' is unknown"),
        (["--corruption", "random_unigram", "--unigram-tokens", "0"], "--unigram-tokens 0"),
    ],
)
def test_cli_rejects_bad_corruption_settings(tiny, args, message):
    from masksae.cli import app

    _, model_dir, corpus, work = tiny
    result = CliRunner().invoke(
        app,
        [
            "harvest",
            "--model",
            str(model_dir),
            "--corpus",
            str(corpus),
            "--tokens",
            "64",
            "--context-length",
            "32",
            "--device",
            "cpu",
            "--out",
            str(work / "bad"),
            *args,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (work / "bad").exists()


def test_unigram_store_counts_match_the_harvested_text(stores):
    clean = stores["clean"].read(0, 1024)
    counts = np.bincount(clean.token_ids.astype(np.int64), minlength=497)
    counts[[0, 1, 2, 3]] = 0
    from masksae.harvest.corruption import counts_digest

    table = stores["random_unigram"].provenance["corruption"]["unigram"]
    assert table["counts_sha256"] == counts_digest(counts)
    assert table["tokens_counted"] == int(counts.sum())
    data = stores["random_unigram"].read(0, 1024)
    assert (counts[data.token_ids[data.masked]] > 0).all()  # only tokens seen in the text


def test_two_rank_noise_and_deletion_harvests_equal_single_process(stores, tiny):
    """--devices cpu,cpu (one rank per device, torch.distributed): rank 0's noise calibration
    is adopted by the other rank, and both stores equal the single-process ones bit for bit."""
    lm, model_dir, corpus, work = tiny
    for name, extra in (
        ("noise", {"corruption": "noise", "noise_calibration_sequences": 16}),
        ("delete", {"corruption": "delete"}),
    ):
        cfg = HarvestConfig(
            out=str(work / f"{name}-ranks"),
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
            devices=("cpu", "cpu"),
            **extra,
        )
        run_harvest(cfg, progress=False)
        ranks, single = ActivationStore.open(cfg.out), stores[name]
        assert ranks.provenance == single.provenance and ranks.fingerprint == single.fingerprint
        assert ranks.records == single.records
