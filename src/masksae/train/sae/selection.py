"""Top-k selections as flat, (row, latent)-sorted entry lists, and their dense form."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Selection(NamedTuple):
    """N selected (token, latent) entries of a [B, F] activation matrix, sorted by (row, lat)."""

    rows_N: Tensor
    """int64 [N]: token index."""
    lat_N: Tensor
    """int64 [N]: latent index."""
    vals_N: Tensor
    """[N]: the selected values (may include zeros when fewer values are positive)."""


# Sample size and safety margin of the candidate pre-filter of batch_topk_select.
_SAMPLE = 1 << 16
_MARGIN = 1.5


@torch.no_grad()
def batch_topk_select(post_BF: Tensor, k_total: int) -> Selection:
    """The ``k_total`` largest entries of the whole batch (BatchTopK: k_total = k * B).

    Exact, but faster than one topk over all B * F values: a strided sample gives a value
    t exceeded by about 1.5 * k_total entries; the top k_total are taken among those
    candidates (falling back to the full topk if the sample underestimated). Candidates come
    out of ``nonzero`` already in (row, latent) order, so no sort is needed.
    """
    B, F = post_BF.shape
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
    flat_idx = cand_N[keep]  # increasing == (row, latent) order
    return Selection(flat_idx // F, flat_idx % F, flat[flat_idx])


@torch.no_grad()
def topk_select(score_BF: Tensor, k: int, values_BF: Tensor | None = None) -> Selection:
    """The ``k`` largest entries of every row of ``score_BF`` (values from ``values_BF``)."""
    B, F = score_BF.shape
    k = min(k, F)
    idx_BK = score_BF.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    values_BF = score_BF if values_BF is None else values_BF
    rows_N = torch.arange(B, device=score_BF.device).repeat_interleave(k)
    return Selection(rows_N, idx_BK.reshape(-1), values_BF.gather(1, idx_BK).reshape(-1))


def selection_mask(sel: Selection, shape: tuple[int, int]) -> Tensor:
    """bool [B, F] with True at the selected entries."""
    mask_BF = torch.zeros(shape, dtype=torch.bool, device=sel.lat_N.device)
    mask_BF[sel.rows_N, sel.lat_N] = True
    return mask_BF


def fired_latents(sel: Selection, n_latents: int) -> Tensor:
    """bool [F]: latents with a nonzero selected value."""
    fired_F = torch.zeros(n_latents, dtype=torch.bool, device=sel.lat_N.device)
    fired_F[sel.lat_N[sel.vals_N != 0]] = True
    return fired_F
