"""The fused TopK-family training step as it was before issue 14 (commit 32d7934), frozen here
as the baseline of ``bench_train_step`` so every later change reports its ratio against it
in the same run. Same function and gradients as today's step (up to fp32 rounding); only the
implementation differs: fp32 encoder product with a separate bias add and ReLU into fresh
[B, F] tensors, the batch top-k pre-filter with the plain stride (n // 65536) and a full topk
fallback, two transposing copies of the encoder gradient, the prefix loss by indexing
``parts[:, i]``, and foreach Adam. Only what the benchmark needs: the Matryoshka/BatchTopK
selection without AuxK (a fresh SAE has no dead latents).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from masksae.train.kernels import make_plan, pair_dot, segment_gather_sum
from masksae.train.sae.metrics import recon_metrics

_SAMPLE = 1 << 16
_MARGIN = 1.5


@torch.no_grad()
def batch_topk_select(post_BF: Tensor, k_total: int) -> tuple[Tensor, Tensor, Tensor]:
    B, Fdim = post_BF.shape
    flat = post_BF.reshape(-1)
    n = flat.numel()
    k_total = min(k_total, n)
    cand_N = None
    if n > 4 * _SAMPLE and _MARGIN * k_total < n / 4:
        sample = flat[:: n // _SAMPLE]
        rank = max(1, int((1.0 - _MARGIN * k_total / n) * sample.numel()))
        t = sample.kthvalue(rank).values
        cand_N = (flat > t).nonzero().squeeze(1)
        if cand_N.numel() < k_total:
            cand_N = None
    if cand_N is None:
        cand_N = torch.arange(n, device=flat.device)
    top = flat[cand_N].topk(k_total, sorted=False).indices
    keep = torch.zeros(cand_N.numel(), dtype=torch.bool, device=flat.device)
    keep[top] = True
    flat_idx = cand_N[keep]
    return flat_idx // Fdim, flat_idx % Fdim, flat[flat_idx]


class _SelectedPreacts(Function):
    @staticmethod
    def forward(ctx, vals_N, x_BD, W_enc_DF, b_enc_F, b_dec_D, plan):
        ctx.save_for_backward(vals_N, x_BD, W_enc_DF, b_enc_F, b_dec_D)
        ctx.plan = plan
        return vals_N.detach().clone()

    @staticmethod
    def backward(ctx, grad_vals_N):
        vals_N, x_BD, W_enc_DF, b_enc_F, b_dec_D = ctx.saved_tensors
        plan = ctx.plan
        g_N = torch.where(vals_N > 0, grad_vals_N.float(), 0.0)
        grad_b_enc = torch.zeros(b_enc_F.shape, dtype=torch.float32, device=g_N.device)
        grad_b_enc.index_add_(0, plan.lat_N, g_N)
        xin_BD = x_BD.float() - b_dec_D.float()
        perm = plan.lat_perm_N
        grad_W_enc_FD = segment_gather_sum(plan.lat_offsets, plan.rows_N[perm], g_N[perm], xin_BD)
        grad_W_enc = grad_W_enc_FD.t().contiguous().to(W_enc_DF.dtype)
        grad_b_dec = -(W_enc_DF.float() @ grad_b_enc).to(b_dec_D.dtype)
        return None, None, grad_W_enc, grad_b_enc.to(b_enc_F.dtype), grad_b_dec, None


class _SparseDecode(Function):
    @staticmethod
    def forward(ctx, vals_N, W_dec_FD, plan):
        ctx.save_for_backward(vals_N, W_dec_FD)
        ctx.plan = plan
        out = segment_gather_sum(plan.bag_offsets, plan.lat_N, vals_N, W_dec_FD)
        return out.to(torch.promote_types(vals_N.dtype, W_dec_FD.dtype))

    @staticmethod
    def backward(ctx, grad_out_SD):
        vals_N, W_dec_FD = ctx.saved_tensors
        plan = ctx.plan
        grad_out_SD = grad_out_SD.contiguous()
        grad_vals = pair_dot(grad_out_SD, plan.bag_N, plan.bag_offsets, plan.lat_N, W_dec_FD)
        perm = plan.lat_perm_N
        grad_W_dec = segment_gather_sum(
            plan.lat_offsets, plan.bag_N[perm], vals_N[perm], grad_out_SD
        ).to(W_dec_FD.dtype)
        return grad_vals.to(vals_N.dtype), grad_W_dec, None


def training_loss(sae, x_BD: Tensor) -> Tensor:
    """The old fused Matryoshka/BatchTopK loss (no AuxK); returns the loss."""
    B, Fdim = x_BD.shape[0], sae.cfg.d_sae
    G = len(sae.group_sizes)
    with torch.no_grad():
        post_BF = F.relu((x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc)
    rows_N, lat_N, vals_N = batch_topk_select(post_BF, sae.cfg.k * B)
    plan = make_plan(rows_N, lat_N, n_rows=B, n_latents=Fdim, group_of_F=sae.group_of_F, n_groups=G)
    vals_N = _SelectedPreacts.apply(vals_N, x_BD, sae.W_enc, sae.b_enc, sae.b_dec, plan)
    parts_BGD = _SparseDecode.apply(vals_N, sae.W_dec, plan).view(B, G, -1)
    x_hat_BD = sae.b_dec.expand_as(parts_BGD[:, 0])
    err_list = []
    for i in range(G):
        x_hat_BD = x_hat_BD + parts_BGD[:, i]
        err_list.append((x_BD.float() - x_hat_BD.float()).pow(2).sum(dim=-1))
    err_BG = torch.stack(err_list, dim=1)
    weights_G = torch.tensor(sae.group_weights, dtype=err_BG.dtype)
    loss = (err_BG.mean(dim=0) * weights_G).mean()
    recon_metrics(x_BD, x_hat_BD, (vals_N != 0).sum().float() / B)
    return loss
