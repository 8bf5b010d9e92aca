"""Squared errors of the nested (Matryoshka) prefix reconstructions in a few fused passes.

err[b, i] = || x_b - b_dec - sum_{j <= i} part[b, j] ||^2 for every prefix i of G groups.
Written with autograd ops this is ~4 [B, D] elementwise passes forward and ~6 backward per
group (add, sub, pow, sum and their backwards, each its own OpenMP region and temporary);
here it is one subtraction per group into a [B, G, D] buffer of all prefix residuals and one
norm over it, and, backward, one addcmul per group summing the residuals from the last group
down. The dense reference path keeps the plain autograd loop, so the fused-vs-dense tests
check this backward.

The residuals and the [B, G, D] gradient live in the thread's workspace
(``kernels/workspace.py``): no fresh pages per step. The residuals are saved for backward,
so if a second forward on the same thread overwrote them before this backward ran (two
losses, one backward), autograd's in-place check raises instead of returning wrong
gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from masksae.train.kernels.workspace import workspace


class _PrefixSquaredErrors(Function):
    @staticmethod
    def forward(ctx, x_BD: Tensor, b_dec_D: Tensor, parts_BGD: Tensor):
        with torch.autocast(device_type=x_BD.device.type, enabled=False):
            B, G, D = parts_BGD.shape
            # every prefix residual r_i = x - b_dec - sum_{j <= i} part_j, one sub each; kept
            # for backward, which then needs neither the parts nor a walk re-adding them
            resid_BGD = workspace().get("prefix_resids", (B, G, D), torch.float32, x_BD.device)
            torch.sub(x_BD.float(), b_dec_D.float(), out=resid_BGD[:, 0])
            resid_BGD[:, 0].sub_(parts_BGD[:, 0])
            for i in range(1, G):
                torch.sub(resid_BGD[:, i - 1], parts_BGD[:, i], out=resid_BGD[:, i])
            err_BG = torch.linalg.vector_norm(resid_BGD, dim=-1).square_()
        ctx.save_for_backward(resid_BGD)
        ctx.x_dtype, ctx.b_dtype = x_BD.dtype, b_dec_D.dtype
        ctx.parts_dtype = parts_BGD.dtype
        resid_BD = resid_BGD[:, G - 1]
        ctx.mark_non_differentiable(resid_BD)
        return err_BG, resid_BD

    @staticmethod
    def backward(ctx, grad_err_BG: Tensor, _grad_resid: Tensor | None):
        (resid_BGD,) = ctx.saved_tensors
        with torch.autocast(device_type=resid_BGD.device.type, enabled=False):
            B, G, D = resid_BGD.shape
            g_BG = grad_err_BG.float()
            # d err_i / d part_j = -2 r_i for j <= i, so grad part_j = -2 sum_{i >= j} g_i r_i:
            # a running sum from the last group down, each step one fused addcmul
            ws, dev = workspace(), resid_BGD.device
            grad_parts_BGD = ws.get("prefix_grad", (B, G, D), torch.float32, dev)
            torch.mul(resid_BGD[:, G - 1], g_BG[:, G - 1 :] * -2.0, out=grad_parts_BGD[:, G - 1])
            for i in range(G - 2, -1, -1):
                torch.addcmul(
                    grad_parts_BGD[:, i + 1],
                    g_BG[:, i : i + 1],
                    resid_BGD[:, i],
                    value=-2.0,
                    out=grad_parts_BGD[:, i],
                )
            # every residual is x - b_dec - ..., so grad x = -grad b_dec = sum_i 2 g_i r_i
            total_BD = grad_parts_BGD[:, 0]
            grad_x = grad_b_dec = None
            if ctx.needs_input_grad[0]:
                grad_x = (-total_BD).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_b_dec = total_BD.sum(dim=0).to(ctx.b_dtype)
            grad_parts = grad_parts_BGD.to(ctx.parts_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_b_dec, grad_parts


def prefix_squared_errors(
    x_BD: Tensor, b_dec_D: Tensor, parts_BGD: Tensor
) -> tuple[Tensor, Tensor]:
    """(err [B, G] fp32 with gradients, final residual x - x_hat [B, D] fp32, no gradient)."""
    return _PrefixSquaredErrors.apply(x_BD, b_dec_D, parts_BGD)
