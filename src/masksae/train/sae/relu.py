"""Standard ReLU SAE with an L1 penalty (dictionary_learning's StandardTrainer)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from masksae.train.sae.base import SparseAutoencoder, StepContext, StepOutput
from masksae.train.sae.metrics import recon_metrics
from masksae.train.sae.registry import register
from masksae.train.sae_config import ReLUConfig

__all__ = ["ReLUConfig", "ReLUSAE", "linear_warmup"]


def linear_warmup(step: int, warmup_steps: float) -> float:
    """min(1, step / warmup_steps); 1 when there is no warmup."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


@register("relu")
class ReLUSAE(SparseAutoencoder):
    """f = relu((x - b_dec) @ W_enc + b_enc).

    Loss: mean_b ||x - x_hat||^2 + warmup(step) * l1_coefficient * mean_b ||f||_1. The
    decoder rows are kept at unit norm, so the decoder-norm weighting of the L1 term used by
    some variants is identically 1 and left out.
    """

    config_class = ReLUConfig
    cfg: ReLUConfig

    def encode(self, x_BD: Tensor) -> Tensor:
        return F.relu(self.pre_activations(x_BD))

    def training_loss(self, x_BD: Tensor, ctx: StepContext) -> StepOutput:
        f_BF = self.encode(x_BD)
        x_hat_BD = self.decode(f_BF)
        recon_loss = (x_BD.float() - x_hat_BD.float()).pow(2).sum(dim=-1).mean()
        l1_loss = f_BF.float().abs().sum(dim=-1).mean()
        scale = linear_warmup(ctx.step, self.cfg.l1_warmup_frac * ctx.total_steps)
        loss = recon_loss + scale * self.cfg.l1_coefficient * l1_loss
        active_BF = f_BF.detach() > 0
        metrics = {}
        if ctx.want_metrics:
            metrics = recon_metrics(x_BD, x_hat_BD, active_BF.sum(dim=-1).float().mean())
            metrics["recon_loss"] = recon_loss.detach()
            metrics["l1_loss"] = l1_loss.detach()
        return StepOutput(loss, x_hat_BD, active_BF.any(dim=0), metrics)
