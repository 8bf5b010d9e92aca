"""MatryoshkaBatchTopK SAE (Bussmann et al. 2025; the paper's architecture).

BatchTopK whose latents are split into nested groups; every prefix of groups must
reconstruct x on its own: loss = mean_i(w_i * mean_b ||x - x_hat_i||^2) + auxk_alpha * AuxK,
with x_hat_i = b_dec + sum of the decoded groups 0..i.
"""

from __future__ import annotations

from masksae.train.sae.batch_topk import BatchTopKSAE
from masksae.train.sae.registry import register
from masksae.train.sae_config import (
    DEFAULT_GROUP_FRACTIONS,
    MatryoshkaBatchTopKConfig,
    matryoshka_group_sizes,
)

__all__ = [
    "DEFAULT_GROUP_FRACTIONS",
    "MatryoshkaBatchTopKConfig",
    "MatryoshkaBatchTopKSAE",
    "matryoshka_group_sizes",
]


@register("matryoshka_batch_topk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK training and threshold inference, with the nested-prefix loss."""

    config_class = MatryoshkaBatchTopKConfig
    cfg: MatryoshkaBatchTopKConfig

    @property
    def group_sizes(self) -> list[int]:
        return self.cfg.group_sizes

    @property
    def group_weights(self) -> list[float]:
        return list(self.cfg.group_weights or ())
