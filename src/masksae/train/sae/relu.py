"""Standard ReLU SAE with an L1 penalty (dictionary_learning's StandardTrainer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from masksae.train.sae.base import (
    SAEConfig,
    SparseAutoencoder,
    StepContext,
    StepOutput,
    check_non_negative,
    check_unit_interval,
)
from masksae.train.sae.metrics import recon_metrics
from masksae.train.sae.registry import register

__all__ = ["ReLUConfig", "ReLUSAE", "linear_warmup"]


def linear_warmup(step: int, warmup_steps: float) -> float:
    """min(1, step / warmup_steps); 1 when there is no warmup."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


@dataclass(kw_only=True)
class ReLUConfig(SAEConfig):
    """ReLU SAE trained with reconstruction + l1_coefficient * L1(f)."""

    architecture: str = "relu"
    """Registry name."""
    l1_coefficient: float = 0.1
    """Weight of the L1 penalty (dictionary_learning's l1_penalty)."""
    l1_warmup_frac: float = 0.05
    """Fraction of the run over which the L1 weight ramps linearly from 0."""

    def validate(self) -> None:
        super().validate()
        check_non_negative("l1_coefficient", self.l1_coefficient)
        check_unit_interval("l1_warmup_frac", self.l1_warmup_frac, closed_right=True)


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
        metrics = recon_metrics(x_BD, x_hat_BD, active_BF.sum(dim=-1).float().mean())
        metrics["recon_loss"] = recon_loss.detach()
        metrics["l1_loss"] = l1_loss.detach()
        return StepOutput(loss, x_hat_BD, active_BF.any(dim=0), metrics)
