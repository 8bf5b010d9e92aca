"""SAEBench first-letter feature-absorption metric.

`run(sae, lm, layer, cfg, cache_dir)` scores one SAE; `score_letter` is the pure absorption
rule over tensors. `mean_full_absorption_score` (SAEBench's rule: null below 20 eligible
letters) is lower-is-better; `absorption_paper_convention` = 100 * (1 - score) is
higher-is-better; both come with binomial standard errors and true-positive counts.
"""

from masksae.evaluate.absorption.config import AbsorptionConfig
from masksae.evaluate.absorption.k_sparse import select_main_latents
from masksae.evaluate.absorption.pipeline import run
from masksae.evaluate.absorption.scoring import AbsorptionThresholds, LetterAbsorption, score_letter
from masksae.evaluate.absorption.summary import paper_convention

__all__ = [
    "AbsorptionConfig",
    "AbsorptionThresholds",
    "LetterAbsorption",
    "paper_convention",
    "run",
    "score_letter",
    "select_main_latents",
]
