"""Pick the implementation of the sparse primitives: Triton on CUDA tensors, PyTorch elsewhere.

``MASKSAE_KERNEL_BACKEND=torch|triton`` forces one (``triton`` on CPU tensors only works
under ``TRITON_INTERPRET=1``, which is how the Triton kernels are tested without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

from torch import Tensor

from masksae.train.kernels import ops_torch


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
    A_MD: Tensor, rows_N: Tensor, offsets_M1: Tensor, cols_N: Tensor, B_KD: Tensor
) -> Tensor:
    """See ``ops_torch.pair_dot``; dispatched by device (Triton uses ``rows_N``, PyTorch the
    CSR pointer ``offsets_M1``)."""
    if backend_for(A_MD) == "triton":
        from masksae.train.kernels import ops_triton

        return ops_triton.pair_dot(A_MD, rows_N, B_KD, cols_N)
    return ops_torch.pair_dot(A_MD, rows_N, offsets_M1, cols_N, B_KD)
