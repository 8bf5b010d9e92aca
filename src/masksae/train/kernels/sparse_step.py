"""The TopK family's sparse step from the selected values to the prefix errors, as one unit.

Composed of :func:`selected_preacts` (gradients into the encoder through the selected pairs)
and :func:`decoded_prefix_errors` (sparse decode + Matryoshka prefix errors), the backward
is two passes over the entries, each gathering the weight gradients per latent from a
[B, G, D] or [B, D] table written just before. On the CPU with the C kernels the whole
backward is instead one pass split by latent (``sparse_backward_by_latent`` in
``native_cpu.c``): each thread walks the tokens once and adds into the rows of the latents
it owns, so the per-latent gathers do not exist. The tokens' prefix gradients come from the
forward when the caller states the loss gradient it will send (the TopK family does): the
forward writes them in place of the [B, G, D] residuals, which the backward then never reads
(they are rebuilt only if another gradient arrives); otherwise every thread rebuilds them
in L1 from the residuals. Elsewhere (CUDA, no compiler, inputs that need a gradient
themselves, non-fp32 weights) the composition runs; the two are compared by
``tests/test_native_kernels.py`` and both against the dense reference by
``tests/test_kernels.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from masksae.train.kernels import native
from masksae.train.kernels.autograd import selected_preacts, sparse_decode
from masksae.train.kernels.plan import SparsePlan
from masksae.train.kernels.prefix import (
    decoded_prefix_errors,
    final_residual_output,
    native_prefix_forward,
    no_input_grads,
)


class _NativeSparseStep(Function):
    @staticmethod
    def forward(
        ctx, W_enc_DF, b_enc_F, b_dec_D, W_dec_FD, vals_N, x_BD, xin_BD, target_BD, plan,
        n_groups, subtract_b_dec, buffer_name, expected_grad_err_BG,
    ):  # fmt: skip
        x32_BD = x_BD.detach().float().contiguous()
        b_dec32_D = b_dec_D.detach().float().contiguous()
        if xin_BD is None:
            xin_BD = x32_BD - b_dec32_D if subtract_b_dec else x32_BD
        if target_BD is None:  # residuals of x - b_dec - decode
            start_BD, offset_D = x32_BD, b_dec32_D
        else:  # residuals of target - decode (AuxK: target = the main residual, detached)
            start_BD, offset_D = target_BD, torch.zeros_like(b_dec32_D)
        out = native_prefix_forward(
            start_BD, offset_D, vals_N, W_dec_FD, plan, n_groups, buffer_name,
            expected_grad_err_BG,
        )  # fmt: skip
        # the residuals, or with an expected gradient the backward's precomputed inputs for
        # it (and what rebuilds the residuals should another gradient arrive)
        table = out.resid_BGD if out.suffix_BGD is None else out.suffix_BGD
        ctx.save_for_backward(W_enc_DF, W_dec_FD, out.vals32_N, xin_BD, table, start_BD, offset_D)
        ctx.expected = (expected_grad_err_BG, out.grad_vals_N)
        ctx.plan = plan
        ctx.n_groups = n_groups
        ctx.subtract_b_dec = subtract_b_dec
        ctx.decodes_b_dec = target_BD is None
        return out.err_BG, final_residual_output(ctx, out.last_BD)

    @staticmethod
    def backward(ctx, grad_err_BG: Tensor, _grad_resid: Tensor | None):
        if grad_err_BG is None:  # err not used
            return no_input_grads(ctx)
        W_enc_DF, W_dec_FD, vals_N, xin_BD, table_BGD, start_BD, offset_D = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        want_enc = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_err_BG = grad_err_BG.float().contiguous()
        expected_BG, known_grad_vals_N = ctx.expected
        resid_BGD = known_suffix_BGD = None
        if expected_BG is None:
            resid_BGD = table_BGD
        elif torch.equal(grad_err_BG, expected_BG):
            known_suffix_BGD = table_BGD
        else:  # another gradient than expected: rebuild the residuals, compute it in full
            known_grad_vals_N = None
            resid_BGD = _rebuilt_residuals(start_BD, offset_D, vals_N, W_dec_FD, plan, ctx.n_groups)
        _, grad_W_dec, grad_W_enc_FD, grad_b_enc, grad_b_dec = native.sparse_backward_by_latent(
            resid_BGD,
            grad_err_BG,
            plan.bag_offsets,
            plan.lat_offsets,
            plan.lat_N,
            vals_N,
            W_dec_FD.detach(),
            xin_BD if (want_enc or ctx.subtract_b_dec) else None,
            known_grad_vals_N,
            known_suffix_BGD,
        )
        if not ctx.decodes_b_dec:  # b_dec is not in the reconstruction, only in the encoder
            grad_b_dec.zero_()
        b_dec_used = ctx.decodes_b_dec or ctx.subtract_b_dec
        if ctx.subtract_b_dec and grad_b_enc is not None:
            # d/d b_dec of the selected (x - b_dec) @ W_enc entries: -W_enc @ grad_b_enc
            with torch.autocast(device_type="cpu", enabled=False):
                grad_b_dec.sub_(W_enc_DF.detach().float() @ grad_b_enc)
        # W_enc is stored latent-major: the [F, D] gradient transposed is laid out like it
        grad_W_enc = None if grad_W_enc_FD is None else grad_W_enc_FD.t().to(W_enc_DF.dtype)
        return (
            grad_W_enc if ctx.needs_input_grad[0] else None,
            grad_b_enc if ctx.needs_input_grad[1] else None,
            grad_b_dec if ctx.needs_input_grad[2] and b_dec_used else None,
            grad_W_dec if ctx.needs_input_grad[3] else None,
            None, None, None, None, None, None, None, None, None,
        )  # fmt: skip


def _rebuilt_residuals(
    start_BD: Tensor, offset_D: Tensor, vals_N: Tensor, W_dec_FD: Tensor, plan: SparsePlan, G: int
) -> Tensor:
    """Every prefix residual again, as the forward computed them (the same kernel on the same
    inputs: the same bits), for a backward whose gradient the forward did not expect."""
    resid_BGD = torch.empty(start_BD.shape[0], G, start_BD.shape[1], dtype=torch.float32)
    err_BG = torch.empty(start_BD.shape[0], G, dtype=torch.float32)
    native.prefix_decode_forward(
        start_BD.float().contiguous(), offset_D, plan.bag_offsets, plan.lat_N, vals_N, W_dec_FD.detach(), resid_BGD,
        err_BG,
    )  # fmt: skip
    return resid_BGD


def _stated(grad_err: Tensor | None) -> Tensor | None:
    """A caller's stated loss gradient as the C kernels read it (fp32, contiguous)."""
    return None if grad_err is None else grad_err.detach().float().contiguous()


