"""SAEBench first-letter feature-absorption metric.

`run(sae, lm, layer, cfg, cache_dir)` scores one SAE; `score_letter` is the pure absorption
rule over tensors. `mean_full_absorption_score` (SAEBench's rule: null below 20 eligible
letters) is lower-is-better; `absorption_paper_convention` = 100 * (1 - score) is
higher-is-better; both come with binomial standard errors and true-positive counts.
"""

from __future__ import annotations

from masksae.lazy_exports import lazy_exports

# Resolved on first use: the scoring modules import torch and sklearn, and ``masksae
# evaluate --help`` reads AbsorptionConfig only.
_EXPORTS = {
    "AbsorptionConfig": "masksae.evaluate.absorption.config",
    "AbsorptionThresholds": "masksae.evaluate.absorption.scoring",
    "LetterAbsorption": "masksae.evaluate.absorption.scoring",
    "paper_convention": "masksae.evaluate.absorption.summary",
    "run": "masksae.evaluate.absorption.pipeline",
    "score_letter": "masksae.evaluate.absorption.scoring",
    "select_main_latents": "masksae.evaluate.absorption.k_sparse",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
