"""Reconstruction metrics reported by every architecture's training step."""

from __future__ import annotations

import torch
from torch import Tensor

from masksae.train.kernels.workspace import workspace


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


@torch.no_grad()
def recon_metrics_from_errors(x_BD: Tensor, err_B: Tensor, l0: Tensor) -> dict[str, Tensor]:
    """``recon_metrics`` from the per-token squared errors ``err_B`` = ||x - x_hat||^2 the
    loss already computed (one pass over x for the variance instead of three over both)."""
    x_BD = x_BD.float()
    err_B = err_B.detach().float()
    # sum ||x - mean_batch(x)||^2, centred into a reused buffer (Tensor.var over the batch
    # axis is a slow strided reduction on CPU)
    centred_BD = workspace().get("metrics_centred", tuple(x_BD.shape), torch.float32, x_BD.device)
    torch.sub(x_BD, x_BD.mean(dim=0), out=centred_BD)
    total = torch.linalg.vector_norm(centred_BD).square()
    return {
        "mse": err_B.mean() / x_BD.shape[-1],
        "l2_loss": err_B.mean(),
        "fvu": err_B.sum() / total.clamp_min(1e-12),
        "l0": l0.detach().float(),
    }
