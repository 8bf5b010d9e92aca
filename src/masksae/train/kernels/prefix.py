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

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import Function

from masksae.train.kernels import native
from masksae.train.kernels.autograd import sparse_decode
from masksae.train.kernels.dispatch import gather_per_latent
from masksae.train.kernels.plan import SparsePlan
from masksae.train.kernels.workspace import workspace


def final_residual_output(ctx, resid_BD: Tensor) -> Tensor:
    """The last prefix residual [B, D], the second output of the (err, residual) Functions
    here and in ``sparse_step``: it never has a gradient, so it is marked non-differentiable
    and no gradient is materialised for it (no [B, D] of zeros each backward)."""
    ctx.mark_non_differentiable(resid_BD)
    ctx.set_materialize_grads(False)
    return resid_BD


def no_input_grads(ctx) -> tuple[None, ...]:
    """Those Functions' backward when err was not used (its gradient is then None)."""
    return (None,) * len(ctx.needs_input_grad)


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
        return err_BG, final_residual_output(ctx, resid_BGD[:, -1])

    @staticmethod
    def backward(ctx, grad_err_BG: Tensor, _grad_resid: Tensor | None):
        if grad_err_BG is None:  # err not used
            return no_input_grads(ctx)
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


class PrefixForward(NamedTuple):
    """What :func:`native_prefix_forward` computed."""

    err_BG: Tensor
    """Squared norm of every prefix residual."""
    resid_BGD: Tensor | None
    """Every prefix residual start - offset - decoded prefix (None with an expected gradient)."""
    last_BD: Tensor
    """The last prefix residual."""
    vals32_N: Tensor
    """The selected values, fp32 contiguous."""
    grad_vals_N: Tensor | None
    """For the expected gradient: d loss / d value of every entry."""
    suffix_BGD: Tensor | None
    """For the expected gradient: the gradient of each group's decoded sum."""


def native_prefix_forward(
    start_BD: Tensor,
    offset_D: Tensor,
    vals_N: Tensor,
    W_dec_FD: Tensor,
    plan: SparsePlan,
    n_groups: int,
    buffer_name: str,
    expected_grad_err_BG: Tensor | None = None,
) -> PrefixForward:
    """The prefix residuals' forward from the C kernel, its [B, G, D] table in the thread's
    workspace buffer ``buffer_name``: every residual, or, given ``expected_grad_err_BG``, the
    backward's suffix gradients for it (then only the last residual is kept, in
    ``buffer_name + "_last"``: the residuals' one use was to rebuild those in the backward)."""
    B, D = start_BD.shape
    ws = workspace()
    table_BGD = ws.get(buffer_name, (B, n_groups, D), torch.float32, start_BD.device)
    expected = expected_grad_err_BG
    last_BD = table_BGD[:, -1]
    if expected is not None:
        last_BD = ws.get(buffer_name + "_last", (B, D), torch.float32, start_BD.device)
    err_BG = torch.empty(B, n_groups, dtype=torch.float32)
    vals32_N = vals_N.detach().float().contiguous()
    grad_vals_N = native.prefix_decode_forward(
        start_BD.detach().float().contiguous(), offset_D.detach().float().contiguous(),
        plan.bag_offsets, plan.lat_N, vals32_N, W_dec_FD.detach(),
        table_BGD if expected is None else last_BD, err_BG, expected,
        None if expected is None else table_BGD,
    )  # fmt: skip
    # written through a pointer: tell autograd, so that a later overwrite of this workspace
    # buffer before the backward that saved it is caught by its in-place check
    torch.autograd.graph.increment_version(table_BGD)
    if expected is None:
        return PrefixForward(err_BG, table_BGD, last_BD, vals32_N, None, None)
    torch.autograd.graph.increment_version(last_BD)
    return PrefixForward(err_BG, None, last_BD, vals32_N, grad_vals_N, table_BGD)


class _NativePrefixDecodeErrors(Function):
    """sparse decode + prefix squared errors in one C pass per token (``native_cpu.c``)."""

    @staticmethod
    def forward(ctx, vals_N, x_BD, b_dec_D, W_dec_FD, plan: SparsePlan, n_groups: int):
        out = native_prefix_forward(
            x_BD, b_dec_D.detach().float(), vals_N, W_dec_FD, plan, n_groups, "prefix_resids"
        )
        ctx.save_for_backward(out.vals32_N, W_dec_FD, out.resid_BGD)
        ctx.plan = plan
        ctx.dtypes = (vals_N.dtype, x_BD.dtype, b_dec_D.dtype)
        return out.err_BG, final_residual_output(ctx, out.last_BD)

    @staticmethod
    def backward(ctx, grad_err_BG: Tensor, _grad_resid: Tensor | None):
        if grad_err_BG is None:  # err not used
            return no_input_grads(ctx)
        vals_N, W_dec_FD, resid_BGD = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        vals_dtype, x_dtype, b_dtype = ctx.dtypes
        B, G, D = resid_BGD.shape
        grad_parts_BGD = workspace().get("prefix_grad", (B, G, D), torch.float32, W_dec_FD.device)
        grad_vals_N = torch.empty_like(vals_N)
        native.prefix_decode_backward(
            resid_BGD, grad_err_BG.float().contiguous(), plan.bag_offsets, plan.lat_N,
            W_dec_FD.detach(), grad_parts_BGD, grad_vals_N,
        )  # fmt: skip
        total_BD = grad_parts_BGD[:, 0]  # every residual is x - b_dec - ...
        grad_x = (-total_BD).to(x_dtype) if ctx.needs_input_grad[1] else None
        grad_b_dec = total_BD.sum(dim=0).to(b_dtype) if ctx.needs_input_grad[2] else None
        grad_W_dec = None
        if ctx.needs_input_grad[3]:
            grad_W_dec = gather_per_latent(
                plan, plan.bag_N, vals_N, grad_parts_BGD.view(B * G, D)
            ).to(W_dec_FD.dtype)
        return grad_vals_N.to(vals_dtype), grad_x, grad_b_dec, grad_W_dec, None, None


def decoded_prefix_errors(
    vals_N: Tensor, x_BD: Tensor, b_dec_D: Tensor, W_dec_FD: Tensor, plan: SparsePlan, n_groups: int
) -> tuple[Tensor, Tensor]:
    """Squared errors [B, G] of the nested reconstructions decoded from a sparse selection
    (``sparse_decode`` of ``plan``'s bags, then :func:`prefix_squared_errors`), and the final
    residual [B, D] (no gradient). On the CPU with fp32 weights one C pass per token does
    both (``native``); elsewhere the two fused PyTorch/Triton steps."""
    if (
        W_dec_FD.dtype == torch.float32
        and W_dec_FD.is_contiguous()
        and native.enabled_for(W_dec_FD)
    ):
        return _NativePrefixDecodeErrors.apply(vals_N, x_BD, b_dec_D, W_dec_FD, plan, n_groups)
    parts_BGD = sparse_decode(vals_N, W_dec_FD, plan).view(x_BD.shape[0], n_groups, -1)
    return prefix_squared_errors(x_BD, b_dec_D, parts_BGD)


def prefix_squared_errors(
    x_BD: Tensor, b_dec_D: Tensor, parts_BGD: Tensor
) -> tuple[Tensor, Tensor]:
    """(err [B, G] fp32 with gradients, final residual x - x_hat [B, D] fp32, no gradient)."""
    return _PrefixSquaredErrors.apply(x_BD, b_dec_D, parts_BGD)
