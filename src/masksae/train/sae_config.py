"""The SAE config dataclasses of every architecture, free of torch.

``masksae train`` builds its ``--sae.*`` flags from these fields and the sweep loader
validates [sae] tables against them; keeping them apart from the ``nn.Module`` classes
(``masksae.train.sae``, which imports torch) keeps ``masksae train --help`` fast. The
architecture modules re-export their config (``masksae.train.sae.topk.TopKConfig`` ...), and
each SAE class names its config in ``config_class``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from masksae.config import from_dict
from masksae.errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_GROUP_FRACTIONS",
    "BatchTopKConfig",
    "JumpReLUConfig",
    "MatryoshkaBatchTopKConfig",
    "ReLUConfig",
    "SAEConfig",
    "TopKConfig",
    "check_non_negative",
    "check_unit_interval",
    "config_class",
    "matryoshka_group_sizes",
    "sae_config_from_dict",
]


@dataclass(kw_only=True)
class SAEConfig:
    """Fields every architecture has. Use a subclass (one per architecture)."""

    architecture: str
    """Registry name of the architecture (one of ``ARCHITECTURES``)."""
    d_in: int
    """Input width D (the LLM's d_model)."""
    d_sae: int
    """Dictionary size F (number of latents)."""
    dead_tokens_threshold: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead (the trainer
    tracks it and passes ``StepContext.dead_mask_F``; AuxK trains those latents). Counted
    as in dictionary_learning: a latent's counter includes the current batch."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the bad value; subclasses extend this."""
        for name in ("d_in", "d_sae", "dead_tokens_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"SAE config: {name}={value!r} must be a positive integer")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; ``sae_config_from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def check_unit_interval(name: str, value: float, *, closed_right: bool = False) -> None:
    """ConfigError unless 0 <= value < 1 (or <= 1 with ``closed_right``)."""
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bound = "[0, 1]" if closed_right else "[0, 1)"
        raise ConfigError(f"SAE config: {name}={value!r} must lie in {bound}")


def check_non_negative(name: str, value: float) -> None:
    """ConfigError unless value is a finite number >= 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"SAE config: {name}={value!r} must be a finite number >= 0")


@dataclass(kw_only=True)
class TopKConfig(SAEConfig):
    """Per-token TopK SAE (Gao et al. 2024) with AuxK."""

    architecture: str = "topk"
    """Registry name."""
    k: int
    """Active latents per token (the target L0)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead latents."""

    def validate(self) -> None:
        super().validate()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise ConfigError(
                f"SAE config: k={self.k!r} must be an integer in [1, d_sae={self.d_sae}]; "
                "lower k or raise d_sae"
            )
        check_non_negative("auxk_alpha", self.auxk_alpha)


@dataclass(kw_only=True)
class BatchTopKConfig(TopKConfig):
    """BatchTopK: k is the mean number of active latents per token."""

    architecture: str = "batch_topk"
    """Registry name."""
    threshold_start_step: int = 1000
    """First step (0-based, inclusive) at which the inference threshold is updated
    (dictionary_learning updates from step threshold_start_step + 1 on)."""
    threshold_beta: float = 0.999
    """EMA decay of the threshold."""

    def validate(self) -> None:
        super().validate()
        check_non_negative("threshold_start_step", self.threshold_start_step)
        check_unit_interval("threshold_beta", self.threshold_beta)


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


@dataclass(kw_only=True)
class ReLUConfig(SAEConfig):
    """ReLU SAE trained with reconstruction + l1_coefficient * L1(f)."""

    architecture: str = "relu"
    """Registry name."""
    l1_coefficient: float = 0.1
    """Weight of the L1 penalty (dictionary_learning's l1_penalty)."""
    l1_warmup_frac: float = 0.05
    """Fraction of the run over which the L1 weight ramps linearly from 0."""

    def validate(self) -> None:
        super().validate()
        check_non_negative("l1_coefficient", self.l1_coefficient)
        check_unit_interval("l1_warmup_frac", self.l1_warmup_frac, closed_right=True)


@dataclass(kw_only=True)
class JumpReLUConfig(SAEConfig):
    """JumpReLU SAE with an L0 target."""

    architecture: str = "jumprelu"
    """Registry name."""
    bandwidth: float = 0.001
    """Width of the rectangle kernel of the straight-through estimators."""
    target_l0: float = 20.0
    """Desired mean number of active latents per token."""
    sparsity_coefficient: float = 1.0
    """Weight of (L0 / target_l0 - 1)^2."""
    init_threshold: float = 0.001
    """Initial value of every latent's threshold."""
    sparsity_warmup_steps: int = 2000
    """Steps over which the sparsity weight ramps linearly from 0."""

    def validate(self) -> None:
        super().validate()
        if not self.bandwidth > 0:
            raise ConfigError(f"SAE config: bandwidth={self.bandwidth!r} must be > 0")
        if not self.target_l0 > 0:
            raise ConfigError(f"SAE config: target_l0={self.target_l0!r} must be > 0")
        check_non_negative("sparsity_coefficient", self.sparsity_coefficient)
        check_non_negative("init_threshold", self.init_threshold)
        check_non_negative("sparsity_warmup_steps", self.sparsity_warmup_steps)


_CONFIGS: dict[str, type[SAEConfig]] = {
    "matryoshka_batch_topk": MatryoshkaBatchTopKConfig,
    "batch_topk": BatchTopKConfig,
    "topk": TopKConfig,
    "relu": ReLUConfig,
    "jumprelu": JumpReLUConfig,
}
ARCHITECTURES = tuple(_CONFIGS)
"""Every architecture name, the paper's first."""


def config_class(name: str) -> type[SAEConfig]:
    """The config dataclass of architecture ``name`` (ConfigError listing the valid names)."""
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown SAE architecture {name!r}; valid: {sorted(_CONFIGS)}") from None


def sae_config_from_dict(d: dict[str, Any]) -> SAEConfig:
    """Config from a dict (TOML table / config.json); ``d["architecture"]`` picks the class."""
    if "architecture" not in d:
        raise ConfigError(f"SAE config needs an 'architecture' key; valid: {sorted(_CONFIGS)}")
    cls = config_class(d["architecture"])
    return from_dict(cls, dict(d), where=f"sae[{d['architecture']}]")
