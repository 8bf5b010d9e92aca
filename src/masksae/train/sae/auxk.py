"""AuxK: the auxiliary loss that makes dead latents predict the reconstruction residual.

One implementation (selection + normalisation) shared by the dense and fused paths of every
TopK-family architecture (Gao et al. 2024; dictionary_learning's get_auxiliary_loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from masksae.train.sae.refine import ExactPreacts

from masksae.train.sae.selection import Selection, topk_select


def auxk_size(d_in: int, n_dead: int) -> int:
    """k_aux = min(d_in // 2, number of dead latents)."""
    return min(d_in // 2, n_dead)


@torch.no_grad()
def auxk_select(
    post_BF: Tensor,
    dead_mask_F: Tensor | None,
    d_in: int,
    *,
    refine: ExactPreacts | None = None,
) -> Selection | None:
    """Per token, the top k_aux post-ReLU activations among dead latents; None if none dead.

    ``post_BF`` may also be raw pre-activations (same choice, values after the ReLU);
    ``refine``: it is bf16, re-rank on fp32 values. The top k is taken over the dead
    columns alone (gathered, [B, n_dead]) rather than over every column with the live ones
    masked to -inf: the same choice (up to which of several zeros is picked, which carry no
    value and no gradient), without a masked [B, F] pass, and the per-row top-k runs over
    n_dead columns instead of F (dead latents are usually few).
    """
    if dead_mask_F is None:
        return None
    n_dead = int(dead_mask_F.sum())
    k_aux = auxk_size(d_in, n_dead)
    if k_aux == 0:
        return None
    dead_K = dead_mask_F.to(post_BF.device).nonzero().squeeze(1)  # increasing
    score_BK = post_BF.index_select(1, dead_K)
    sub = topk_select(score_BK, k_aux, refine=None if refine is None else refine.columns(dead_K))
    # increasing dead_K keeps each row's latents increasing
    return Selection(sub.rows_N, dead_K[sub.lat_N], sub.vals_N)


def normalized_auxk_loss(residual_BD: Tensor, aux_recon_BD: Tensor) -> Tensor:
    """mean_b ||r - r_aux||^2 / mean_b ||r - mean_b r||^2 (fp32, NaN -> 0).

    ``residual_BD`` is x - x_hat, detached by the caller; ``aux_recon_BD`` is decoded from the
    dead latents without b_dec.
    """
    err_B = (residual_BD.float() - aux_recon_BD.float()).pow(2).sum(dim=-1)
    return normalized_auxk_loss_from_errors(residual_BD, err_B)


def auxk_denominator(residual_BD: Tensor) -> Tensor:
    """mean_b ||r - mean_b r||^2 (fp32): what the AuxK loss is normalised by."""
    residual_BD = residual_BD.float()
    return (residual_BD - residual_BD.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1).mean()


def normalized_auxk_loss_from_errors(
    residual_BD: Tensor, err_B: Tensor, denom: Tensor | None = None
) -> Tensor:
    """:func:`normalized_auxk_loss` given err_B = ||r - r_aux||^2 per token (``denom``:
    :func:`auxk_denominator` of ``residual_BD`` when the caller has it)."""
    if denom is None:
        denom = auxk_denominator(residual_BD)
    return (err_B.mean() / denom).nan_to_num(0.0)
