"""Full and fractional absorption of one letter: a pure function over tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AbsorptionThresholds:
    """SAEBench's absorption thresholds (see AbsorptionConfig for each one's meaning)."""

    full_cos: float = 0.025
    fraction_cos: float = 0.1
    projection_ratio: float = 0.4
    max_absorbing_latents: int = 3
    inactive_eps: float = 1e-8

    @classmethod
    def from_config(cls, cfg) -> AbsorptionThresholds:
        return cls(
            full_cos=cfg.full_absorption_cos_threshold,
            fraction_cos=cfg.fraction_cos_threshold,
            projection_ratio=cfg.projection_ratio_threshold,
            max_absorbing_latents=cfg.max_absorbing_latents,
            inactive_eps=cfg.inactive_eps,
        )


@dataclass
class LetterAbsorption:
    """Per-token absorption of one letter's probe-true-positive tokens."""

    is_full_N: torch.Tensor
    """bool [N]: fully absorbed by a single latent."""
    fraction_N: torch.Tensor
    """float [N] in [0, 1]: fractional absorption."""
    top_latent_N: torch.Tensor
    """long [N]: the latent with the largest act * cos(probe, W_dec)."""

    @property
    def full_absorption_rate(self) -> float:
        n = self.is_full_N.numel()
        return float(self.is_full_N.float().sum() / n) if n else 0.0

    @property
    def mean_fraction(self) -> float:
        n = self.fraction_N.numel()
        return float(self.fraction_N.sum() / n) if n else 0.0

    @property
    def fraction_var(self) -> float:
        """Sample variance of the per-token fractions (0 with fewer than two tokens)."""
        n = self.fraction_N.numel()
        return float(self.fraction_N.double().var(correction=1)) if n > 1 else 0.0

    def absorbing_latents(self) -> list[list[int]]:
        """[[latent, n_tokens], ...]: the top-projecting latent of each fully absorbed token,
        most frequent first (ties by latent id)."""
        latents = self.top_latent_N[self.is_full_N]
        if latents.numel() == 0:
            return []
        ids, counts = latents.unique(return_counts=True)
        pairs = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
        return [[int(i), int(c)] for i, c in pairs]


@torch.inference_mode()
def score_letter(
    x_ND: torch.Tensor,
    f_NF: torch.Tensor,
    W_dec_FD: torch.Tensor,
    probe_D: torch.Tensor,
    main_latents: Sequence[int],
    thresholds: AbsorptionThresholds = AbsorptionThresholds(),
) -> LetterAbsorption:
    """Absorption of the tokens x_ND (LLM activations, all true positives of the letter's
    probe) given their SAE latents f_NF, the decoder W_dec_FD, the letter's probe direction
    and its main latents.

    Full absorption of a token (all must hold): every main latent has act < inactive_eps
    (SAEBench compares the signed activation);
    the latent with the largest act * cos(p_hat, W_dec) has cos >= full_cos; x . p_hat >= 0;
    and that latent's act * cos / (x . p_hat) >= projection_ratio (x . p_hat == 0 counts as
    not absorbed).

    Fractional absorption: with main = sum of act * cos over main latents, total = x . p_hat,
    and absorbers = the sum of the (at most max_absorbing_latents) largest positive
    act * cos among non-main latents with cos >= fraction_cos: 0 if main >= total or
    absorbers / total < projection_ratio; else 1 if main <= 0; else
    a / (a + main) with a = min(absorbers, total - main), clipped to [0, 1].
    """
    x_ND = x_ND.float()
    f_NF = f_NF.float()
    W_dec_FD = W_dec_FD.float().to(f_NF.device)
    p_hat_D = probe_D.float().to(f_NF.device)
    p_hat_D = p_hat_D / p_hat_D.norm()
    n, n_latents = f_NF.shape
    main = torch.as_tensor(list(main_latents), dtype=torch.long, device=f_NF.device)
    if n == 0:
        empty = torch.zeros(0)
        return LetterAbsorption(empty.bool(), empty, empty.long())

    cos_F = torch.nn.functional.cosine_similarity(W_dec_FD, p_hat_D[None, :], dim=-1)
    proj_NF = f_NF * cos_F[None, :]
    total_N = x_ND.to(f_NF.device) @ p_hat_D

    # full absorption by one latent
    if main.numel():
        main_inactive_N = (f_NF[:, main] < thresholds.inactive_eps).all(dim=1)
    else:
        main_inactive_N = torch.ones(n, dtype=torch.bool, device=f_NF.device)
    top_proj_N, top_latent_N = proj_NF.max(dim=1)
    safe_total_N = torch.where(total_N == 0, torch.ones_like(total_N), total_N)
    is_full_N = (
        main_inactive_N
        & (cos_F[top_latent_N] >= thresholds.full_cos)
        & (total_N >= 0)
        & (total_N != 0)
        & (top_proj_N / safe_total_N >= thresholds.projection_ratio)
    )

    # fractional absorption by up to max_absorbing_latents latents
    main_proj_N = proj_NF[:, main].sum(dim=1) if main.numel() else torch.zeros_like(total_N)
    candidate_F = cos_F >= thresholds.fraction_cos
    if main.numel():
        candidate_F[main] = False
    candidate_NF = candidate_F[None, :] & (proj_NF > 0)
    k = min(thresholds.max_absorbing_latents, n_latents)
    absorbers_N = (
        torch.where(candidate_NF, proj_NF, torch.zeros_like(proj_NF)).topk(k, dim=1).values.sum(1)
    )
    no_absorption_N = (main_proj_N >= total_N) | (
        absorbers_N / safe_total_N < thresholds.projection_ratio
    )
    a_N = torch.minimum(absorbers_N, total_N - main_proj_N)
    partial_N = (a_N / (a_N + main_proj_N)).nan_to_num(0.0).clamp(0.0, 1.0)
    fraction_N = torch.where(
        no_absorption_N,
        torch.zeros_like(total_N),
        torch.where(main_proj_N <= 0, torch.ones_like(total_N), partial_N),
    )
    return LetterAbsorption(
        is_full_N=is_full_N.cpu(), fraction_N=fraction_N.cpu(), top_latent_N=top_latent_N.cpu()
    )
