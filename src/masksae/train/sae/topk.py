"""TopK SAE: keep each token's k largest post-ReLU pre-activations (training and inference)."""

from __future__ import annotations

import torch
from torch import Tensor

from masksae.train.sae.refine import ExactPreacts
from masksae.train.sae.registry import register
from masksae.train.sae.selection import Selection, topk_select
from masksae.train.sae.topk_family import TopKConfig, TopKFamilySAE

__all__ = ["TopKConfig", "TopKSAE"]


@register("topk")
class TopKSAE(TopKFamilySAE):
    """Per-token top-k; no threshold."""

    config_class = TopKConfig

    def select(self, score_BF: Tensor, refine: ExactPreacts | None = None) -> Selection:
        return topk_select(score_BF, self.cfg.k, refine=refine)

    def encode(self, x_BD: Tensor) -> Tensor:
        post_BF = self.post_relu(x_BD)
        idx_BK = post_BF.topk(self.cfg.k, dim=-1, sorted=False).indices
        return torch.zeros_like(post_BF).scatter(1, idx_BK, post_BF.gather(1, idx_BK))
