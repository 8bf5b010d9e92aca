"""Top-k selections as flat, (row, latent)-sorted entry lists, and their dense form.

The selection functions take a score matrix: post-ReLU activations (dense path) or raw
pre-activations (fused path, which skips the ReLU pass: the largest pre-activations are the
largest post-ReLU ones, and a selected negative one is a selected zero either way). Selected
values are always returned after the ReLU.

With a ``refine`` (:class:`masksae.train.sae.refine.ExactPreacts`) the scores are a low-precision
(bf16) copy: candidates are taken with a margin, re-ranked on their full-precision values, and
the result is checked against the largest rounding error seen among the candidates (see
``refine``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from masksae.train.kernels import native

if TYPE_CHECKING:
    from masksae.train.sae.refine import ExactPreacts


class Selection(NamedTuple):
    """N selected (token, latent) entries of a [B, F] activation matrix, sorted by (row, lat)."""

    rows_N: Tensor
    """int64 [N]: token index."""
    lat_N: Tensor
    """int64 [N]: latent index."""
    vals_N: Tensor
    """[N]: the selected values after ReLU (zeros when fewer values are positive)."""


# Sample size of the candidate pre-filter of batch_topk_select, and how many candidates (as
# a multiple of the entries wanted) it aims for; a second try aims for _RETRY_MARGIN times.
_SAMPLE = 1 << 16
# values per contiguous block of the sample where it is counted in C (two cache lines of bf16)
_SAMPLE_BLOCK = 64
_MARGIN = 1.5
_RETRY_MARGIN = 6.0
# Re-ranked selections: widen the candidate set at most this often before computing the
# full-precision scores densely.
_MAX_WIDEN = 2


def sample_stride(n: int, n_cols: int, block: int = 1) -> int:
    """A stride near n * block / _SAMPLE (so that blocks of ``block`` values taken at it
    sample about _SAMPLE values) that is coprime with the row length ``n_cols``.

    A stride sharing a factor with F samples only some columns (at B 2048, F 4096 the plain
    n // _SAMPLE = 128 visits 32 of the 4096 latents); a coprime one cycles through all
    residues, so every latent and every row is sampled evenly. With blocks there are only
    about _SAMPLE / block starts, so where the stride spans rows its remainder modulo the row
    is also set near the golden section of the row: the starts' columns j * remainder then
    spread over the whole row (a remainder of 1 would put them all in its first quarter).
    """
    stride = max(block, n // max(1, _SAMPLE // block))
    if block > 1 and stride > n_cols > 1:
        rem = max(1, round(n_cols * (math.sqrt(5) - 1) / 2))
        low = (stride - rem) // n_cols * n_cols + rem  # the nearest with that remainder
        stride = low if stride - low <= low + n_cols - stride else low + n_cols
    while math.gcd(stride, n_cols) != 1:
        stride += 1
    return stride


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _greater(flat: Tensor, t: Tensor, mask_out: Tensor | None) -> tuple[Tensor, Tensor]:
    """(increasing flat indices, values) of the entries > t (compared into ``mask_out`` when
    given). The C scan returns the values it read (no second, random gather over ``flat``).

    On the CPU, for a cut t >= 0, the floats' bit patterns are compared as integers (30-40%
    faster than the float compare): non-negative IEEE floats order like their bits, and
    negative ones (sign bit set) are negative integers, below any t >= 0. NaN scores (a
    diverged run, refused by the trainer's loss check) would count as large here.
    """
    scores = flat
    as_int = _SAME_WIDTH_INT.get(flat.dtype)
    if as_int is not None and flat.device.type == "cpu" and t.dtype == flat.dtype and t >= 0:
        bits, t_bits = flat.view(as_int), t.abs().view(as_int)  # abs: -0.0 has the sign bit
        if bits.is_contiguous() and native.enabled_for(bits):
            # one pass over the scores instead of compare + word scan + gather
            hits = native.greater(bits, int(t_bits), capacity=flat.numel() // 8)
            if hits is not None:
                return hits[0], hits[1].view(flat.dtype)
        flat, t = bits, t_bits
    if mask_out is None:
        mask_out = flat > t
    else:
        torch.gt(flat, t, out=mask_out)
    idx = _nonzero(mask_out)
    return idx, scores[idx]


def _nonzero(mask: Tensor) -> Tensor:
    """Increasing indices of the True entries of a flat bool mask.

    On the CPU a sparse mask is scanned as int64 words first (8 flags each), then only the
    words holding a True are expanded: 1.7x faster than one nonzero over every flag.
    """
    n = mask.numel()
    if mask.device.type != "cpu" or n % 8 or n < 1 << 16 or mask.storage_offset() % 8:
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)
    cand = (words[:, None] * 8 + torch.arange(8, device=mask.device)).reshape(-1)
    return cand[mask[cand]]


def split_flat(idx_N: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """(rows, columns) of flat indices into a [*, n_cols] matrix."""
    if idx_N.dtype == torch.int64 and idx_N.is_contiguous() and native.enabled_for(idx_N):
        return native.split_flat(idx_N, n_cols)  # one pass instead of two int64 divisions
    return idx_N // n_cols, idx_N % n_cols


def top_positions(vals_C: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(the k-th largest of ``vals_C`` as a 0-d tensor, the positions of its k largest in
    increasing order), 1 <= k <= its size. Ties at the k-th value are broken arbitrarily, as
    by ``topk`` (in position order on the CPU's C path: a radix select, ~2.5x faster than
    topk, and no mask / nonzero to put the chosen back in order)."""
    if k <= 0:
        return vals_C.new_full((), float("inf")), torch.zeros(
            0, dtype=torch.int64, device=vals_C.device
        )
    if vals_C.dtype == torch.float32 and vals_C.is_contiguous() and native.enabled_for(vals_C):
        return native.top_positions(vals_C, k)
    top = vals_C.topk(k, sorted=False)
    return top.values.amin(), top.indices.sort().values


def candidates(
    flat: Tensor, count: int, n_cols: int, mask_out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(increasing flat indices, their values, cut t): every entry not among them is <= t, and
    there are at least ``count`` of them, so they hold the ``count`` largest of ``flat``.

    A strided sample estimates a cut exceeded by about _MARGIN * count entries (a few
    microseconds of topk over the sample instead of one over everything); if that leaves too few, the
    same sample gives a lower cut; only then is the exact count-th value computed.
    ``mask_out`` (bool, like ``flat``) is a reusable buffer for the comparison.
    """
    n = flat.numel()
    count = min(count, n)
    if n > 4 * _SAMPLE and _MARGIN * count < n / 4:
        sample = None
        in_c = flat.dtype == torch.bfloat16 and flat.is_contiguous() and native.enabled_for(flat)
        if in_c:
            # blocks of _SAMPLE_BLOCK values, ranked where they lie by a radix select in C:
            # 0.2 ms against 0.45 for the strided copy and topk below (which miss the cache
            # once per sampled value), 0.4 against 0.65 with the scores out of cache
            stride = sample_stride(n, n_cols, _SAMPLE_BLOCK)
            size = native.sample_size(n, stride, _SAMPLE_BLOCK)
        else:
            sample = flat[:: sample_stride(n, n_cols)].contiguous()  # topk is slower on a view
            size = sample.numel()
        for margin in (_MARGIN, _RETRY_MARGIN):
            rank = int((1.0 - margin * count / n) * size)
            if rank < 1:
                break
            # the rank-th smallest as the smallest of the top (size - rank + 1): topk keeps a
            # small heap, 3x faster than kthvalue's full selection over the sample
            if in_c:
                t = native.sample_kth_largest_bf16(flat, stride, _SAMPLE_BLOCK, size - rank + 1)
            else:
                t = sample.topk(size - rank + 1, sorted=False).values.amin()
            cand, vals = _greater(flat, t, mask_out)
            if cand.numel() >= count:
                return cand, vals, t
    t = flat.kthvalue(n - count + 1).values  # the count-th largest value
    cand = (flat >= t).nonzero().squeeze(1)  # ties included; the rest is < t
    return cand, flat[cand], t


@torch.no_grad()
def batch_topk_select(
    score_BF: Tensor,
    k_total: int,
    refine: ExactPreacts | None = None,
    mask_out: Tensor | None = None,
) -> Selection:
    """The ``k_total`` largest entries of the whole batch (BatchTopK: k_total = k * B).

    Exact, but faster than one topk over all B * F values: the top k_total are taken among
    the candidates of :func:`candidates`, which come out of ``nonzero`` already in (row,
    latent) order, so no sort is needed. With ``refine`` the candidates are re-ranked on
    their full-precision values (see module docstring).
    """
    B, F = score_BF.shape
    flat = score_BF.reshape(-1)
    k_total = min(k_total, flat.numel())
    cand_C, vals_C, cut = candidates(flat, k_total, F, mask_out)
    if refine is None:
        _, top = top_positions(vals_C, k_total)
    else:
        chosen = refine.rerank_batch(flat, F, cand_C, vals_C, cut, k_total, mask_out)
        if chosen is None:  # the re-ranking could not be verified: full precision, densely
            return batch_topk_select(refine.dense(), k_total, None, None)
        cand_C, vals_C, top = chosen  # the re-ranker's own top k (one selection, not two)
    flat_idx = cand_C[top]  # increasing positions of increasing indices: (row, latent) order
    vals_N = vals_C[top].clamp_min(0)
    return Selection(*split_flat(flat_idx, F), vals_N)


@torch.no_grad()
def topk_select(
    score_BF: Tensor,
    k: int,
    values_BF: Tensor | None = None,
    refine: ExactPreacts | None = None,
) -> Selection:
    """The ``k`` largest entries of every row of ``score_BF`` (values from ``values_BF``).

    Entries scored -inf are never preferred to finite ones (AuxK masks live latents so).
    With ``refine`` (and no ``values_BF``) the scores are re-ranked in full precision.
    """
    B, F = score_BF.shape
    k = min(k, F)
    if refine is not None:
        idx_BK, vals_BK = refine.rerank_rows(score_BF, k)
    else:
        idx_BK = score_BF.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
        vals_BK = (score_BF if values_BF is None else values_BF).gather(1, idx_BK)
    rows_N = torch.arange(B, device=score_BF.device).repeat_interleave(k)
    return Selection(rows_N, idx_BK.reshape(-1), vals_BK.reshape(-1).clamp_min(0))


def selection_mask(sel: Selection, shape: tuple[int, int]) -> Tensor:
    """bool [B, F] with True at the selected entries."""
    mask_BF = torch.zeros(shape, dtype=torch.bool, device=sel.lat_N.device)
    mask_BF[sel.rows_N, sel.lat_N] = True
    return mask_BF


def fired_latents(sel: Selection, n_latents: int) -> Tensor:
    """bool [F]: latents with a nonzero selected value."""
    lat_N, vals_N = sel.lat_N, sel.vals_N
    if vals_N.dtype == torch.float32 and lat_N.is_contiguous() and vals_N.is_contiguous():
        if native.enabled_for(lat_N):  # one pass, no mask / index / scatter
            return native.fired(lat_N, vals_N, n_latents)
    fired_F = torch.zeros(n_latents, dtype=torch.bool, device=sel.lat_N.device)
    fired_F[sel.lat_N[sel.vals_N != 0]] = True
    return fired_F
