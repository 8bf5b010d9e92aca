"""Corruptions of the training text compared with the paper's masking, at equal rate p.

Every corruption starts from the same position draw as the masking
(:func:`masksae.harvest.masking.mask_draw`): in sequence ``i`` the positions whose
``SeedSequence([seed, i])`` uniform is below ``p`` and that are neither a special token nor
position 0. So at one seed and p all corruptions touch exactly the positions the masking
replaces; they differ in what happens there:

- ``mask``: the token becomes the mask token (``--mask-string``, ``--mask-token-id``, or the
  tokenizer's own unk/pad token with ``--mask-token-role``). The paper's method.
- ``random_uniform`` / ``random_unigram``: the token becomes a random token, uniform over the
  vocabulary without the special tokens, or drawn from the unigram frequencies of the corpus
  being harvested (counted over its first ``unigram_tokens`` packed tokens, special tokens
  not counted; see :func:`unigram_table`). The replacement of position ``t`` is the ``t``-th
  uniform of ``SeedSequence([seed, i, 1])`` mapped through the candidates' cumulative
  distribution, and may by chance equal the original token (it still counts as replaced).
- ``delete``: the token is removed and the sequence shortens (see :func:`corrupt_block`).
- ``noise``: the text stays clean; Gaussian noise N(0, sigma^2 I) is added to the captured
  activation of every usable token (not special, not position 0), drawn from
  ``SeedSequence([seed, i, 2])`` as a [T, D] float32 array. ``sigma`` is either given or
  calibrated so the noise's mean squared shift equals masking's (:func:`calibrate_noise`).

All draws are pure functions of (seed, sequence index), generated with numpy on the CPU, so
a resumed, re-chunked or multi-worker harvest - on any device - writes the same tokens and
the same noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from masksae.errors import ConfigError
from masksae.harvest.masking import mask_draw

CORRUPTIONS = ("mask", "random_uniform", "random_unigram", "delete", "noise")
"""Corruption kinds, the values of ``HarvestConfig.corruption`` / ``--corruption``."""
MASK_TOKEN_ROLES = ("unk", "pad")
"""Tokenizer tokens usable as the mask with ``--mask-token-role``."""
REPLACEMENT_STREAM = 1
"""Third SeedSequence entry of the random-replacement draws (the position draw has none)."""
NOISE_STREAM = 2
"""Third SeedSequence entry of the Gaussian-noise draws."""
DEFAULT_UNIGRAM_TOKENS = 1_000_000
"""Tokens counted (from the start of the harvest's packed sequences) for unigram frequencies."""
DEFAULT_NOISE_CALIBRATION_SEQUENCES = 64
"""Sequences (the harvest's first) on which masking's activation shift is measured."""


@dataclass(frozen=True)
class Corruption:
    """A resolved corruption: what the runner applies to each block of sequences."""

    kind: str
    """One of :data:`CORRUPTIONS`."""
    p: float
    """Rate: the probability that an eligible position is drawn."""
    seed: int
    """Seed of every draw (with the sequence index)."""
    mask_id: int
    """Mask token (kind ``mask``; also the masking that ``noise`` is calibrated against)."""
    replacement_ids: np.ndarray | None = None
    """Sorted candidate replacement ids (``random_*``)."""
    replacement_cdf: np.ndarray | None = None
    """Cumulative probabilities over ``replacement_ids`` (``random_*``), last entry 1."""
    fill_id: int = 0
    """Token id written into the tail a deletion frees (``delete``); flagged excluded."""
    noise_sigma: float = 0.0
    """Per-dimension standard deviation of the added noise (``noise``)."""


@dataclass
class CorruptedBlock:
    """A block of S sequences after corruption, each [S, T]."""

    ids: np.ndarray
    """int32 token ids fed to the model."""
    masked: np.ndarray
    """bool: the position holds a replacement (mask or random token)."""
    excluded: np.ndarray
    """bool: special token, position 0, or the freed tail of a deleted sequence."""
    position: np.ndarray
    """int32 position of each token in its (possibly shortened) sequence."""
    n_deleted: int = 0
    """Tokens deleted from the block (``delete``)."""


def validate_kind(kind: str) -> str:
    """``kind`` if it is a known corruption; ConfigError listing them otherwise."""
    if kind not in CORRUPTIONS:
        raise ConfigError(
            f"corruption {kind!r} is unknown: expected one of {', '.join(CORRUPTIONS)}"
        )
    return kind


def role_token_id(tokenizer: Any, role: str) -> int:
    """The tokenizer's ``unk`` or ``pad`` token id; ConfigError if it has none."""
    if role not in MASK_TOKEN_ROLES:
        raise ConfigError(
            f"mask token role {role!r} is unknown: expected one of {', '.join(MASK_TOKEN_ROLES)}"
        )
    value = getattr(tokenizer, f"{role}_token_id", None)
    if value is None:
        raise ConfigError(
            f"the tokenizer defines no {role} token: use --mask-string or --mask-token-id instead"
        )
    return int(value)


def _draw_positions(
    excluded_ST: np.ndarray, seq_indices_S: np.ndarray, seed: int, p: float
) -> np.ndarray:
    n_seqs, length = excluded_ST.shape
    if p <= 0:
        return np.zeros((n_seqs, length), dtype=bool)
    draws = np.stack([mask_draw(seed, int(i), length, p) for i in seq_indices_S])
    return draws & ~excluded_ST


def replacement_uniforms(seed: int, seq_index: int, length: int) -> np.ndarray:
    """The [length] uniforms that pick the random replacements of sequence ``seq_index``."""
    rng = np.random.default_rng(
        np.random.SeedSequence([int(seed), int(seq_index), REPLACEMENT_STREAM])
    )
    return rng.random(length)


def corrupt_block(
    ids_ST: np.ndarray, seq_indices_S: np.ndarray, corruption: Corruption, special_ids: np.ndarray
) -> CorruptedBlock:
    """Apply ``corruption`` to a block of packed sequences ``ids_ST`` (global indices
    ``seq_indices_S``).

    Deletion: sequence ``i`` keeps the text of clean sequence ``i`` minus its drawn tokens,
    moved left so positions are renumbered 0..L-1 (what the model sees: a shorter sequence).
    To keep the store's fixed layout (S x T rows, the same ``seq_index`` as the clean store)
    the freed tail L..T-1 is filled with ``fill_id`` and flagged excluded: the model runs on
    the padded sequence, and causal attention makes the kept positions exactly those of the
    short sequence. The store so holds about (1 - p) as many usable tokens as the clean one.
    """
    ids_ST = np.asarray(ids_ST)
    n_seqs, length = ids_ST.shape
    excluded = np.isin(ids_ST, special_ids)
    excluded[:, 0] = True
    drawn = _draw_positions(excluded, seq_indices_S, corruption.seed, corruption.p)
    position = np.broadcast_to(np.arange(length, dtype=np.int32), (n_seqs, length)).copy()
    kind = corruption.kind
    if kind == "noise" or not drawn.any():
        no_change = np.zeros_like(drawn)
        return CorruptedBlock(ids_ST.astype(np.int32), no_change, excluded, position)
    if kind == "mask":
        out = np.where(drawn, np.int32(corruption.mask_id), ids_ST).astype(np.int32)
        return CorruptedBlock(out, drawn, excluded, position)
    if kind in ("random_uniform", "random_unigram"):
        assert corruption.replacement_ids is not None and corruption.replacement_cdf is not None
        uniforms = np.stack(
            [replacement_uniforms(corruption.seed, int(i), length) for i in seq_indices_S]
        )
        pick = np.searchsorted(corruption.replacement_cdf, uniforms, side="right")
        pick = np.minimum(pick, len(corruption.replacement_ids) - 1)  # guards cdf rounding
        replacement = corruption.replacement_ids[pick].astype(np.int32)
        out = np.where(drawn, replacement, ids_ST).astype(np.int32)
        return CorruptedBlock(out, drawn, excluded, position)
    if kind == "delete":
        out = np.full((n_seqs, length), corruption.fill_id, dtype=np.int32)
        out_excluded = np.ones((n_seqs, length), dtype=bool)
        for s in range(n_seqs):
            keep = ~drawn[s]
            kept = int(keep.sum())
            out[s, :kept] = ids_ST[s, keep]
            out_excluded[s, :kept] = excluded[s, keep]
        return CorruptedBlock(
            out, np.zeros_like(drawn), out_excluded, position, n_deleted=int(drawn.sum())
        )
    raise ConfigError(f"corruption {kind!r} is unknown")  # validate_kind guards this


def noise_draw(seed: int, seq_index: int, length: int, d_model: int) -> np.ndarray:
    """Standard normal float32 [length, d_model] of sequence ``seq_index`` (before sigma)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(seq_index), NOISE_STREAM]))
    return rng.standard_normal((length, d_model), dtype=np.float32)


def block_noise(
    seq_indices_S: np.ndarray, excluded_ST: np.ndarray, d_model: int, corruption: Corruption
) -> np.ndarray:
    """Noise [S*T, D] float32 for a block: sigma x the draws, zero at excluded positions."""
    n_seqs, length = excluded_ST.shape
    noise = np.empty((n_seqs * length, d_model), dtype=np.float32)
    for s, index in enumerate(seq_indices_S):
        rows = noise[s * length : (s + 1) * length]
        rows[:] = noise_draw(corruption.seed, int(index), length, d_model)
        rows *= np.float32(corruption.noise_sigma)
        rows[excluded_ST[s]] = 0.0
    return noise


# ---- replacement vocabularies -------------------------------------------------------------


def uniform_table(vocab_size: int, special_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cdf) of the uniform distribution over 0..vocab_size-1 without special ids."""
    ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), special_ids)
    if ids.size == 0:
        raise ConfigError("the vocabulary holds only special tokens: nothing to draw from")
    cdf = np.arange(1, ids.size + 1, dtype=np.float64) / ids.size
    return ids, cdf


