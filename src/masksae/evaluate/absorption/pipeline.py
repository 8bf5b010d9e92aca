"""`run`: the first-letter absorption metric of one SAE, end to end."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from masksae.errors import ConfigError
from masksae.evaluate.absorption import cache
from masksae.evaluate.absorption.activations import word_activations
from masksae.evaluate.absorption.cache import LLMStage
from masksae.evaluate.absorption.config import AbsorptionConfig
from masksae.evaluate.absorption.k_sparse import k_sparse_probe_letters
from masksae.evaluate.absorption.probes import LinearProbe, per_class_f1, train_letter_probe
from masksae.evaluate.absorption.prompts import BosPolicy, build_prompts, resolve_bos
from masksae.evaluate.absorption.scoring import AbsorptionThresholds, score_letter
from masksae.evaluate.absorption.summary import summarize
from masksae.evaluate.absorption.vocab import (
    LETTERS,
    alpha_vocab,
    cap_per_letter,
    first_letter_index,
    split_vocab,
)
from masksae.progress import progress_bar
from masksae.timing import PhaseTimer

logger = logging.getLogger(__name__)


def _resolve_device(name: str) -> torch.device:
    from masksae.devices import resolve_device

    return resolve_device(name)


def _validate_layer(lm, layer: int) -> None:
    try:
        from masksae.models import validate_layer
    except ImportError:
        n_layers = getattr(lm, "n_layers", None) or lm.model.config.num_hidden_layers
        if not 0 <= layer < n_layers:
            raise ConfigError(
                f"absorption layer={layer} is out of range; the model has layers 0..{n_layers - 1}"
            ) from None
        return
    validate_layer(lm, layer)


def _words_and_labels(prompts) -> torch.Tensor:
    return torch.tensor([p.letter for p in prompts], dtype=torch.long)


def compute_llm_stage(
    lm, layer: int, cfg: AbsorptionConfig, timer: PhaseTimer, bos: BosPolicy
) -> LLMStage:
    """Vocabulary, prompts, LLM activations, the ground-truth probe and the activations of
    the probe's true-positive test words in fresh prompts (SAEBench's absorption prompts).

    Every prompt starts with `bos` (when it names a token) and then the separator, as
    SAEBench's probe-training and absorption prompts both do."""
    with timer.phase("vocab_prompts"):
        vocab = cap_per_letter(alpha_vocab(lm.tokenizer), cfg.max_words_per_letter, cfg.seed)
        train_words, test_words = split_vocab(vocab, cfg.train_fraction, cfg.seed)
        if len(train_words) <= cfg.n_icl_examples or len(test_words) <= cfg.n_icl_examples:
            raise ConfigError(
                f"absorption: the tokenizer gives {len(vocab)} alphabetic words ({len(train_words)} "
                f"train / {len(test_words)} test), too few for n_icl_examples={cfg.n_icl_examples}; "
                "raise max_words_per_letter or lower n_icl_examples"
            )
        common = dict(
            n_examples=cfg.n_icl_examples,
            template=cfg.prompt_template,
            answer_template=cfg.answer_template,
            separator=cfg.example_separator,
            prepend_separator=True,
        )
        # SAEBench: probe prompts draw their examples from the same split
        train_prompts = build_prompts(train_words, train_words, cfg.seed, **common)
        test_prompts = build_prompts(test_words, test_words, cfg.seed + 1, **common)
        logger.info(
            "absorption: %d alphabetic words (%d train, %d test)",
            len(vocab),
            len(train_words),
            len(test_words),
        )
    from masksae.progress import progress_bar

    # the absorption prompts (probe true positives) are not known yet: the bar grows later
    bar = progress_bar(len(train_prompts) + len(test_prompts), "absorption LLM", "prompt")
    with timer.phase("llm_activations"):
        x_train = word_activations(lm, train_prompts, layer, cfg.llm_batch_size, bos, bar)
        x_test = word_activations(lm, test_prompts, layer, cfg.llm_batch_size, bos, bar)
    y_train, y_test = _words_and_labels(train_prompts), _words_and_labels(test_prompts)
    with timer.phase("ground_truth_probe"):
        probe = train_letter_probe(x_train, y_train, cfg, _resolve_device(cfg.device))
        logits = probe.logits(x_test)
        is_tp = logits[torch.arange(len(y_test)), y_test] > 0
        abs_words = [w for w, tp in zip(test_words, is_tp.tolist(), strict=True) if tp]
        # SAEBench: absorption prompts draw their examples from the whole vocabulary
        abs_prompts = build_prompts(abs_words, vocab, cfg.seed + 2, **common)
    bar.total += len(abs_prompts)
    bar.refresh()
    with timer.phase("llm_activations"):
        x_abs = word_activations(lm, abs_prompts, layer, cfg.llm_batch_size, bos, bar)
    bar.close()
    return LLMStage(
        train_words=train_words,
        test_words=test_words,
        x_train_ND=x_train,
        y_train_N=y_train,
        x_test_ND=x_test,
        y_test_N=y_test,
        probe_W_CD=probe.W_CD,
        probe_b_C=probe.b_C,
        abs_words=abs_words,
        x_abs_ND=x_abs,
        y_abs_N=torch.tensor([first_letter_index(w) for w in abs_words], dtype=torch.long),
    )


