"""Harvest: corpora, tokenise + pack, Bernoulli masking, and the runner writing the store.

>>> from masksae.harvest import HarvestConfig, run_harvest
>>> run_harvest(HarvestConfig(out="store", model="bundled:smollm2-135m", layer=15,
...                           tokens=100_000, mask_prob=0.3))
"""

from __future__ import annotations

from masksae.lazy_exports import lazy_exports

# imported on first use (PEP 562) so ``masksae --help`` does not import torch or zarr
_EXPORTS = {
    "HarvestConfig": "masksae.harvest.config",
    "Corpus": "masksae.harvest.corpus",
    "CorpusSpec": "masksae.harvest.corpus",
    "mask_draw": "masksae.harvest.masking",
    "mask_sequences": "masksae.harvest.masking",
    "resolve_mask_token": "masksae.harvest.masking",
    "DEFAULT_OUTLIER_NORM_FACTOR": "masksae.harvest.outliers",
    "flag_norm_outliers": "masksae.harvest.outliers",
    "HarvestPlan": "masksae.harvest.runner",
    "HarvestResult": "masksae.harvest.runner",
    "plan_harvest": "masksae.harvest.runner",
    "run_harvest": "masksae.harvest.runner",
    "pack_sequences": "masksae.harvest.tokenize",
    "resolve_context_length": "masksae.harvest.tokenize",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


from masksae.callable_stage import make_callable  # noqa: E402

# masksae.harvest(...) runs masksae.api.harvest (the notebook API; see masksae.callable_stage)
make_callable(__name__)
