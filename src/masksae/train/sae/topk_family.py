"""Shared machinery of TopK, BatchTopK and MatryoshkaBatchTopK.

All three select entries of relu(pre-activations), reconstruct from them (optionally as nested
groups of latents), and add AuxK on dead latents. Only the selection rule, the inference rule
and the group structure differ; subclasses set those. The fused path (``ctx.fused``) and the
dense reference path compute the same function and the same gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from masksae.train.kernels import make_plan, native
from masksae.train.kernels.sparse_step import sparse_decode_errors, sparse_prefix_errors
from masksae.train.kernels.workspace import workspace
from masksae.train.sae.auxk import (
    auxk_denominator,
    auxk_select,
    normalized_auxk_loss,
    normalized_auxk_loss_from_errors,
)
from masksae.train.sae.base import SparseAutoencoder, StepContext, StepOutput
from masksae.train.sae.metrics import recon_metrics_from_errors
from masksae.train.sae.refine import ExactPreacts
from masksae.train.sae.selection import Selection, fired_latents, selection_mask
from masksae.train.sae_config import TopKConfig

__all__ = ["TopKConfig", "TopKFamilySAE"]


class TopKFamilySAE(SparseAutoencoder):
    """Base of the TopK family; subclasses define ``select`` and ``encode``."""

    config_class = TopKConfig
    cfg: TopKConfig

    def __init__(self, cfg: TopKConfig) -> None:
        super().__init__(cfg)
        sizes = self.group_sizes
        group_of_F = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        # Latent -> group index, used to route entries into per-group decoder outputs.
        self.register_buffer("group_of_F", group_of_F, persistent=False)

    # ---- hooks for subclasses ------------------------------------------------------------
    @property
    def group_sizes(self) -> list[int]:
        """Sizes of the nested latent groups (one group of F unless Matryoshka)."""
        return [self.cfg.d_sae]

    @property
    def group_weights(self) -> list[float]:
        """Weight w_i of prefix i in the loss mean_i(w_i * L_i)."""
        return [1.0]

    def select(self, score_BF: Tensor, refine: ExactPreacts | None = None) -> Selection:
        """Training-time selection (no grad) from post-ReLU activations or raw
        pre-activations (same entries; values come back after the ReLU). ``refine``: the
        scores are bf16, re-rank on fp32 values (``masksae.train.sae.refine``)."""
        raise NotImplementedError

    def update_threshold(self, sel: Selection, ctx: StepContext) -> None:
        """Hook for the BatchTopK inference threshold; nothing for plain TopK."""

    # ---- inference helpers ---------------------------------------------------------------
    def post_relu(self, x_BD: Tensor) -> Tensor:
        """relu(pre-activations) [B, F]."""
        return F.relu(self.pre_activations(x_BD))

    def prefix_reconstructions(self, x_BD: Tensor) -> Tensor:
        """[G, B, D]: x_hat_i = b_dec + decoded groups 0..i, using the inference ``encode``."""
        parts_BGD = self._decode_groups_dense(self.encode(x_BD))
        return self.b_dec + parts_BGD.transpose(0, 1).cumsum(dim=0)

    def _decode_groups_dense(self, f_BF: Tensor) -> Tensor:
        """[B, G, D]: each group's latents decoded on their own (no b_dec)."""
        if len(self.group_sizes) == 1:
            return (f_BF @ self.W_dec)[:, None, :]
        groups = zip(
            f_BF.split(self.group_sizes, dim=1),
            self.W_dec.split(self.group_sizes, dim=0),
            strict=True,
        )
        return torch.stack([f @ W for f, W in groups], dim=1)

    # ---- training ------------------------------------------------------------------------
    def selection_scores(
        self, x_BD: Tensor, select_dtype: str = "float32"
    ) -> tuple[Tensor, ExactPreacts | None]:
        """Pre-activations [B, F] to select from (no grad), written into this thread's reused
        buffer, and the fp32 re-ranker when they were computed in bf16 (None otherwise).

        bf16 when ``select_dtype`` is "bfloat16", when bf16 autocast is on, or when the
        weights are bf16; re-ranked only when the weights themselves are more precise.
        The buffer is overwritten by the next step of any SAE on this thread.
        """
        B, Fdim = x_BD.shape[0], self.cfg.d_sae
        W_enc, b_enc = self.W_enc.detach(), self.b_enc.detach()
        ws = workspace()
        low = select_dtype == "bfloat16" or _autocast_bf16(x_BD.device.type)
        with torch.no_grad(), torch.autocast(device_type=x_BD.device.type, enabled=False):
            if not low or W_enc.dtype == torch.bfloat16:
                xin_BD = self._encoder_input(x_BD, W_enc.dtype)
                pre_BF = ws.get("preacts", (B, Fdim), W_enc.dtype, x_BD.device)
                if W_enc.dtype == torch.float32:
                    torch.addmm(b_enc, xin_BD, W_enc, out=pre_BF)
                else:  # round as pre_activations does, so ties break as on the dense path
                    torch.mm(xin_BD, W_enc, out=pre_BF).add_(b_enc)
                return pre_BF, None
            # bf16 copies with the bias folded in as one more input column ([x, 1] @ [W; b]):
            # addmm's separate bias pass over [B, F] cost a third of the bf16 product. The
            # width is padded to a multiple of 16 with zeros (the GEMM's preferred blocking).
            D = x_BD.shape[1]
            K = (D + 1 + 15) // 16 * 16
            lp, dev = torch.bfloat16, x_BD.device
            W_lp_FK = ws.get("W_enc_lowp", (Fdim, K), lp, dev)
            x_lp_BK = ws.get("x_lowp", (B, K), lp, dev)
            if _native_bf16_operands(x_BD, W_enc, b_enc, self.b_dec):
                # one C pass each: x - b_dec (kept in fp32 too) and W_enc, each with its
                # extra column, straight into the padded bf16 operands
                sub = self.b_dec.detach() if self.subtract_b_dec_from_input else None
                xin_BD = x_BD if sub is None else torch.empty_like(x_BD)
                native.rows_to_bf16_padded(
                    x_BD, x_lp_BK, sub_D=sub, f32_out_RD=None if sub is None else xin_BD,
                    extra=1.0,
                )  # fmt: skip
                native.rows_to_bf16_padded(W_enc.t(), W_lp_FK, extra_R=b_enc)
            else:
                xin_BD = self._encoder_input(x_BD, W_enc.dtype)
                W_lp_FK[:, :D].copy_(W_enc.t())  # a plain copy: W_enc is stored latent-major
                W_lp_FK[:, D].copy_(b_enc)
                W_lp_FK[:, D + 1 :].zero_()
                x_lp_BK[:, :D].copy_(xin_BD)
                x_lp_BK[:, D] = 1
                x_lp_BK[:, D + 1 :].zero_()
            pre_BF = ws.get("preacts", (B, Fdim), lp, dev)
            torch.mm(x_lp_BK, W_lp_FK.t(), out=pre_BF)
            return pre_BF, ExactPreacts(xin_BD, W_enc, b_enc)

    def _encoder_input(self, x_BD: Tensor, dtype: torch.dtype) -> Tensor:
        """x (minus b_dec where the architecture subtracts it) in ``dtype``, no grad."""
        xin_BD = x_BD.to(dtype)
        if self.subtract_b_dec_from_input:
            xin_BD = xin_BD - self.b_dec.detach()
        return xin_BD

    def training_loss(self, x_BD: Tensor, ctx: StepContext) -> StepOutput:
        B, Fdim = x_BD.shape[0], self.cfg.d_sae
        G = len(self.group_sizes)
        refine: ExactPreacts | None = None
        if ctx.fused:
            # the [B, F] scores live in a reused buffer; nothing of them reaches autograd
            post_BF, refine = self.selection_scores(x_BD, ctx.select_dtype)
            sel = self.select(post_BF, refine)
            self.last_refine_stats = None if refine is None else refine.stats
            plan = make_plan(
                sel.rows_N,
                sel.lat_N,
                n_rows=B,
                n_latents=Fdim,
                group_of_F=self.group_of_F,
                n_groups=G,
            )
            # encoder pairs, decode, prefix residuals and their norms (kernels/sparse_step.py)
            err_BG, resid_BD = sparse_prefix_errors(
                sel.vals_N,
                x_BD,
                self.W_enc,
                self.b_enc,
                self.b_dec,
                self.W_dec,
                plan,
                G,
                subtract_b_dec=self.subtract_b_dec_from_input,
                xin_BD=None if refine is None else refine.xin_BD,  # computed once per step
                expected_grad_err_BG=(
                    self._recon_loss_grad(B, x_BD.device) if _states_grads(x_BD) else None
                ),
            )
            x_hat_BD = x_BD.float() - resid_BD if ctx.want_metrics else None
        else:
            post_BF = self.post_relu(x_BD)
            sel = self.select(post_BF.detach())
            f_BF = post_BF * selection_mask(sel, (B, Fdim))
            parts_BGD = self._decode_groups_dense(f_BF)
            # the reference: prefix sums as explicit autograd adds over unbind(1) views
            # (indexing parts[:, i] would make each backward zero-fill a [B, G, D] gradient)
            x32_BD = x_BD.float()
            x_hat_BD = self.b_dec.expand_as(x_BD)
            err_list = []
            for part_BD in parts_BGD.unbind(1):
                x_hat_BD = x_hat_BD + part_BD
                err_list.append((x32_BD - x_hat_BD.float()).pow(2).sum(dim=-1))
            err_BG = torch.stack(err_list, dim=1)
            resid_BD = x32_BD - x_hat_BD.detach().float()
        self.update_threshold(sel, ctx)
        recon_loss = self._recon_loss(err_BG)

        fired_F = fired_latents(sel, Fdim)
        # dead = would be dead after this batch's tokens and did not fire in it (the
        # reference's order: count the batch, reset the latents that fired, then mask)
        dead_mask_F = None if ctx.dead_mask_F is None else ctx.dead_mask_F & ~fired_F
        auxk_loss = self._auxk_loss(x_BD, resid_BD, post_BF, dead_mask_F, ctx.fused, refine)
        loss = recon_loss + self.cfg.auxk_alpha * auxk_loss

        if not ctx.want_metrics:
            return StepOutput(loss, x_hat_BD, fired_F, {})
        l0 = (sel.vals_N != 0).sum().float() / B
        metrics = recon_metrics_from_errors(x_BD, err_BG[:, -1], l0)
        metrics["recon_loss"] = recon_loss.detach()
        metrics["auxk_loss"] = auxk_loss.detach()
        if G > 1:
            prefix_err_G = err_BG.detach().mean(dim=0)
            for i in range(G):
                metrics[f"l2_loss_prefix{i}"] = prefix_err_G[i]
        return StepOutput(loss, x_hat_BD, fired_F, metrics)

    def _recon_loss(self, err_BG: Tensor) -> Tensor:
        """The reconstruction loss: mean over groups of weight * mean over tokens of the
        squared error of each prefix [B, G]."""
        weights_G = torch.tensor(self.group_weights, dtype=err_BG.dtype, device=err_BG.device)
        return (err_BG.mean(dim=0) * weights_G).mean()

    def _recon_loss_grad(self, B: int, device: torch.device) -> Tensor:
        """d loss / d err [B, G] as autograd will compute it when the step's loss (recon +
        alpha * AuxK) is backpropagated from 1: the loss is linear in err, so the gradient is
        the same for any err; taken through autograd itself on zeros, it matches bit for
        bit (the fused step checks, and computes in full otherwise)."""
        err_BG = torch.zeros(B, len(self.group_sizes), device=device, requires_grad=True)
        with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
            (grad_BG,) = torch.autograd.grad(self._recon_loss(err_BG), err_BG)
        return grad_BG

    def _auxk_loss_grad(self, residual_BD: Tensor, denom: Tensor) -> Tensor:
        """d (auxk_alpha * AuxK loss) / d err [B], as ``_recon_loss_grad`` (linear in err)."""
        err_B = torch.zeros(residual_BD.shape[0], device=residual_BD.device, requires_grad=True)
        with (
            torch.enable_grad(),
            torch.autocast(device_type=residual_BD.device.type, enabled=False),
        ):
            aux = normalized_auxk_loss_from_errors(residual_BD, err_B, denom)
            (grad_B,) = torch.autograd.grad(self.cfg.auxk_alpha * aux, err_B)
        return grad_B

    def _auxk_loss(
        self,
        x_BD: Tensor,
        resid_BD: Tensor,
        post_BF: Tensor,
        dead_mask_F: Tensor | None,
        fused: bool,
        refine: ExactPreacts | None = None,
    ) -> Tensor:
        aux = auxk_select(post_BF.detach(), dead_mask_F, self.cfg.d_in, refine=refine)
        if aux is None:
            return torch.zeros((), dtype=torch.float32, device=x_BD.device)
        B, Fdim = post_BF.shape
        residual_BD = resid_BD.detach()  # x - x_hat
        if fused:
            plan = make_plan(aux.rows_N, aux.lat_N, n_rows=B, n_latents=Fdim)
            denom = auxk_denominator(residual_BD)
            expected = None
            if _states_grads(x_BD):  # the gradient this loss term sends back to err
                expected = self._auxk_loss_grad(residual_BD, denom)
            err_B = sparse_decode_errors(
                aux.vals_N,
                x_BD,
                self.W_enc,
                self.b_enc,
                self.b_dec,
                self.W_dec,
                plan,
                residual_BD,
                subtract_b_dec=self.subtract_b_dec_from_input,
                xin_BD=None if refine is None else refine.xin_BD,
                expected_grad_err_B=expected,
            )
            return normalized_auxk_loss_from_errors(residual_BD, err_B, denom)
        aux_f_BF = post_BF * selection_mask(aux, (B, Fdim))
        aux_recon_BD = aux_f_BF @ self.W_dec
        return normalized_auxk_loss(residual_BD, aux_recon_BD)


def _states_grads(x_BD: Tensor) -> bool:
    """Whether to tell the fused step the gradient its loss terms will send back: only the
    CPU's C kernels use it, and there is no backward without grad mode."""
    return x_BD.device.type == "cpu" and torch.is_grad_enabled()


def _native_bf16_operands(x_BD: Tensor, W_enc_DF: Tensor, *vectors: Tensor) -> bool:
    """Whether the C kernel makes the bf16 product's operands: fp32 CPU inputs, W_enc stored
    latent-major (its transpose contiguous), x and the bias ``vectors`` contiguous."""
    return (
        native.enabled_for(x_BD)
        and all(t.dtype == torch.float32 for t in (x_BD, W_enc_DF, *vectors))
        and all(t.is_contiguous() for t in (x_BD, W_enc_DF.t(), *vectors))
    )


def _autocast_bf16(device_type: str) -> bool:
    """True inside a bf16 autocast region for ``device_type``."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument (CUDA) / has a CPU twin
        enabled = (
            torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
        )
    if not enabled:
        return False
    try:
        return torch.get_autocast_dtype(device_type) == torch.bfloat16
    except (AttributeError, TypeError):
        return True
