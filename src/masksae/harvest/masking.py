"""The paper's Bernoulli token masking, as a pure function of (seed, sequence index).

Sequence ``i`` draws ``context_length`` uniforms from ``numpy.random.default_rng(
SeedSequence([seed, i]))``; token ``t`` is replaced by the mask token when its draw is below
``p``, unless it is a special token (BOS/EOS/PAD/...) or at position 0. The draw does not depend
on batching, chunking, resuming or the worker, so every harvest of the same settings produces
the same masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from masksae.errors import ConfigError

DEFAULT_MASK_STRING = "..."


def validate_mask_prob(p: float) -> float:
    """Return ``p`` as a float; ConfigError unless 0 <= p < 1."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ConfigError(
            f"mask probability {p!r} is out of range: expected 0 <= p < 1 "
            "(0 gives the plain cache; the paper uses 0.3)"
        )
    return float(p)


def special_token_ids(tokenizer: Any) -> np.ndarray:
    """Sorted int64 array of every special token id (BOS, EOS, PAD, UNK, added specials)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return np.asarray(sorted(ids), dtype=np.int64)


def resolve_mask_token(
    tokenizer: Any, mask_string: str, mask_token_id: int | None, vocab_size: int
) -> tuple[int, str]:
    """(mask token id, mask string); ConfigError when the string is not exactly one token."""
    if mask_token_id is not None:
        if isinstance(mask_token_id, bool) or not 0 <= int(mask_token_id) < vocab_size:
            raise ConfigError(
                f"mask token id {mask_token_id!r} is out of range: expected 0..{vocab_size - 1}"
            )
        if int(mask_token_id) in set(special_token_ids(tokenizer).tolist()):
            raise ConfigError(
                f"mask token id {mask_token_id} is a special token: choose an ordinary token"
            )
        return int(mask_token_id), tokenizer.decode([int(mask_token_id)])
    ids = tokenizer.encode(mask_string, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(
            f"mask string {mask_string!r} encodes to {len(ids)} tokens {list(ids)}, expected "
            "exactly one: choose another --mask-string or give the token with --mask-token-id"
        )
    return int(ids[0]), mask_string


def mask_draw(seed: int, seq_index: int, length: int, p: float) -> np.ndarray:
    """Raw Bernoulli(p) draws [length] of sequence ``seq_index`` (before exclusions)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(seq_index)]))
    return rng.random(length) < p


def mask_sequences(
    ids_ST: np.ndarray,
    seq_indices_S: np.ndarray,
    *,
    seed: int,
    p: float,
    mask_id: int,
    special_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask a block of sequences.

    Returns (masked ids [S, T] int32, masked flags [S, T] bool, excluded flags [S, T] bool);
    ``excluded`` marks position 0 and special tokens of the original ids.
    """
    n_seqs, length = ids_ST.shape
    excluded = np.isin(ids_ST, special_ids)
    excluded[:, 0] = True
    if p > 0:
        draws = np.stack([mask_draw(seed, int(i), length, p) for i in seq_indices_S])
    else:
        draws = np.zeros((n_seqs, length), dtype=bool)
    masked = draws & ~excluded
    out = np.where(masked, np.int32(mask_id), ids_ST).astype(np.int32, copy=False)
    return out, masked, excluded
