"""CPU (and fallback) implementations of the two sparse primitives, in plain PyTorch.

Both accumulate in fp32 whatever the input dtype; callers cast the result.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def segment_gather_sum(
    offsets_S1: Tensor, cols_N: Tensor, weights_N: Tensor, table_TD: Tensor
) -> Tensor:
    """out[s] = sum_{e in [offsets[s], offsets[s+1])} weights[e] * table[cols[e]]  -> [S, D] fp32.

    One primitive serves the sparse decoder (segments = tokens, table = W_dec), the decoder
    weight gradient and the encoder weight gradient (segments = latents). embedding_bag is
    PyTorch's fused, multithreaded gather-sum: nothing of size [N, D] is materialised.
    """
    n_seg = offsets_S1.numel() - 1
    table_TD = table_TD.float()
    if cols_N.numel() == 0:
        return table_TD.new_zeros(n_seg, table_TD.shape[1])
    return F.embedding_bag(
        cols_N,
        table_TD,
        offsets_S1,
        mode="sum",
        per_sample_weights=weights_N.float(),
        include_last_offset=True,
    )


def pair_dot(
    A_MD: Tensor, rows_N: Tensor, offsets_M1: Tensor, cols_N: Tensor, B_KD: Tensor
) -> Tensor:
    """out[e] = <A[rows[e]], B[cols[e]]>  -> [N] fp32 (sampled dense-dense product, SDDMM).

    Entries must be sorted by row with ``offsets_M1`` their CSR row pointer, and columns
    unique within a row. On CPU this runs as ``torch.sparse.sampled_addmm`` on a CSR mask,
    which is far faster than gathering [N, D] rows of both operands.
    """
    n = cols_N.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=A_MD.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
        mask = torch.sparse_csr_tensor(
            offsets_M1,
            cols_N,
            torch.zeros(n, dtype=torch.float32, device=A_MD.device),
            size=(A_MD.shape[0], B_KD.shape[0]),
            check_invariants=False,
        )
        out = torch.sparse.sampled_addmm(mask, A_MD.float(), B_KD.float().t(), beta=0.0)
    return out.values()
