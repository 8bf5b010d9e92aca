"""SAE architectures behind a registry (see docs/architecture.md for the contract).

Build one with ``build_sae(sae_config_from_dict({"architecture": ..., ...}))``. The config
dataclasses live in ``masksae.train.sae_config`` (no torch) and are re-exported here.
"""

from masksae.train.sae.base import SAEConfig, SparseAutoencoder, StepContext, StepOutput
from masksae.train.sae.batch_topk import BatchTopKConfig, BatchTopKSAE
from masksae.train.sae.geometric_median import geometric_median
from masksae.train.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from masksae.train.sae.matryoshka_batch_topk import (
    MatryoshkaBatchTopKConfig,
    MatryoshkaBatchTopKSAE,
    matryoshka_group_sizes,
)
from masksae.train.sae.registry import build_sae, config_class, sae_class, sae_config_from_dict
from masksae.train.sae.relu import ReLUConfig, ReLUSAE
from masksae.train.sae.topk import TopKConfig, TopKSAE
from masksae.train.sae_config import ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKConfig",
    "MatryoshkaBatchTopKSAE",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "SparseAutoencoder",
    "StepContext",
    "StepOutput",
    "TopKConfig",
    "TopKSAE",
    "build_sae",
    "config_class",
    "geometric_median",
    "matryoshka_group_sizes",
    "sae_class",
    "sae_config_from_dict",
]
