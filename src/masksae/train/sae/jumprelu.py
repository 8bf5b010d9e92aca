"""JumpReLU SAE (Rajamanoharan et al. 2024) as dictionary_learning's JumpReluTrainer.

f = z * 1[z > theta] with z = x @ W_enc + b_enc (no b_dec subtraction, as the reference) and a
learned per-latent threshold theta. Gradients to theta use straight-through estimators with
a rectangle kernel of width ``bandwidth``; sparsity is pushed toward ``target_l0`` by
sparsity_coefficient * (L0 / target_l0 - 1)^2 (warmed up linearly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from masksae.train.sae.base import SparseAutoencoder, StepContext, StepOutput
from masksae.train.sae.metrics import recon_metrics
from masksae.train.sae.registry import register
from masksae.train.sae.relu import linear_warmup
from masksae.train.sae_config import JumpReLUConfig

__all__ = ["JumpReLUConfig", "JumpReLUSAE", "jumprelu", "step_fn"]


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth: float):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_z = (z > theta).to(grad_out.dtype) * grad_out
        grad_theta = (-(theta / bw) * _rectangle((z - theta) / bw) * grad_out).sum(dim=0)
        return grad_z, grad_theta.to(theta.dtype), None


class _Step(Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth: float):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_theta = (-(1.0 / bw) * _rectangle((z - theta) / bw) * grad_out).sum(dim=0)
        return torch.zeros_like(z), grad_theta.to(theta.dtype), None


def jumprelu(z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    """z * 1[z > theta]; d/dtheta by the rectangle-kernel STE."""
    return _JumpReLU.apply(z_BF, theta_F, bandwidth)


def step_fn(z_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    """1[z > theta]; no gradient to z, rectangle-kernel STE to theta."""
    return _Step.apply(z_BF, theta_F, bandwidth)


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU with a learned per-latent threshold (an nn.Parameter named ``threshold``)."""

    config_class = JumpReLUConfig
    cfg: JumpReLUConfig
    subtract_b_dec_from_input = False

    def __init__(self, cfg: JumpReLUConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.init_threshold)))

    def encode(self, x_BD: Tensor) -> Tensor:
        z_BF = self.pre_activations(x_BD)
        return F.relu(z_BF * (z_BF > self.threshold))

    def training_loss(self, x_BD: Tensor, ctx: StepContext) -> StepOutput:
        bw = self.cfg.bandwidth
        z_BF = self.pre_activations(x_BD)
        f_BF = jumprelu(z_BF, self.threshold, bw)
        x_hat_BD = self.decode(f_BF)
        recon_loss = (x_BD.float() - x_hat_BD.float()).pow(2).sum(dim=-1).mean()
        # As the reference: the L0 estimator is applied to f (not z).
        l0 = step_fn(f_BF, self.threshold, bw).float().sum(dim=-1).mean()
        scale = linear_warmup(ctx.step, self.cfg.sparsity_warmup_steps)
        sparsity_loss = self.cfg.sparsity_coefficient * (l0 / self.cfg.target_l0 - 1).pow(2) * scale
        loss = recon_loss + sparsity_loss
        active_BF = f_BF.detach() != 0
        metrics = {}
        if ctx.want_metrics:
            metrics = recon_metrics(x_BD, x_hat_BD, active_BF.sum(dim=-1).float().mean())
            metrics["recon_loss"] = recon_loss.detach()
            metrics["sparsity_loss"] = sparsity_loss.detach()
        return StepOutput(loss, x_hat_BD, active_BF.any(dim=0), metrics)

    def _scale_thresholds(self, scale: float) -> None:
        """Every per-latent threshold scales (there is no 'unset' value here)."""
        self.threshold /= scale
