"""Triton implementations of the two sparse primitives (CUDA; CPU under TRITON_INTERPRET=1).

Inputs may be bf16/fp16/fp32; products are accumulated in fp32 and the results are fp32,
like the PyTorch path. Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_D = 128
_BLOCK_N = 64


@triton.jit
def _segment_gather_sum_kernel(
    offsets_ptr,
    cols_ptr,
    weights_ptr,
    table_ptr,
    out_ptr,
    D,
    stride_table,
    stride_out,
    BLOCK_D: tl.constexpr,
):
    # One program per (segment, block of D): out[seg, d] = sum_e w[e] * table[cols[e], d].
    seg = tl.program_id(0)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    start = tl.load(offsets_ptr + seg)
    stop = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e in range(start, stop):
        col = tl.load(cols_ptr + e).to(tl.int64)
        w = tl.load(weights_ptr + e).to(tl.float32)
        row = tl.load(table_ptr + col * stride_table + d_offs, mask=d_mask, other=0.0)
        acc += w * row.to(tl.float32)
    tl.store(out_ptr + seg.to(tl.int64) * stride_out + d_offs, acc, mask=d_mask)


@triton.jit
def _pair_dot_kernel(
    a_ptr,
    ia_ptr,
    b_ptr,
    ib_ptr,
    out_ptr,
    N,
    D,
    stride_a,
    stride_b,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per block of entries: out[e] = <A[ia[e]], B[ib[e]]>, fp32 accumulation.
    n_offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    ia = tl.load(ia_ptr + n_offs, mask=n_mask, other=0).to(tl.int64)
    ib = tl.load(ib_ptr + n_offs, mask=n_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        m = n_mask[:, None] & (d_offs < D)[None, :]
        a = tl.load(a_ptr + ia[:, None] * stride_a + d_offs[None, :], mask=m, other=0.0)
        b = tl.load(b_ptr + ib[:, None] * stride_b + d_offs[None, :], mask=m, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + n_offs, acc, mask=n_mask)


def segment_gather_sum(
    offsets_S1: Tensor, cols_N: Tensor, weights_N: Tensor, table_TD: Tensor
) -> Tensor:
    """out[s] = sum_{e in segment s} weights[e] * table[cols[e]] -> [S, D] fp32."""
    table_TD = table_TD.contiguous()
    n_seg = offsets_S1.numel() - 1
    D = table_TD.shape[1]
    out_SD = torch.empty(n_seg, D, dtype=torch.float32, device=table_TD.device)
    if n_seg == 0:
        return out_SD
    grid = (n_seg, triton.cdiv(D, _BLOCK_D))
    _segment_gather_sum_kernel[grid](
        offsets_S1.contiguous(),
        cols_N.contiguous(),
        weights_N.contiguous(),
        table_TD,
        out_SD,
        D,
        table_TD.stride(0),
        out_SD.stride(0),
        BLOCK_D=_BLOCK_D,
    )
    return out_SD


def pair_dot(A_MD: Tensor, ia_N: Tensor, B_KD: Tensor, ib_N: Tensor) -> Tensor:
    """out[e] = <A[ia[e]], B[ib[e]]> -> [N] fp32."""
    A_MD, B_KD = A_MD.contiguous(), B_KD.contiguous()
    n = ia_N.numel()
    out_N = torch.empty(n, dtype=torch.float32, device=A_MD.device)
    if n == 0:
        return out_N
    D = A_MD.shape[1]
    grid = (triton.cdiv(n, _BLOCK_N),)
    _pair_dot_kernel[grid](
        A_MD,
        ia_N.contiguous(),
        B_KD,
        ib_N.contiguous(),
        out_N,
        n,
        D,
        A_MD.stride(0),
        B_KD.stride(0),
        BLOCK_N=_BLOCK_N,
        BLOCK_D=_BLOCK_D,
    )
    return out_N
