"""Geometric median by Weiszfeld's algorithm (the b_dec init of every architecture)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(
    points_ND: Tensor, *, max_iter: int = 100, tol: float = 1e-5, eps: float = 1e-8
) -> Tensor:
    """Point minimising the sum of Euclidean distances to the rows of ``points_ND``.

    Weiszfeld iterations from the mean: re-weight each point by 1/distance and average.
    Stops after ``max_iter`` iterations or when the estimate moves less than ``tol``.
    ``eps`` keeps a point that coincides with the estimate from dividing by zero.
    """
    points_ND = points_ND.float()
    guess_D = points_ND.mean(dim=0)
    for _ in range(max_iter):
        prev_D = guess_D
        weights_N = 1.0 / (points_ND - guess_D).norm(dim=1).clamp_min(eps)
        weights_N = weights_N / weights_N.sum()
        guess_D = weights_N @ points_ND
        if (guess_D - prev_D).norm() < tol:
            break
    return guess_D
