"""Index bookkeeping for a sparse selection, built once per step and shared by all kernels.

A selection is a flat list of N (row, latent) entries sorted by (row, latent). Entries are
grouped into *bags* (one output row of the sparse decoder each): bag = row * G + group of
the latent, so a Matryoshka SAE decodes every group of every token in one call (G = 1 for
plain TopK / BatchTopK). The latent-sorted order serves the weight gradients, which are
computed as gathers per latent rather than atomic scatters (deterministic, no atomics).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from masksae.train.kernels import native


class SparsePlan(NamedTuple):
    """CSR views of one selection."""

    rows_N: Tensor
    """int64 [N]: token of each entry (non-decreasing)."""
    lat_N: Tensor
    """int64 [N]: latent of each entry."""
    bag_N: Tensor
    """int64 [N]: output row of the sparse decoder (non-decreasing)."""
    bag_offsets: Tensor
    """int64 [n_bags + 1]: entries of bag j are [bag_offsets[j], bag_offsets[j+1])."""
    row_offsets: Tensor
    """int64 [B + 1]: entries of token b."""
    lat_perm_N: Tensor
    """int64 [N]: permutation sorting the entries by latent."""
    lat_offsets: Tensor
    """int64 [F + 1]: in latent order, entries of latent f."""
    n_bags: int
    """Number of decoder output rows (B * G)."""


def csr_offsets(keys_N: Tensor, n: int) -> Tensor:
    """int64 [n + 1]: the CSR pointer of int64 keys in [0, n) (0, then the running sum of
    each key's count): entries with key j are [out[j], out[j + 1]) once sorted by key."""
    if native.enabled_for(keys_N) and keys_N.is_contiguous():
        return native.csr_offsets(keys_N, n)  # one pass, no min / max scans as bincount's
    counts = torch.bincount(keys_N, minlength=n)
    out = torch.zeros(n + 1, dtype=torch.int64, device=keys_N.device)
    torch.cumsum(counts, dim=0, out=out[1:])
    return out


def _narrow_keys(keys_N: Tensor, bound: int) -> Tensor:
    """``keys_N`` as int32 when every key is below ``bound`` <= 2**31 (fewer radix passes)."""
    return keys_N.int() if bound <= 2**31 else keys_N


def make_plan(
    rows_N: Tensor,
    lat_N: Tensor,
    *,
    n_rows: int,
    n_latents: int,
    group_of_F: Tensor | None = None,
    n_groups: int = 1,
) -> SparsePlan:
    """Plan for entries sorted by (row, latent); ``group_of_F`` maps latent -> group."""
    rows_N = rows_N.long()
    lat_N = lat_N.long()
    if group_of_F is None or n_groups == 1:
        bag_N = rows_N
        n_groups = 1
    elif native.enabled_for(lat_N) and group_of_F.dtype == torch.int64:
        bag_N = native.bag_ids(rows_N.contiguous(), lat_N.contiguous(), group_of_F, n_groups)
    else:
        bag_N = rows_N * n_groups + group_of_F[lat_N]
    n_bags = n_rows * n_groups
    lat_offsets = csr_offsets(lat_N, n_latents)
    # a stable sort keeps each latent's entries in row order: a counting sort in C on the
    # CPU (one pass, the counts are known); else on int32 keys (a radix sort), 1.9x faster
    # than an unstable argsort of unique int64 keys
    if native.enabled_for(lat_N):
        lat_perm_N = native.counting_sort_perm(lat_N.contiguous(), lat_offsets)
    else:
        lat_perm_N = torch.sort(_narrow_keys(lat_N, n_latents), stable=True).indices
    return SparsePlan(
        rows_N=rows_N,
        lat_N=lat_N,
        bag_N=bag_N,
        bag_offsets=csr_offsets(bag_N, n_bags),
        row_offsets=csr_offsets(rows_N, n_rows),
        lat_perm_N=lat_perm_N,
        lat_offsets=lat_offsets,
        n_bags=n_bags,
    )
