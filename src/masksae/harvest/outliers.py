"""Norm outliers: attention-sink-like tokens with huge activation norms, flagged ``excluded``.

Besides BOS/special tokens and position 0, real models (e.g. SmolLM2 layer 15) produce a
few ordinary tokens, mostly at positions 1-3, whose residual norm is 100x the rest (~25,000
vs a median of ~170). They are not training data: they would dominate the store's
statistics (``norm_scale``) and the SAE's reconstruction loss. Within each chunk, a token
is a norm outlier when its activation norm exceeds ``factor`` x the median norm of the
chunk's other eligible tokens (not special, not position 0). The rule only looks at the
chunk's own activations, so it is deterministic and a resumed or multi-worker harvest flags
exactly the same tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported lazily: masksae --help must not import torch
    import torch

DEFAULT_OUTLIER_NORM_FACTOR = 10.0
"""Default factor: SmolLM2's outliers sit ~150x the median, the 99.9th percentile ~1.6x."""


def outlier_policy(factor: float) -> str:
    """The excluded-token policy of a harvest with this factor (recorded in provenance)."""
    base = "stored and flagged: special tokens and position 0 are written with excluded=True"
    if factor > 0:
        base += (
            f"; so are norm outliers, tokens whose activation L2 norm exceeds "
            f"{factor:g} x the median norm of their chunk's tokens that are neither "
            "special nor at position 0"
        )
    return base + "; the reader skips excluded tokens by default and statistics ignore them"


def validate_outlier_factor(factor: float) -> float:
    """``factor`` as a float; ConfigError unless it is 0 (off) or a finite number > 1."""
    from masksae.errors import ConfigError

    if (
        isinstance(factor, bool)
        or not isinstance(factor, (int, float))
        or not (factor == 0 or 1.0 < float(factor) < float("inf"))
    ):
        raise ConfigError(
            f"--outlier-norm-factor {factor!r} is invalid: expected 0 (off) or a finite "
            f"number > 1, e.g. the default {DEFAULT_OUTLIER_NORM_FACTOR:g}"
        )
    return float(factor)


def row_norms(acts_ND: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row [N] (float32, on the activations' device: cheap on a GPU).

    bf16/fp16 activations are upcast inside the reduction (``dtype=``), not copied to a
    float32 tensor first (a full extra pass over the batch).
    """
    import torch

    return torch.linalg.vector_norm(acts_ND, dim=-1, dtype=torch.float32)


def flag_norm_outliers(
    norms_N: np.ndarray | torch.Tensor, excluded_N: np.ndarray, factor: float
) -> np.ndarray:
    """Bool [N]: eligible tokens (not ``excluded_N``) whose norm > factor x their median.

    ``norms_N`` are the tokens' activation norms (see :func:`row_norms`); ``factor`` 0 flags
    nothing.
    """
    flags = np.zeros(excluded_N.shape[0], dtype=bool)
    eligible = ~np.asarray(excluded_N, dtype=bool)
    if factor <= 0 or not eligible.any():
        return flags
    if hasattr(norms_N, "detach"):  # a torch tensor (torch itself is imported lazily)
        norms_N = norms_N.detach().cpu().numpy()
    norms = np.asarray(norms_N, dtype=np.float64)
    median = float(np.median(norms[eligible]))
    flags[eligible] = norms[eligible] > factor * median
    return flags
