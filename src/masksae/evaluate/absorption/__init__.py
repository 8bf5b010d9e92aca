"""SAEBench first-letter feature-absorption metric.

`run(sae, lm, layer, cfg, cache_dir)` scores one SAE; `score_letter` is the pure absorption
rule over tensors. `mean_full_absorption_score` is lower-is-better;
`absorption_paper_convention` = 100 * (1 - score) is higher-is-better.
"""

from masksae.evaluate.absorption.config import AbsorptionConfig
from masksae.evaluate.absorption.k_sparse import select_main_latents
from masksae.evaluate.absorption.pipeline import paper_convention, run
from masksae.evaluate.absorption.scoring import AbsorptionThresholds, LetterAbsorption, score_letter

__all__ = [
    "AbsorptionConfig",
    "AbsorptionThresholds",
    "LetterAbsorption",
    "paper_convention",
    "run",
    "score_letter",
    "select_main_latents",
]
