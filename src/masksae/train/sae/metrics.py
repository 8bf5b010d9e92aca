"""Reconstruction metrics reported by every architecture's training step."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def recon_metrics(x_BD: Tensor, x_hat_BD: Tensor, l0: Tensor) -> dict[str, Tensor]:
    """Detached fp32 scalars.

    mse: mean over tokens and dims of (x - x_hat)^2; l2_loss: mean over tokens of
    ||x - x_hat||^2; fvu: sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2; l0: mean number
    of active latents per token.
    """
    x_BD = x_BD.float()
    err_B = (x_BD - x_hat_BD.float()).pow(2).sum(dim=-1)
    total = (x_BD - x_BD.mean(dim=0, keepdim=True)).pow(2).sum()
    return {
        "mse": err_B.mean() / x_BD.shape[-1],
        "l2_loss": err_B.mean(),
        "fvu": err_B.sum() / total.clamp_min(1e-12),
        "l0": l0.detach().float(),
    }
