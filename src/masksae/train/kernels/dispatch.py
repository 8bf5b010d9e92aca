"""Pick the implementation of the sparse primitives: Triton on CUDA tensors, PyTorch elsewhere.

``MASKSAE_KERNEL_BACKEND=torch|triton`` forces one (``triton`` on CPU tensors only works
under ``TRITON_INTERPRET=1``, which is how the Triton kernels are tested without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from masksae.train.kernels import native, ops_torch
from masksae.train.kernels.plan import SparsePlan


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def backend_for(t: Tensor) -> str:
    """'triton' or 'torch' for tensors living where ``t`` lives."""
    forced = os.environ.get("MASKSAE_KERNEL_BACKEND", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    return "triton" if t.is_cuda and triton_available() else "torch"


def segment_gather_sum(
    offsets_S1: Tensor, cols_N: Tensor, weights_N: Tensor, table_TD: Tensor
) -> Tensor:
    """See ``ops_torch.segment_gather_sum``; dispatched by device."""
    if backend_for(table_TD) == "triton":
        from masksae.train.kernels import ops_triton

        return ops_triton.segment_gather_sum(offsets_S1, cols_N, weights_N, table_TD)
    return ops_torch.segment_gather_sum(offsets_S1, cols_N, weights_N, table_TD)


def pair_dot(
    A_MD: Tensor,
    rows_N: Tensor,
    offsets_M1: Tensor,
    cols_N: Tensor,
    B_KD: Tensor,
    bias_K: Tensor | None = None,
) -> Tensor:
    """See ``ops_torch.pair_dot``, plus ``bias_K[cols]`` when given (fp32); dispatched by
    device (Triton uses ``rows_N``, PyTorch the CSR pointer ``offsets_M1``)."""
    if _native_f32(A_MD, B_KD) and (bias_K is None or _native_f32(bias_K.contiguous())):
        bias = None if bias_K is None else bias_K.contiguous()
        return native.pair_dot_rows(A_MD, offsets_M1, cols_N, B_KD, bias)  # bias in the pass
    if backend_for(A_MD) == "triton":
        from masksae.train.kernels import ops_triton

        out = ops_triton.pair_dot(A_MD, rows_N, B_KD, cols_N)
    else:
        out = ops_torch.pair_dot(A_MD, rows_N, offsets_M1, cols_N, B_KD)
    return out if bias_K is None else out + bias_K[cols_N]


def gather_per_latent(plan: SparsePlan, cols_N: Tensor, weights_N: Tensor, table_TD: Tensor):
    """[F, D] fp32 weight gradient: out[f] = sum of weights[e] * table[cols[e]] over the
    entries e of latent f (``segment_gather_sum`` in ``plan``'s latent order)."""
    if _native_f32(table_TD, weights_N):
        return native.segment_gather_perm(
            plan.lat_offsets, plan.lat_perm_N, cols_N, weights_N.contiguous(), table_TD
        )
    perm = plan.lat_perm_N
    return segment_gather_sum(plan.lat_offsets, cols_N[perm], weights_N[perm], table_TD)


def _native_f32(*tensors: Tensor) -> bool:
    """The C kernels serve these: fp32 row-major CPU tensors (weights may be any stride)."""
    if backend_for(tensors[0]) == "triton" or not native.enabled_for(tensors[0]):
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and all(
        t.is_contiguous() for t in tensors if t.dim() == 2
    )
