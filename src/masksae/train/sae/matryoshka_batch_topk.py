"""MatryoshkaBatchTopK SAE (Bussmann et al. 2025; the paper's architecture).

BatchTopK whose latents are split into nested groups; every prefix of groups must
reconstruct x on its own: loss = mean_i(w_i * mean_b ||x - x_hat_i||^2) + auxk_alpha * AuxK,
with x_hat_i = b_dec + sum of the decoded groups 0..i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from masksae.errors import ConfigError
from masksae.train.sae.base import check_non_negative
from masksae.train.sae.batch_topk import BatchTopKConfig, BatchTopKSAE
from masksae.train.sae.registry import register

__all__ = ["MatryoshkaBatchTopKConfig", "MatryoshkaBatchTopKSAE", "matryoshka_group_sizes"]

DEFAULT_GROUP_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32)


def matryoshka_group_sizes(d_sae: int, fractions: tuple[float, ...]) -> list[int]:
    """int(f_i * F) for all but the last group, which takes the remainder."""
    sizes = [int(f * d_sae) for f in fractions[:-1]]
    sizes.append(d_sae - sum(sizes))
    return sizes


@dataclass(kw_only=True)
class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    """MatryoshkaBatchTopK: BatchTopK with nested groups of latents."""

    architecture: str = "matryoshka_batch_topk"
    """Registry name."""
    group_fractions: tuple[float, ...] = DEFAULT_GROUP_FRACTIONS
    """Fraction of the dictionary in each group (must sum to 1); F=4096 gives
    128/256/512/1024/2176."""
    group_weights: tuple[float, ...] | None = None
    """Loss weight of each prefix; None = uniform 1/n (filled in on validation)."""

    def validate(self) -> None:
        super().validate()
        fractions = tuple(float(f) for f in self.group_fractions)
        if not fractions or any(not math.isfinite(f) or f <= 0 for f in fractions):
            raise ConfigError(
                f"SAE config: group_fractions={list(self.group_fractions)} must be a non-empty "
                "list of positive numbers"
            )
        if not math.isclose(sum(fractions), 1.0, rel_tol=0, abs_tol=1e-6):
            raise ConfigError(
                f"SAE config: group_fractions={list(fractions)} sum to {sum(fractions):.6g}, "
                "expected 1; the default is [1/32, 1/16, 1/8, 1/4, 1/2 + 1/32]"
            )
        sizes = matryoshka_group_sizes(self.d_sae, fractions)
        if any(s <= 0 for s in sizes):
            raise ConfigError(
                f"SAE config: group_fractions={list(fractions)} with d_sae={self.d_sae} give "
                f"group sizes {sizes}; every group needs at least one latent - use fewer "
                "groups or a larger d_sae"
            )
        self.group_fractions = fractions
        if self.group_weights is None:
            self.group_weights = tuple([1.0 / len(sizes)] * len(sizes))
        weights = tuple(float(w) for w in self.group_weights)
        if len(weights) != len(sizes):
            raise ConfigError(
                f"SAE config: {len(weights)} group_weights for {len(sizes)} groups; give one "
                "weight per group or leave it unset for uniform weights"
            )
        for w in weights:
            check_non_negative("group_weights[i]", w)
        self.group_weights = weights

    @property
    def group_sizes(self) -> list[int]:
        """Latents per group."""
        return matryoshka_group_sizes(self.d_sae, self.group_fractions)


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
