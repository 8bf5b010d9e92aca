"""Latent ablation on mean-pooled activations (shared by SCR and TPP).

SAEBench ablates per token: x' = decode(f with the chosen latents zeroed) + (x - decode(f)),
then mean-pools x' over the text's real tokens. The decoder is affine (decode(f) = f W_dec +
b_dec), so x' = x - sum over chosen latents l of f_l W_dec[l], and its mean over tokens is

    pooled(x') = pooled(x) - pooled(f)[:, chosen] @ W_dec[chosen]

with pooled(f) the mean-pooled latents: exact, and computed from the per-text pooled latents
that every probing metric needs anyway (``tests/test_probing_metrics.py`` checks it against
the per-token rule). SAEBench's one difference: positions it zeroes (BOS/EOS/PAD) still pass
decode(f') - decode(f) of a zero input into its sum; here they are simply not part of the text.
"""

from __future__ import annotations

import numpy as np


def decoder_matrix(sae) -> np.ndarray:
    """float32 [F, D]: the SAE's decoder rows."""
    return sae.W_dec.detach().float().cpu().numpy()


def node_effects(
    f_pooled: np.ndarray,
    y: np.ndarray,
    probe_w: np.ndarray,
    W_dec_FD: np.ndarray,
    *,
    absolute: bool,
    positive_only: bool,
) -> np.ndarray:
    """float32 [F]: each latent's effect on a probe (SAEBench's
    get_effects_per_class_precomputed_acts): (mean latent over positives - over negatives),
    clamped at 0 with ``positive_only`` (TPP), times the probe weight's projection on the
    latent's decoder row; absolute value with ``absolute`` (SCR)."""
    diff = f_pooled[y == 1].mean(axis=0) - f_pooled[y == 0].mean(axis=0)
    if positive_only:
        diff = np.maximum(diff, 0.0)
    effects = diff * (W_dec_FD @ probe_w)
    return np.abs(effects) if absolute else effects


def top_n_latents(effects: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest effects among the non-zero ones (fewer when fewer are
    non-zero: SAEBench's select_top_n_features), largest first."""
    nonzero = np.flatnonzero(effects != 0)
    if nonzero.size == 0:
        return nonzero
    order = nonzero[np.argsort(-effects[nonzero], kind="stable")]
    return order[: min(n, order.size)]


def ablate_pooled(
    x_pooled: np.ndarray, f_pooled: np.ndarray, W_dec_FD: np.ndarray, latents: np.ndarray
) -> np.ndarray:
    """Mean-pooled activations after zero-ablating ``latents`` and adding back the error."""
    if latents.size == 0:
        return x_pooled
    return x_pooled - f_pooled[:, latents] @ W_dec_FD[latents]


def linear_accuracy(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    """Accuracy of the linear probe (w, b) predicting 1 where X w + b > 0."""
    return float((((X @ w) + b > 0).astype(np.int64) == y).mean())