@torch.inference_mode()
def encode_batched(sae, x_ND: torch.Tensor, batch_size: int) -> torch.Tensor:
    """SAE latents [N, F] (float32, CPU) computed on the SAE's own device and dtype."""
    param = next(iter(sae.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    d_sae = int(sae.cfg.d_sae)
    if x_ND.shape[0] == 0:
        return torch.zeros((0, d_sae))
    out = [
        sae.encode(x_ND[i : i + batch_size].to(device=device, dtype=dtype)).float().cpu()
        for i in range(0, x_ND.shape[0], batch_size)
    ]
    f_NF = torch.cat(out)
    if f_NF.shape[1] != d_sae:
        raise ConfigError(
            f"absorption: sae.encode returned {f_NF.shape[1]} latents but sae.cfg.d_sae={d_sae}"
        )
    return f_NF


def run(
    sae,
    lm,
    layer: int,
    cfg: AbsorptionConfig | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """SAEBench first-letter feature absorption of `sae` on block `layer` of `lm`.

    Args:
        sae: exposes ``encode(x_BD) -> f_BF``, ``W_dec`` [F, D] and ``cfg.d_sae``.
        lm: a ``masksae.models.LoadedModel`` (uses ``.model``, ``.tokenizer``, ``.device``,
            ``.model_id``, ``.revision``).
        layer: the block whose output (resid_post) the SAE was trained on.
        cfg: settings; SAEBench defaults when None.
        cache_dir: when given, the SAE-independent stage (LLM activations + ground-truth
            probe) is read from / written to this folder, so the next SAE on the same
            model, revision, layer, tokenizer, BOS policy and config skips the LLM and the
            probe.

    Returns a JSON-able dict. Headline (SAEBench's rule, see
    :mod:`masksae.evaluate.absorption.summary`; every score null when fewer than
    ``min_eligible_letters`` letters have probe F1 > ``min_probe_f1``):
        mean_full_absorption_score: mean over scored letters of the fraction of probe true
            positives that are fully absorbed. LOWER is better.
        absorption_paper_convention: 100 * (1 - mean_full_absorption_score), the SAEBench
            paper's table form. HIGHER is better.
        mean_full_absorption_score_se / absorption_paper_convention_se: binomial standard
            errors (``se_kind``) in the same units.
        mean_fractional_absorption_score (+ _se): SAEBench's mean_absorption_fraction_score.
        std_dev_full_absorption_score, std_dev_fractional_absorption_score: SAEBench's
            spread over letters. mean_num_main_latents: its mean_num_split_features.
        n_scored_letters, n_true_positives, n_full_absorption: what the scores average.
    Also: score_rule, se_kind, all_eligible_letters (the same block under masksae's rule:
    any number of eligible letters, labelled by its ``rule``), n_eligible_letters,
    eligible_letters, per_letter {letter: {full_absorption_rate, fractional, fractional_var,
    n_true_positives, n_full_absorption, main_latents, absorbing_latents [[latent, n], ...],
    k_sparse_latents, k_sparse_f1, probe_f1}} for eligible letters, probe_f1 (all 26),
    n_words {train, test, true_positives}, settings {bos, prompt_format,
    k_sparse_probe_init, max_words_per_letter}, cache_hit, warnings, timings_s, config.
    """
    cfg = cfg or AbsorptionConfig()
    cfg.validate()
    _validate_layer(lm, layer)
    timer = PhaseTimer()
    warnings: list[str] = []
    bos = resolve_bos(lm.tokenizer, cfg.prepend_bos)
    if cfg.prepend_bos and bos.token_id is None:
        msg = (
            "absorption: the tokenizer has neither a BOS nor an EOS token; prompts start "
            "without one (SAEBench would prepend one)"
        )
        logger.warning(msg)
        warnings.append(msg)
    key = cache.cache_key(lm, layer, cfg, bos)
    stage = cache.load(Path(cache_dir), key) if cache_dir is not None else None
    cache_hit = stage is not None
    if stage is None:
        stage = compute_llm_stage(lm, layer, cfg, timer, bos)
        if cache_dir is not None:
            path = cache.save(Path(cache_dir), key, stage)
            logger.info("absorption: cached LLM activations and probe in %s", path)
    else:
        logger.info("absorption: reusing cached LLM activations and probe from %s", cache_dir)
    return score_stage(
        sae, stage, layer, cfg, bos, cache_hit=cache_hit, timer=timer, warnings=warnings
    )


def score_stage(
    sae,
    stage: LLMStage,
    layer: int,
    cfg: AbsorptionConfig,
    bos: BosPolicy,
    *,
    cache_hit: bool = False,
    timer: PhaseTimer | None = None,
    warnings: list[str] | None = None,
) -> dict:
    """The SAE-dependent part of :func:`run`: eligibility, k-sparse probes, scoring and the
    result dict (see :func:`run`) for one SAE on an already computed LLM stage."""
    timer = timer or PhaseTimer()
    warnings = [] if warnings is None else warnings
    probe = LinearProbe(stage.probe_W_CD, stage.probe_b_C)
    probe_f1 = per_class_f1(probe.logits(stage.x_test_ND), stage.y_test_N)
    eligible = [c for c in range(len(LETTERS)) if probe_f1[c] > cfg.min_probe_f1]
    result: dict = {
        "metric": "absorption_first_letter",
        "layer": int(layer),
        **summarize(
            {},
            len(eligible),
            min_eligible_letters=cfg.min_eligible_letters,
            min_probe_f1=cfg.min_probe_f1,
        ),
        "n_eligible_letters": len(eligible),
        "eligible_letters": [LETTERS[c] for c in eligible],
        "per_letter": {},
        "probe_f1": {LETTERS[c]: probe_f1[c] for c in range(len(LETTERS))},
        "n_words": {
            "train": len(stage.train_words),
            "test": len(stage.test_words),
            "true_positives": len(stage.abs_words),
        },
        "settings": {
            "bos": bos.to_dict(),
            "prompt_format": cache.PROMPT_FORMAT,
            "k_sparse_probe_init": "torch.nn.Linear default (uniform +-1/sqrt(d_sae)), seeded",
            "max_words_per_letter": cfg.max_words_per_letter,
        },
        "cache_hit": cache_hit,
        "warnings": warnings,
        "timings_s": timer.seconds,
        "config": asdict(cfg),
    }
    if not eligible:
        msg = (
            f"absorption: no letter's ground-truth probe reaches F1 > {cfg.min_probe_f1} at "
            f"layer {layer}; the model does not represent first letters linearly here, so "
            "there is no absorption score (mean_full_absorption_score is null)"
        )
        logger.warning(msg)
        warnings.append(msg)
        return result
    if len(eligible) < cfg.min_eligible_letters:
        msg = (
            f"absorption: only {len(eligible)} letters have ground-truth probe F1 > "
            f"{cfg.min_probe_f1} (SAEBench requires {cfg.min_eligible_letters}), so there is "
            "no SAEBench score (null); all_eligible_letters averages the letters available. "
            "A larger vocabulary (max_words_per_letter) trains a better probe"
        )
        logger.warning(msg)
        warnings.append(msg)

    with timer.phase("sae_encode"):
        f_train = encode_batched(sae, stage.x_train_ND, cfg.sae_batch_size)
        f_test = encode_batched(sae, stage.x_test_ND, cfg.sae_batch_size)
        f_abs = encode_batched(sae, stage.x_abs_ND, cfg.sae_batch_size)
    W_dec_FD = sae.W_dec.detach().float().cpu()
    if W_dec_FD.shape != (f_abs.shape[1], stage.x_abs_ND.shape[1]):
        raise ConfigError(
            f"absorption: sae.W_dec has shape {tuple(W_dec_FD.shape)}, expected "
            f"[d_sae={f_abs.shape[1]}, d_model={stage.x_abs_ND.shape[1]}]"
        )
    with timer.phase("k_sparse_probes"):
        k_sparse = k_sparse_probe_letters(
            f_train,
            stage.y_train_N,
            f_test,
            stage.y_test_N,
            eligible,
            cfg,
            _resolve_device(cfg.device),
        )
    thresholds = AbsorptionThresholds.from_config(cfg)
    with timer.phase("scoring"), progress_bar(len(eligible), "absorption scoring", "letter") as bar:
        for c in eligible:
            bar.update()
            rows = stage.y_abs_N == c
            scored = score_letter(
                stage.x_abs_ND[rows],
                f_abs[rows],
                W_dec_FD,
                probe.W_CD[c],
                k_sparse[c].main_latents,
                thresholds,
            )
            result["per_letter"][LETTERS[c]] = {
                "full_absorption_rate": scored.full_absorption_rate,
                "fractional": scored.mean_fraction,
                "fractional_var": scored.fraction_var,
                "n_true_positives": int(rows.sum()),
                "n_full_absorption": int(scored.is_full_N.sum()),
                "main_latents": [int(i) for i in k_sparse[c].main_latents],
                "absorbing_latents": scored.absorbing_latents(),
                "k_sparse_latents": [int(i) for i in k_sparse[c].latents_by_k[-1]],
                "k_sparse_f1": k_sparse[c].f1_by_k,
                "probe_f1": probe_f1[c],
            }
    result.update(
        summarize(
            result["per_letter"],
            len(eligible),
            min_eligible_letters=cfg.min_eligible_letters,
            min_probe_f1=cfg.min_probe_f1,
        )
    )
    extra = result["all_eligible_letters"]
    logger.info(
        "absorption: mean_full_absorption_score=%s (SAEBench rule, lower is better; "
        "all %d eligible letters: %.4f +- %.4f over %d true positives); phases %s",
        "null"
        if result["mean_full_absorption_score"] is None
        else f"{result['mean_full_absorption_score']:.4f}",
        extra["n_scored_letters"],
        extra["mean_full_absorption_score"] or 0.0,
        extra["mean_full_absorption_score_se"] or 0.0,
        extra["n_true_positives"],
        {k: round(v, 2) for k, v in timer.seconds.items()},
    )
    return result
