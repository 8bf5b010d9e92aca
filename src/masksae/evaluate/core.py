"""Core reconstruction metrics of an SAE on held-out activations (tensor math only).

Everything here is streamed: :class:`ReconstructionAccumulator` takes one batch at a time
and keeps float64 running sums, so the result does not depend on how the tokens are
batched, except for ``explained_variance_legacy``, whose definition (SAEBench's) centres
each token on the mean *of its batch*.

Two explained-variance definitions are reported, named so they cannot be confused:

- ``explained_variance_legacy``: mean over tokens of
  ``1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2`` (the per-token ratio used for the
  SAEBench paper's numbers).
- ``explained_variance``: ``1 - E||x - x_hat||^2 / sum_d Var(x_d)`` (the corrected
  definition: residual energy over the total variance of the evaluated activations).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from masksae.errors import ConfigError
from masksae.evaluate.config import CoreConfig


class SAELike(Protocol):
    """Anything with the SAE inference interface."""

    def encode(self, x_BD: Tensor) -> Tensor: ...

    def decode(self, f_BF: Tensor) -> Tensor: ...


@dataclass
class _Moments:
    """Per-dimension mean and sum of squared deviations, merged with Chan's formula."""

    n: int = 0
    mean_D: Tensor | None = None
    m2_D: Tensor | None = None

    def update(self, x_BD: Tensor) -> None:
        b = x_BD.shape[0]
        batch_mean = x_BD.mean(0)
        batch_m2 = ((x_BD - batch_mean) ** 2).sum(0)
        if self.mean_D is None or self.m2_D is None:
            self.n, self.mean_D, self.m2_D = b, batch_mean, batch_m2
            return
        n = self.n + b
        delta = batch_mean - self.mean_D
        self.mean_D = self.mean_D + delta * (b / n)
        self.m2_D = self.m2_D + batch_m2 + delta**2 * (self.n * b / n)
        self.n = n

    def total_variance(self) -> float:
        """sum_d Var(x_d) (population variance)."""
        assert self.m2_D is not None
        return float(self.m2_D.sum() / self.n)


@dataclass
class ReconstructionAccumulator:
    """Running sums of every core metric; feed batches with :meth:`update`."""

    d_sae: int
    cfg: CoreConfig = field(default_factory=CoreConfig)
    n_tokens: int = 0
    n_dims: int = 0
    _sq_err: float = 0.0
    _l0: float = 0.0
    _l1: float = 0.0
    _cos: float = 0.0
    _rel_norm: float = 0.0
    _ev_legacy: float = 0.0
    _xhat_sq: float = 0.0
    _x_dot_xhat: float = 0.0
    _fire_count_F: Tensor | None = None
    _moments: _Moments = field(default_factory=_Moments)

    def update(self, x_BD: Tensor, f_BF: Tensor, x_hat_BD: Tensor) -> None:
        """Add one batch: inputs, latent codes and reconstructions."""
        if f_BF.shape[-1] != self.d_sae:
            raise ConfigError(f"latents have width {f_BF.shape[-1]}, expected d_sae={self.d_sae}")
        x = x_BD.detach().to(torch.float64)
        x_hat = x_hat_BD.detach().to(torch.float64)
        f = f_BF.detach()
        b, d = x.shape
        self.n_dims = d
        err_B = ((x - x_hat) ** 2).sum(-1)
        self._sq_err += float(err_B.sum())
        fired_BF = f != 0
        self._l0 += float(fired_BF.sum())
        self._l1 += float(f.abs().to(torch.float64).sum())
        x_norm_B = x.norm(dim=-1)
        xhat_norm_B = x_hat.norm(dim=-1)
        eps = torch.finfo(torch.float64).tiny
        self._cos += float(((x * x_hat).sum(-1) / (x_norm_B * xhat_norm_B).clamp_min(eps)).sum())
        self._rel_norm += float((xhat_norm_B / x_norm_B.clamp_min(eps)).sum())
        centred_B = ((x - x.mean(0)) ** 2).sum(-1)
        self._ev_legacy += float((1.0 - err_B / centred_B.clamp_min(eps)).sum())
        self._xhat_sq += float((x_hat**2).sum())
        self._x_dot_xhat += float((x * x_hat).sum())
        counts = fired_BF.sum(0).to(torch.int64).cpu()
        self._fire_count_F = counts if self._fire_count_F is None else self._fire_count_F + counts
        self._moments.update(x.cpu())
        self.n_tokens += b

    def result(self) -> dict[str, Any]:
        """All metrics as a JSON-able dict (floats, plus the density histogram)."""
        if self.n_tokens == 0 or self._fire_count_F is None:
            raise ConfigError("no activations were evaluated: the evaluation set is empty")
        n = self.n_tokens
        mean_sq_err = self._sq_err / n
        total_var = self._moments.total_variance()
        freq_F = self._fire_count_F.to(torch.float64) / n
        alive = int((self._fire_count_F > 0).sum())
        return {
            "n_tokens": n,
            "l0": self._l0 / n,
            "l1": self._l1 / n,
            "mse": mean_sq_err / self.n_dims,
            "sq_error_per_token": mean_sq_err,
            "explained_variance": 1.0 - mean_sq_err / total_var if total_var > 0 else float("nan"),
            "explained_variance_legacy": self._ev_legacy / n,
            "cosine_similarity": self._cos / n,
            "relative_norm": self._rel_norm / n,
            "relative_reconstruction_bias": (
                self._xhat_sq / self._x_dot_xhat if self._x_dot_xhat != 0 else float("nan")
            ),
            "total_variance": total_var,
            "frac_alive": alive / self.d_sae,
            "frac_dead": 1.0 - alive / self.d_sae,
            "frac_dense": float((freq_F > self.cfg.dense_threshold).to(torch.float64).mean()),
            "feature_density": density_histogram(freq_F, self.cfg),
        }


