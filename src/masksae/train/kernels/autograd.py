"""The fused autograd pair of the TopK family.

``selected_preacts`` gives the selected encoder activations a gradient path that touches only
the selected (token, latent) pairs; ``sparse_decode`` reconstructs from them. Together the
step costs the dense encoder forward plus O(N * D) for N selected entries, instead of the
four further [B, D] x [D, F] products of the dense path (decoder forward, grad f, grad W_dec,
grad W_enc).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from masksae.train.kernels.dispatch import gather_per_latent, pair_dot, segment_gather_sum
from masksae.train.kernels.plan import SparsePlan


def _no_autocast(t: Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


class _SelectedPreacts(Function):
    @staticmethod
    def forward(
        ctx, vals_N, x_BD, W_enc_DF, b_enc_F, b_dec_D, plan: SparsePlan, subtract_b_dec: bool
    ):
        ctx.save_for_backward(vals_N, x_BD, W_enc_DF, b_enc_F, b_dec_D)
        ctx.plan = plan
        ctx.subtract_b_dec = subtract_b_dec
        return vals_N.detach().clone()

    @staticmethod
    def backward(ctx, grad_vals_N):
        vals_N, x_BD, W_enc_DF, b_enc_F, b_dec_D = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        with _no_autocast(grad_vals_N):
            # ReLU: entries that were selected at value 0 get no gradient.
            g_N = torch.where(vals_N > 0, grad_vals_N.float(), 0.0)
            grad_b_enc = torch.zeros(b_enc_F.shape, dtype=torch.float32, device=g_N.device)
            grad_b_enc.index_add_(0, plan.lat_N, g_N)
            xin_BD = x_BD.float() - b_dec_D.float() if ctx.subtract_b_dec else x_BD.float()
            grad_W_enc_FD = gather_per_latent(plan, plan.rows_N, g_N, xin_BD)
            # W_enc is stored latent-major (strides (1, D), see SparseAutoencoder): the [F, D]
            # gradient transposed is already laid out like it, so autograd keeps it as .grad
            # without the two transposing copies a contiguous [D, F] gradient would cost
            grad_W_enc = grad_W_enc_FD.t().to(W_enc_DF.dtype)
            grad_x = grad_b_dec = None
            if ctx.needs_input_grad[1]:
                W_enc_FD = W_enc_DF.detach().t().contiguous()
                grad_x = segment_gather_sum(plan.row_offsets, plan.lat_N, g_N, W_enc_FD).to(
                    x_BD.dtype
                )
            if ctx.subtract_b_dec and ctx.needs_input_grad[4]:
                # d/d b_dec of sum_entries g * ((x - b_dec) @ W_enc)[row, lat] = -W_enc @ grad_b_enc
                grad_b_dec = -(W_enc_DF.float() @ grad_b_enc).to(b_dec_D.dtype)
        return None, grad_x, grad_W_enc, grad_b_enc.to(b_enc_F.dtype), grad_b_dec, None, None


class _SparseDecode(Function):
    @staticmethod
    def forward(ctx, vals_N, W_dec_FD, plan: SparsePlan):
        ctx.save_for_backward(vals_N, W_dec_FD)
        ctx.plan = plan
        with _no_autocast(vals_N):
            # detached: embedding_bag on a table that requires grad takes its slower
            # training variant (offset2bag bookkeeping) even under no_grad
            out = segment_gather_sum(
                plan.bag_offsets, plan.lat_N, vals_N.detach(), W_dec_FD.detach()
            )
        return out.to(torch.promote_types(vals_N.dtype, W_dec_FD.dtype))

    @staticmethod
    def backward(ctx, grad_out_SD):
        vals_N, W_dec_FD = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        grad_vals = grad_W_dec = None
        with _no_autocast(grad_out_SD):
            grad_out_SD = grad_out_SD.contiguous()
            if ctx.needs_input_grad[0]:
                grad_vals = pair_dot(
                    grad_out_SD, plan.bag_N, plan.bag_offsets, plan.lat_N, W_dec_FD
                ).to(vals_N.dtype)
            if ctx.needs_input_grad[1]:
                grad_W_dec = gather_per_latent(plan, plan.bag_N, vals_N, grad_out_SD).to(
                    W_dec_FD.dtype
                )
        return grad_vals, grad_W_dec, None


def selected_preacts(
    vals_N: Tensor,
    x_BD: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    b_dec_D: Tensor,
    plan: SparsePlan,
    *,
    subtract_b_dec: bool = True,
) -> Tensor:
    """The selected post-ReLU activations ``vals_N`` (computed without grad) with gradients.

    Forward returns ``vals_N``; backward treats it as relu(((x - b_dec) @ W_enc + b_enc)[rows,
    lats]) and sends the gradient to W_enc (per-latent gather), b_enc (index_add), b_dec
    (-W_enc @ grad b_enc) and x, touching only the selected pairs.
    """
    return _SelectedPreacts.apply(
        vals_N.detach(), x_BD, W_enc_DF, b_enc_F, b_dec_D, plan, subtract_b_dec
    )


def sparse_decode(vals_N: Tensor, W_dec_FD: Tensor, plan: SparsePlan) -> Tensor:
    """[n_bags, D]: out[bag] = sum of vals * W_dec[lat] over the bag's entries (no bias)."""
    return _SparseDecode.apply(vals_N, W_dec_FD, plan)