def unigram_counts(
    sequences: Iterable[np.ndarray], vocab_size: int, special_ids: np.ndarray, max_tokens: int
) -> tuple[np.ndarray, int, int]:
    """Token counts [vocab_size] int64 over the first sequences holding ``max_tokens`` tokens
    (whole sequences, at least one), special tokens not counted; with the number of
    sequences read and of tokens counted."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    n_seqs = 0
    seen = 0
    for seq in sequences:
        counts += np.bincount(np.asarray(seq, dtype=np.int64), minlength=vocab_size)[:vocab_size]
        n_seqs += 1
        seen += len(seq)
        if seen >= max_tokens:
            break
    counts[special_ids[special_ids < vocab_size]] = 0
    return counts, n_seqs, int(counts.sum())


def unigram_table(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cdf) of the unigram distribution: tokens with a positive count, in id order,
    with probability count / total (no smoothing: unseen tokens are never drawn)."""
    ids = np.flatnonzero(counts > 0).astype(np.int64)
    if ids.size == 0:
        raise ConfigError("the unigram count is empty (no ordinary token in the corpus sample)")
    cdf = np.cumsum(counts[ids], dtype=np.float64)
    cdf /= cdf[-1]
    return ids, cdf


def counts_digest(counts: np.ndarray) -> str:
    """SHA-256 (first 128 bits) of the int64 count vector: identifies the unigram table."""
    return hashlib.sha256(np.ascontiguousarray(counts, dtype=np.int64).tobytes()).hexdigest()[:32]