def density_histogram(freq_F: Tensor, cfg: CoreConfig) -> dict[str, Any]:
    """Histogram of log10 firing frequency over latents that fired; dead ones counted apart.

    Bin i covers [edges[i], edges[i+1]); the last bin includes 0 (a latent firing on every
    token). Frequencies below the lowest edge fall into the first bin.
    """
    n_bins = math.ceil(-cfg.density_bin_min_log10 / cfg.density_bin_width)
    edges = [cfg.density_bin_min_log10 + i * cfg.density_bin_width for i in range(n_bins)] + [0.0]
    alive = freq_F[freq_F > 0]
    counts = [0] * n_bins
    if alive.numel():
        logf = alive.log10()
        idx = ((logf - cfg.density_bin_min_log10) / cfg.density_bin_width).floor().long()
        idx = idx.clamp(0, n_bins - 1)
        counts = torch.bincount(idx, minlength=n_bins).tolist()
    return {
        "log10_bin_edges": edges,
        "counts": counts,
        "n_dead": int((freq_F == 0).sum()),
        "log10_freq_mean": float(alive.log10().mean()) if alive.numel() else float("nan"),
    }


@torch.no_grad()
def reconstruction_metrics(
    sae: SAELike,
    batches: Iterable[Tensor],
    d_sae: int,
    cfg: CoreConfig | None = None,
) -> dict[str, Any]:
    """Core metrics of ``sae`` over activation batches [B, D] (already excluding BOS etc.)."""
    cfg = cfg or CoreConfig()
    acc = ReconstructionAccumulator(d_sae=d_sae, cfg=cfg)
    for x_BD in batches:
        f_BF = sae.encode(x_BD)
        acc.update(x_BD, f_BF, sae.decode(f_BF))
    return acc.result()


def iter_batches(
    acts_ND: Tensor,
    batch_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Iterable[Tensor]:
    """Yield consecutive [<= batch_size, D] slices of a [N, D] tensor on dtype/device.

    A remainder shorter than half a batch is folded into the previous batch, so no batch
    is too small for the batch-centred legacy explained variance.
    """
    n = acts_ND.shape[0]
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < batch_size // 2:
        starts.pop()
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else n
        yield acts_ND[start:stop].to(device=device, dtype=dtype)
