"""Harvest: corpora, tokenise + pack, Bernoulli masking, and the runner writing the store.

>>> from masksae.harvest import HarvestConfig, run_harvest
>>> run_harvest(HarvestConfig(out="store", model="bundled:smollm2-135m", layer=15,
...                           tokens=100_000, mask_prob=0.3))
"""

from masksae.harvest.config import HarvestConfig
from masksae.harvest.corpus import Corpus, CorpusSpec
from masksae.harvest.masking import mask_draw, mask_sequences, resolve_mask_token
from masksae.harvest.outliers import DEFAULT_OUTLIER_NORM_FACTOR, flag_norm_outliers
from masksae.harvest.runner import HarvestPlan, HarvestResult, plan_harvest, run_harvest
from masksae.harvest.tokenize import pack_sequences, resolve_context_length

__all__ = [
    "DEFAULT_OUTLIER_NORM_FACTOR",
    "Corpus",
    "CorpusSpec",
    "flag_norm_outliers",
    "HarvestConfig",
    "HarvestPlan",
    "HarvestResult",
    "mask_draw",
    "mask_sequences",
    "pack_sequences",
    "plan_harvest",
    "resolve_context_length",
    "resolve_mask_token",
    "run_harvest",
]