# ---- noise calibration ----------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseCalibration:
    """Masking's mean squared activation shift on a calibration batch, and the matched sigma."""

    mean_sq_shift: float
    """Mean over counted tokens of ||h_masked - h_clean||^2."""
    masked_mean_sq_shift: float
    """The same mean over the masked positions only."""
    unmasked_mean_sq_shift: float
    """The same mean over the unmasked (context-shifted) positions only."""
    tokens: int
    """Tokens counted (usable in both runs: not special, not position 0, no norm outlier)."""
    masked_tokens: int
    """Of which masked."""
    sequences: int
    """Calibration sequences (the harvest's first)."""
    d_model: int
    """Activation width D."""

    @property
    def sigma(self) -> float:
        """sqrt(mean_sq_shift / D): N(0, sigma^2 I_D) noise has E||n||^2 = D sigma^2."""
        return math.sqrt(self.mean_sq_shift / self.d_model)


def calibrate_noise(
    capture: Callable[[np.ndarray], np.ndarray],
    ids_ST: np.ndarray,
    *,
    seed: int,
    p: float,
    mask_id: int,
    special_ids: np.ndarray,
    outlier_norm_factor: float,
) -> NoiseCalibration:
    """Measure masking's activation shift on the calibration sequences ``ids_ST`` (the
    harvest's first, global indices 0..S-1).

    ``capture(ids_BT)`` returns the hooked activations [B, T, D] (float) of a batch. Both runs
    see the same sequences; the masked one replaces exactly the positions a ``mask`` harvest
    of this seed and p replaces. Counted: tokens that are not special, not position 0, and
    not a norm outlier (same rule and factor as the harvest, over the calibration batch) in
    either run - outliers would dominate the mean and are excluded from training anyway.
    """
    from masksae.harvest.outliers import flag_norm_outliers

    n_seqs, length = ids_ST.shape
    mask = Corruption(kind="mask", p=p, seed=seed, mask_id=mask_id)
    block = corrupt_block(ids_ST, np.arange(n_seqs, dtype=np.int64), mask, special_ids)
    clean = np.asarray(capture(np.asarray(ids_ST)), dtype=np.float64)
    masked = np.asarray(capture(block.ids), dtype=np.float64)
    d_model = clean.shape[-1]
    clean = clean.reshape(-1, d_model)
    masked = masked.reshape(-1, d_model)
    excluded = block.excluded.reshape(-1)
    outliers = flag_norm_outliers(
        np.linalg.norm(clean, axis=1), excluded, outlier_norm_factor
    ) | flag_norm_outliers(np.linalg.norm(masked, axis=1), excluded, outlier_norm_factor)
    counted = ~excluded & ~outliers
    sq_shift = ((masked - clean) ** 2).sum(axis=1)
    is_masked = block.masked.reshape(-1) & counted
    is_unmasked = ~block.masked.reshape(-1) & counted

    def mean(sel: np.ndarray) -> float:
        return float(sq_shift[sel].mean()) if sel.any() else 0.0

    if not counted.any():
        raise ConfigError(
            "the noise calibration batch holds no usable token: use more "
            "--noise-calibration-sequences or a longer --context-length"
        )
    return NoiseCalibration(
        mean_sq_shift=mean(counted),
        masked_mean_sq_shift=mean(is_masked),
        unmasked_mean_sq_shift=mean(is_unmasked),
        tokens=int(counted.sum()),
        masked_tokens=int(is_masked.sum()),
        sequences=n_seqs,
        d_model=d_model,
    )


