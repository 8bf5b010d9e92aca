"""The inference threshold of the BatchTopK family, learned as an EMA during training."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def update_threshold_ema(threshold: Tensor, selected_vals_N: Tensor, beta: float) -> None:
    """In place: m = min positive selected activation (0 if none); theta = m the first time
    (theta < 0 means unset), else theta <- beta * theta + (1 - beta) * m. Always fp32."""
    # written without host syncs (no .item(), no boolean indexing): it runs every step on GPU
    with torch.autocast(device_type=threshold.device.type, enabled=False):
        vals_N = selected_vals_N.detach().float()
        positive_N = torch.where(vals_N > 0, vals_N, torch.inf)
        m = positive_N.amin() if vals_N.numel() else vals_N.new_full((), torch.inf)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # no positive value: m = 0
        ema = beta * threshold + (1.0 - beta) * m
        threshold.copy_(torch.where(threshold < 0, m, ema))
