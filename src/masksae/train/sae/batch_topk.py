"""BatchTopK SAE (Bussmann et al. 2024): top (k * B) activations over the whole batch.

At inference the batch dependence is replaced by a single threshold theta (an EMA of the
smallest selected activation, learned from ``threshold_start_step`` on): f * (f > theta).
"""

from __future__ import annotations

import torch
from torch import Tensor

from masksae.train.kernels.workspace import workspace
from masksae.train.sae.base import StepContext
from masksae.train.sae.refine import ExactPreacts
from masksae.train.sae.registry import register
from masksae.train.sae.selection import Selection, batch_topk_select
from masksae.train.sae.threshold import update_threshold_ema
from masksae.train.sae.topk_family import TopKFamilySAE
from masksae.train.sae_config import BatchTopKConfig

__all__ = ["BatchTopKConfig", "BatchTopKSAE"]


@register("batch_topk")
class BatchTopKSAE(TopKFamilySAE):
    """Batch-level top-k in training; threshold at inference."""

    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig) -> None:
        super().__init__(cfg)
        # -1 = not learned yet; saved with the weights (state_dict) and exported.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))

    def select(self, score_BF: Tensor, refine: ExactPreacts | None = None) -> Selection:
        B, F = score_BF.shape
        # the candidate comparison writes into a reused [B * F] mask (no fresh 8-33 MB map)
        mask = workspace().get("candidate_mask", (B * F,), torch.bool, score_BF.device)
        return batch_topk_select(score_BF, self.cfg.k * B, refine, mask)

    def update_threshold(self, sel: Selection, ctx: StepContext) -> None:
        if ctx.step >= self.cfg.threshold_start_step:
            update_threshold_ema(self.threshold, sel.vals_N, self.cfg.threshold_beta)

    def encode(self, x_BD: Tensor) -> Tensor:
        """f * (f > theta); batch top-k while the threshold is still unset (theta < 0)."""
        post_BF = self.post_relu(x_BD)
        if float(self.threshold) < 0:
            sel = self.select(post_BF.detach())
            f_BF = torch.zeros_like(post_BF)
            f_BF[sel.rows_N, sel.lat_N] = post_BF[sel.rows_N, sel.lat_N]
            return f_BF
        return post_BF * (post_BF > self.threshold.to(post_BF.dtype))