# ---- resolving a harvest's corruption -------------------------------------------------------

_POSITIONS = (
    "the masking's Bernoulli(mask_prob) draws of SeedSequence([seed, seq_index]): exactly the "
    "positions a mask harvest of this seed replaces (never special tokens or position 0)"
)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} {value!r} is invalid: expected a positive integer")
    return value


def validate_corruption_settings(cfg: Any) -> None:
    """ConfigError naming the first corruption setting of ``cfg`` (a HarvestConfig) that is
    invalid or does not apply to its ``corruption`` kind."""
    kind = validate_kind(cfg.corruption)
    if cfg.mask_token_role is not None:
        if cfg.mask_token_role not in MASK_TOKEN_ROLES:
            raise ConfigError(
                f"--mask-token-role {cfg.mask_token_role!r} is unknown: expected one of "
                f"{', '.join(MASK_TOKEN_ROLES)}"
            )
        if kind not in ("mask", "noise"):
            raise ConfigError(
                f"--mask-token-role does not apply to --corruption {kind} (it chooses the mask "
                "token of --corruption mask, and of noise's calibration): drop it"
            )
    sigma = cfg.noise_sigma
    if sigma is not None:
        if kind != "noise":
            raise ConfigError(
                f"--noise-sigma applies to --corruption noise only, not {kind}: drop it"
            )
        if (
            isinstance(sigma, bool)
            or not isinstance(sigma, (int, float))
            or not 0 <= float(sigma) < math.inf
        ):
            raise ConfigError(
                f"--noise-sigma {sigma!r} is invalid: expected a finite number >= 0 "
                "(or leave it unset to match masking's activation shift)"
            )
    _positive_int(cfg.noise_calibration_sequences, "--noise-calibration-sequences")
    _positive_int(cfg.unigram_tokens, "--unigram-tokens")


