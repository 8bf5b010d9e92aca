"""Activation statistics: per-chunk partial sums and their aggregate.

Every chunk's completion record holds float64 partial sums over its non-excluded tokens;
the store's statistics are the sum of those records in chunk order, so a resumed store has
exactly the statistics of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_BLOCK_ROWS = 1024  # rows per widening block: the scratch stays in the L2 cache


@dataclass
class ChunkStats:
    """Partial sums of one chunk over its non-excluded tokens (all float64)."""

    count: int
    """Non-excluded tokens in the chunk."""
    sum_D: np.ndarray
    """Per-dimension sum of activations."""
    sumsq_D: np.ndarray
    """Per-dimension sum of squared activations."""
    sum_norm: float
    """Sum of L2 norms."""
    sum_sq_norm: float
    """Sum of squared L2 norms."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (floats round-trip exactly through JSON)."""
        return {
            "count": int(self.count),
            "sum_D": [float(v) for v in self.sum_D],
            "sumsq_D": [float(v) for v in self.sumsq_D],
            "sum_norm": float(self.sum_norm),
            "sum_sq_norm": float(self.sum_sq_norm),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkStats:
        """Inverse of :meth:`to_dict`."""
        return cls(
            count=int(data["count"]),
            sum_D=np.asarray(data["sum_D"], dtype=np.float64),
            sumsq_D=np.asarray(data["sumsq_D"], dtype=np.float64),
            sum_norm=float(data["sum_norm"]),
            sum_sq_norm=float(data["sum_sq_norm"]),
        )


@dataclass
class ActivationStats:
    """Statistics of a store's activations over its non-excluded tokens."""

    n_tokens: int
    """Tokens the statistics cover (non-excluded, masked ones included)."""
    mean_D: np.ndarray
    """Per-dimension mean (float64 [D])."""
    var_D: np.ndarray
    """Per-dimension population variance (float64 [D])."""
    mean_norm: float
    """Mean L2 norm of an activation vector."""
    mean_sq_norm: float
    """Mean squared L2 norm (E||x||^2)."""

    def norm_scale(self) -> float:
        """The scale s with E||s x||^2 = d_model, i.e. sqrt(d_model / E||x||^2)."""
        if self.mean_sq_norm <= 0:
            return 1.0
        return float(np.sqrt(self.mean_D.shape[0] / self.mean_sq_norm))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (as stored in the group attributes)."""
        return {
            "n_tokens": int(self.n_tokens),
            "mean_norm": float(self.mean_norm),
            "mean_sq_norm": float(self.mean_sq_norm),
            "norm_scale": self.norm_scale(),
            "mean_D": [float(v) for v in self.mean_D],
            "var_D": [float(v) for v in self.var_D],
        }

    def summary(self) -> dict[str, float]:
        """A few scalars for humans (store info)."""
        return {
            "n_tokens": int(self.n_tokens),
            "mean_norm": float(self.mean_norm),
            "rms_norm": float(np.sqrt(self.mean_sq_norm)),
            "norm_scale": self.norm_scale(),
            "mean_abs_mean_D": float(np.abs(self.mean_D).mean()) if self.mean_D.size else 0.0,
            "mean_var_D": float(self.var_D.mean()) if self.var_D.size else 0.0,
            "max_var_D": float(self.var_D.max()) if self.var_D.size else 0.0,
        }


def chunk_stats(acts_ND: np.ndarray, excluded_N: np.ndarray, storage_dtype: str) -> ChunkStats:
    """Partial sums of one chunk's non-excluded rows, accumulated in float64.

    bf16/fp16 values and their squares are exact in float32 (8/11-bit mantissas), so those
    are computed in float32 and only accumulated in float64; float32 data goes through
    float64 entirely. Blocks of rows go through two small scratch arrays (cache-resident,
    allocated once per call): no chunk-sized temporaries.
    """
    keep = ~np.asarray(excluded_N, dtype=bool)
    d_model = acts_ND.shape[1]
    sum_D = np.zeros(d_model, dtype=np.float64)
    sumsq_D = np.zeros(d_model, dtype=np.float64)
    sum_norm = 0.0
    sum_sq_norm = 0.0
    wide = np.float64 if storage_dtype == "float32" else np.float32
    x_scratch = np.empty((min(_BLOCK_ROWS, len(acts_ND)), d_model), dtype=wide)
    sq_scratch = np.empty_like(x_scratch)
    for start in range(0, acts_ND.shape[0], _BLOCK_ROWS):
        rows = acts_ND[start : start + _BLOCK_ROWS]
        keep_block = keep[start : start + _BLOCK_ROWS]
        n_kept = int(keep_block.sum())
        if n_kept == 0:
            continue
        if n_kept < len(rows):
            rows = rows[keep_block]
        x_BD, sq_BD = x_scratch[:n_kept], sq_scratch[:n_kept]
        if storage_dtype == "bfloat16":  # the bits, widened and shifted, are the float32
            bits_BD = x_BD.view(np.uint32)
            np.copyto(bits_BD, rows)
            np.left_shift(bits_BD, 16, out=bits_BD)
        else:
            np.copyto(x_BD, rows)
        np.multiply(x_BD, x_BD, out=sq_BD)  # exact for bf16/fp16 inputs
        sum_D += x_BD.sum(axis=0, dtype=np.float64)
        sumsq_D += sq_BD.sum(axis=0, dtype=np.float64)
        sq_norm_B = sq_BD.sum(axis=1, dtype=np.float64)
        sum_norm += float(np.sqrt(sq_norm_B).sum())
        sum_sq_norm += float(sq_norm_B.sum())
    return ChunkStats(int(keep.sum()), sum_D, sumsq_D, sum_norm, sum_sq_norm)


def aggregate(chunks: list[ChunkStats], d_model: int) -> ActivationStats:
    """Combine chunk partial sums (in the given order) into store statistics."""
    count = 0
    sum_D = np.zeros(d_model, dtype=np.float64)
    sumsq_D = np.zeros(d_model, dtype=np.float64)
    sum_norm = 0.0
    sum_sq_norm = 0.0
    for part in chunks:
        count += part.count
        sum_D += part.sum_D
        sumsq_D += part.sumsq_D
        sum_norm += part.sum_norm
        sum_sq_norm += part.sum_sq_norm
    n = max(count, 1)
    mean_D = sum_D / n
    var_D = np.maximum(sumsq_D / n - mean_D * mean_D, 0.0)
    return ActivationStats(count, mean_D, var_D, sum_norm / n, sum_sq_norm / n)