def _usable_xin(xin_BD: Tensor | None, x_BD: Tensor) -> Tensor | None:
    """The caller's encoder input when the kernels can take it as it is (else recomputed)."""
    if xin_BD is None or xin_BD.dtype != torch.float32 or not xin_BD.is_contiguous():
        return None
    return xin_BD if xin_BD.shape == x_BD.shape else None


def _native_applies(x_BD: Tensor, params: tuple[Tensor, Tensor, Tensor, Tensor]) -> bool:
    """The C path serves (x, (W_enc, b_enc, b_dec, W_dec)): fp32 CPU weights, W_enc stored
    latent-major, W_dec row-major, x without a gradient of its own."""
    W_enc_DF, W_dec_FD = params[0], params[3]
    return (
        native.enabled_for(W_dec_FD)
        and not x_BD.requires_grad
        and all(p.dtype == torch.float32 for p in params)
        and W_dec_FD.is_contiguous()
        and W_enc_DF.t().is_contiguous()
    )


def sparse_prefix_errors(
    sel_vals_N: Tensor,
    x_BD: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    b_dec_D: Tensor,
    W_dec_FD: Tensor,
    plan: SparsePlan,
    n_groups: int,
    *,
    subtract_b_dec: bool = True,
    xin_BD: Tensor | None = None,
    expected_grad_err_BG: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(err [B, G] with gradients into the four parameters, final residual [B, D]) of the
    selection (``sel_vals_N``: the selected post-ReLU pre-activations, computed without
    grad, at ``plan``'s entries): ``selected_preacts`` then ``decoded_prefix_errors``.
    ``xin_BD``, when the caller has it: the encoder input, fp32 contiguous ``x - b_dec``
    (``x`` without ``subtract_b_dec``), no gradient.

    ``expected_grad_err_BG``: the gradient the caller's loss will send back to ``err``, when
    it is known before the backward (a fixed weighting of the errors' means, as the TopK
    family's reconstruction loss). The C path then computes the backward's dot products
    (d loss / d value of each entry) in the forward, while the decoder rows are in cache, and
    the backward reads no decoder row: 31% of its time in isolation. The backward uses them
    only if the gradient it receives equals this one exactly; any other (a scaled loss, a
    loss over other terms) is computed in full."""
    params = (W_enc_DF, b_enc_F, b_dec_D, W_dec_FD)
    if _native_applies(x_BD, params):
        return _NativeSparseStep.apply(
            *params, sel_vals_N.detach(), x_BD, _usable_xin(xin_BD, x_BD), None, plan,
            n_groups, subtract_b_dec, "prefix_resids", _stated(expected_grad_err_BG),
        )  # fmt: skip
    vals_N = selected_preacts(
        sel_vals_N, x_BD, W_enc_DF, b_enc_F, b_dec_D, plan, subtract_b_dec=subtract_b_dec
    )
    return decoded_prefix_errors(vals_N, x_BD, b_dec_D, W_dec_FD, plan, n_groups)


def sparse_decode_errors(
    sel_vals_N: Tensor,
    x_BD: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    b_dec_D: Tensor,
    W_dec_FD: Tensor,
    plan: SparsePlan,
    target_BD: Tensor,
    *,
    subtract_b_dec: bool = True,
    xin_BD: Tensor | None = None,
    expected_grad_err_B: Tensor | None = None,
) -> Tensor:
    """err [B] = |target - decode(selection)|^2 (no b_dec in the reconstruction; ``target``
    carries no gradient), with gradients into W_enc, b_enc, b_dec (through the encoder input
    only) and W_dec: AuxK's reconstruction of the main residual from the dead latents. One
    bag per token (``plan`` without groups). The C path is the sparse step's, the fallback
    ``selected_preacts`` + ``sparse_decode``. ``expected_grad_err_B``: as
    :func:`sparse_prefix_errors`' ``expected_grad_err_BG``."""
    params = (W_enc_DF, b_enc_F, b_dec_D, W_dec_FD)
    if _native_applies(x_BD, params) and plan.n_bags == x_BD.shape[0]:
        # the gradient arrives through err[:, 0]: as a [B, 1] column
        expected = None if expected_grad_err_B is None else expected_grad_err_B.reshape(-1, 1)
        err_B1, _ = _NativeSparseStep.apply(
            *params, sel_vals_N.detach(), x_BD, _usable_xin(xin_BD, x_BD), target_BD, plan,
            1, subtract_b_dec, "decode_resids", _stated(expected),
        )  # fmt: skip
        return err_B1[:, 0]
    vals_N = selected_preacts(
        sel_vals_N, x_BD, W_enc_DF, b_enc_F, b_dec_D, plan, subtract_b_dec=subtract_b_dec
    )
    recon_BD = sparse_decode(vals_N, W_dec_FD, plan)
    return (target_BD.detach().float() - recon_BD.float()).pow(2).sum(dim=-1)