def resolve_corruption(plan: Any) -> tuple[Corruption, dict[str, Any] | None]:
    """The Corruption of a HarvestPlan and its provenance table (None for plain masking).

    ``random_unigram`` counts the harvest's first sequences; ``noise`` without a given sigma
    reuses the calibration recorded in the store at ``cfg.out`` when its settings match (a
    resume), else measures it with the plan's model (the ranks of a distributed harvest then
    adopt rank 0's measurement: masksae.harvest.parallel).
    """
    from masksae.harvest.tokenize import separator_id

    cfg = plan.cfg
    kind = cfg.corruption
    base = Corruption(kind=kind, p=cfg.mask_prob, seed=cfg.seed, mask_id=plan.mask_id)
    tokenizer = plan.lm.tokenizer
    if kind == "mask":
        if cfg.mask_token_role is None:
            return base, None
        return base, {"kind": "mask", "mask_token_role": cfg.mask_token_role}
    if kind in ("random_uniform", "random_unigram"):
        model_vocab = int(getattr(plan.lm.model.config, "vocab_size", 0) or len(tokenizer))
        vocab = min(len(tokenizer), model_vocab)  # embedding rows past the tokenizer are unused
        record: dict[str, Any] = {"kind": kind, "positions": _POSITIONS}
        if kind == "random_uniform":
            ids, cdf = uniform_table(vocab, plan.special_ids)
            record["replacement"] = f"uniform over token ids 0..{vocab - 1} except special tokens"
        else:
            counts, n_seqs, n_tokens = unigram_counts(
                plan.sequences(), vocab, plan.special_ids, cfg.unigram_tokens
            )
            ids, cdf = unigram_table(counts)
            record["replacement"] = (
                "unigram frequencies of the harvest's own text: count / total over its first "
                "packed sequences, special tokens not counted, no smoothing"
            )
            record["unigram"] = {
                "sequences_counted": n_seqs,
                "tokens_counted": n_tokens,
                "distinct_tokens": int(ids.size),
                "counts_sha256": counts_digest(counts),
            }
        record["candidates"] = int(ids.size)
        record["replacement_draw"] = (
            "uniform t of SeedSequence([seed, seq_index, 1]) through the candidates' "
            "cumulative distribution"
        )
        return Corruption(
            kind=kind,
            p=cfg.mask_prob,
            seed=cfg.seed,
            mask_id=plan.mask_id,
            replacement_ids=ids,
            replacement_cdf=cdf,
        ), record
    if kind == "delete":
        fill = separator_id(tokenizer)
        fill = fill if fill is not None else int(getattr(tokenizer, "pad_token_id", None) or 0)
        record = {
            "kind": "delete",
            "positions": _POSITIONS,
            "fill_token_id": fill,
            "layout": (
                "sequence i is clean sequence i without its drawn tokens, moved left and "
                "renumbered from position 0; the freed tail holds fill_token_id and is "
                "flagged excluded; records count n_deleted per chunk"
            ),
        }
        return Corruption(
            kind=kind, p=cfg.mask_prob, seed=cfg.seed, mask_id=plan.mask_id, fill_id=fill
        ), record
    sigma, record = _noise_sigma(plan)
    return Corruption(
        kind="noise", p=cfg.mask_prob, seed=cfg.seed, mask_id=plan.mask_id, noise_sigma=sigma
    ), record


def adopt_noise_record(plan: Any, record: dict[str, Any]) -> None:
    """Make ``plan`` (a noise harvest) use the sigma and provenance table ``record`` of
    another rank's plan (rank 0's in a distributed harvest)."""
    import dataclasses

    plan.corruption_record = record
    plan.corruption = dataclasses.replace(plan.corruption, noise_sigma=float(record["sigma"]))


_NOISE_DRAW = (
    "N(0, sigma^2) per dimension from SeedSequence([seed, seq_index, 2]) (float32, numpy), "
    "added to the hooked activation of every token that is not special and not at position 0"
)


def _noise_sigma(plan: Any) -> tuple[float, dict[str, Any]]:
    cfg = plan.cfg
    if cfg.noise_sigma is not None:
        sigma = float(cfg.noise_sigma)
        return sigma, {
            "kind": "noise",
            "sigma": sigma,
            "sigma_source": "given",
            "noise_draw": _NOISE_DRAW,
        }
    n_cal, settings = _calibration_settings(plan)
    measured = _recorded_calibration(cfg.out, settings, getattr(cfg, "storage_options", None))
    if measured is None:
        measured = _measure_calibration(plan, n_cal) if cfg.mask_prob > 0 else _zero_shift(plan)
    calibration = {**settings, **measured}
    sigma = math.sqrt(calibration["mean_sq_shift"] / plan.lm.d_model)
    return sigma, {
        "kind": "noise",
        "sigma": sigma,
        "sigma_source": "calibrated",
        "noise_draw": _NOISE_DRAW,
        "calibration": calibration,
    }


