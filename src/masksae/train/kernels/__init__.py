"""Fused sparse kernels for the TopK-family SAEs (Triton on CUDA, PyTorch on CPU)."""

from masksae.train.kernels.autograd import selected_preacts, sparse_decode
from masksae.train.kernels.dispatch import backend_for, pair_dot, segment_gather_sum
from masksae.train.kernels.plan import SparsePlan, make_plan

__all__ = [
    "SparsePlan",
    "backend_for",
    "make_plan",
    "pair_dot",
    "segment_gather_sum",
    "selected_preacts",
    "sparse_decode",
]
