"""The inference threshold of the BatchTopK family, learned as an EMA during training."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def update_threshold_ema(threshold: Tensor, selected_vals_N: Tensor, beta: float) -> None:
    """In place: m = min positive selected activation (0 if none); theta = m the first time
    (theta < 0 means unset), else theta <- beta * theta + (1 - beta) * m. Always fp32."""
    with torch.autocast(device_type=threshold.device.type, enabled=False):
        vals_N = selected_vals_N.detach().float()
        positive = vals_N[vals_N > 0]
        m = positive.min() if positive.numel() else vals_N.new_zeros(())
        if float(threshold) < 0:
            threshold.copy_(m)
        else:
            threshold.copy_(beta * threshold + (1.0 - beta) * m)