def recorded_noise_record(plan: Any) -> dict[str, Any] | None:
    """The calibration a noise harvest would reuse from the store at ``cfg.out`` (a resume
    with equal calibration settings), or None when it must measure it on the model."""
    _n, settings = _calibration_settings(plan)
    cfg = plan.cfg
    return _recorded_calibration(cfg.out, settings, getattr(cfg, "storage_options", None))


def _calibration_settings(plan: Any) -> tuple[int, dict[str, Any]]:
    """(calibration sequences, the settings a recorded calibration must equal)."""
    cfg = plan.cfg
    n_cal = min(cfg.noise_calibration_sequences, plan.n_sequences)
    settings = {
        "sequences": n_cal,
        "first_sequence": 0,
        "mask_prob": cfg.mask_prob,
        "mask_token_id": plan.mask_id,
        "seed": cfg.seed,
        "outlier_norm_factor": plan.outlier_norm_factor,
        "counted": "tokens neither special, at position 0, nor a norm outlier in either run",
        "rule": "sigma = sqrt(mean_sq_shift / d_model), so E||noise||^2 = mean_sq_shift",
    }
    return n_cal, settings


_MEASURED_KEYS = (
    "mean_sq_shift",
    "masked_mean_sq_shift",
    "unmasked_mean_sq_shift",
    "tokens",
    "masked_tokens",
)


def _zero_shift(plan: Any) -> dict[str, Any]:
    """p = 0 masks nothing: the shift is 0 without running the model."""
    return {key: 0 if key.endswith("tokens") else 0.0 for key in _MEASURED_KEYS}


def _recorded_calibration(
    out: str, settings: dict[str, Any], storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The measured values recorded by an earlier run into the store at ``out`` (a folder or
    a URL) when its calibration settings equal ``settings``: a resume never re-measures
    (floating-point results may differ across devices and thread counts)."""
    from masksae.errors import MasksaeError

    if not out:
        return None
    try:
        from masksae.storage import ActivationStore

        store = ActivationStore.open(out, require_complete=False, storage_options=storage_options)
        provenance = store.provenance
    except (MasksaeError, OSError):  # no store (yet), or not one
        return None
    table = provenance.get("corruption") or {}
    recorded = table.get("calibration") or {}
    if table.get("kind") != "noise" or any(recorded.get(k) != v for k, v in settings.items()):
        return None
    if not all(key in recorded for key in _MEASURED_KEYS):
        return None
    return {key: recorded[key] for key in _MEASURED_KEYS}


def _measure_calibration(plan: Any, n_sequences: int) -> dict[str, Any]:
    import itertools

    import torch

    from masksae.models import capture_resid_post

    lm = plan.lm
    if lm.device.type == "meta":
        raise ConfigError(
            "--corruption noise calibrates its sigma with a forward pass, and this model was "
            "loaded without weights: give --noise-sigma, or plan with the weights loaded (a "
            "resume reuses the calibration recorded in the store)"
        )
    sequences = list(itertools.islice(plan.sequences(), n_sequences))
    if not sequences:
        from masksae.errors import CorpusError

        raise CorpusError(
            f"corpus {plan.cfg.corpus!r} yields no sequence to calibrate the noise on: check "
            "--corpus, --corpus-field and --corpus-filter"
        )
    ids_ST = np.stack(sequences)

    def capture(ids_BT: np.ndarray) -> np.ndarray:
        parts = []
        for lo in range(0, len(ids_BT), plan.cfg.batch_size):
            batch = torch.from_numpy(np.asarray(ids_BT[lo : lo + plan.cfg.batch_size], np.int64))
            h_BTD = capture_resid_post(lm, batch, torch.ones_like(batch), plan.layer)
            parts.append(h_BTD.float().cpu().numpy())
        return np.concatenate(parts)

    cal = calibrate_noise(
        capture,
        ids_ST,
        seed=plan.cfg.seed,
        p=plan.cfg.mask_prob,
        mask_id=plan.mask_id,
        special_ids=plan.special_ids,
        outlier_norm_factor=plan.outlier_norm_factor,
    )
    return {
        "mean_sq_shift": cal.mean_sq_shift,
        "masked_mean_sq_shift": cal.masked_mean_sq_shift,
        "unmasked_mean_sq_shift": cal.unmasked_mean_sq_shift,
        "tokens": cal.tokens,
        "masked_tokens": cal.masked_tokens,
    }
