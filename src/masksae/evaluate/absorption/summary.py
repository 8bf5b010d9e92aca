"""From per-letter counts to the reported scores: SAEBench's rule, ours, standard errors.

SAEBench (``evals/absorption/main.py``) gives no score at all when fewer than
``min_feats_for_eval`` (20) letters have a ground-truth probe F1 above 0.6, and averages the
per-letter rates over the letters that pass F1 *and* have at least one probe true positive
(its per-token table has no row for a letter without one). That is the headline here;
masksae's former rule (any number of eligible letters) is kept as a labelled extra.

Standard errors are binomial, i.e. token sampling within letters with the letters fixed
(the noise of a finite vocabulary, which is what differs between two runs on the same
letters): for the full-absorption mean over L letters with rates r_l on n_l true positives,
SE = sqrt(sum_l r_l (1 - r_l) / n_l) / L (plug-in rates, so a letter at 0 % or 100 %
contributes nothing). The fractional score uses each letter's sample variance of the
per-token fractions instead of r (1 - r). The spread over letters (SAEBench's std_dev
fields) is reported beside it but answers another question (how much letters differ).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

SAEBENCH_RULE = (
    "SAEBench: mean over letters with ground-truth probe F1 > {f1} and >= 1 probe true "
    "positive; null when fewer than {n} letters have F1 > {f1}"
)
ALL_LETTERS_RULE = (
    "masksae (not SAEBench): mean over every letter with probe F1 > {f1} and >= 1 true "
    "positive, also when fewer than {n} letters pass"
)
SE_KIND = (
    "binomial: token sampling within letters, letters fixed; "
    "SE = sqrt(sum_l r_l (1 - r_l) / n_l) / L"
)

SCORE_KEYS = (
    "mean_full_absorption_score",
    "mean_full_absorption_score_se",
    "absorption_paper_convention",
    "absorption_paper_convention_se",
    "mean_fractional_absorption_score",
    "mean_fractional_absorption_score_se",
    "std_dev_full_absorption_score",
    "std_dev_fractional_absorption_score",
    "mean_num_main_latents",
    "n_scored_letters",
    "n_true_positives",
    "n_full_absorption",
)


def paper_convention(mean_full_absorption_score: float | None) -> float | None:
    """SAEBench paper's table convention: 100 * (1 - score), HIGHER is better (less absorption)."""
    if mean_full_absorption_score is None:
        return None
    return 100.0 * (1.0 - mean_full_absorption_score)


def binomial_se(rates: Sequence[float], counts: Sequence[int]) -> float:
    """SE of the unweighted mean of per-letter rates, each a proportion of `counts` tokens."""
    if not rates:
        raise ValueError("binomial_se needs at least one letter")
    var = sum(r * (1.0 - r) / n for r, n in zip(rates, counts, strict=True))
    return math.sqrt(var) / len(rates)


def mean_se(variances: Sequence[float], counts: Sequence[int]) -> float:
    """SE of the unweighted mean of per-letter means, given each letter's token variance."""
    if not variances:
        raise ValueError("mean_se needs at least one letter")
    var = sum(v / n for v, n in zip(variances, counts, strict=True))
    return math.sqrt(var) / len(variances)


def letter_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The score block over `rows` (per-letter dicts with full_absorption_rate, fractional,
    fractional_var, n_true_positives, n_full_absorption, main_latents), letters without a
    true positive left out. All scores None when no letter is left."""
    rows = [r for r in rows if r["n_true_positives"] > 0]
    out: dict[str, Any] = dict.fromkeys(SCORE_KEYS)
    out.update(n_scored_letters=len(rows), n_true_positives=0, n_full_absorption=0)
    if not rows:
        return out
    full = [float(r["full_absorption_rate"]) for r in rows]
    frac = [float(r["fractional"]) for r in rows]
    counts = [int(r["n_true_positives"]) for r in rows]
    score = statistics.fmean(full)
    se = binomial_se(full, counts)
    out.update(
        mean_full_absorption_score=score,
        mean_full_absorption_score_se=se,
        absorption_paper_convention=paper_convention(score),
        absorption_paper_convention_se=100.0 * se,
        mean_fractional_absorption_score=statistics.fmean(frac),
        mean_fractional_absorption_score_se=mean_se(
            [float(r["fractional_var"]) for r in rows], counts
        ),
        std_dev_full_absorption_score=statistics.stdev(full) if len(full) > 1 else None,
        std_dev_fractional_absorption_score=statistics.stdev(frac) if len(frac) > 1 else None,
        mean_num_main_latents=statistics.fmean(len(r["main_latents"]) for r in rows),
        n_true_positives=sum(counts),
        n_full_absorption=sum(int(r["n_full_absorption"]) for r in rows),
    )
    return out


def summarize(
    per_letter: dict[str, dict[str, Any]],
    n_eligible: int,
    *,
    min_eligible_letters: int,
    min_probe_f1: float,
) -> dict[str, Any]:
    """Headline (SAEBench rule) score block, plus ``score_rule``, ``se_kind`` and the
    labelled extra ``all_eligible_letters`` (masksae's rule)."""
    rows = list(per_letter.values())
    everything = letter_scores(rows)
    if n_eligible >= min_eligible_letters:
        headline = dict(everything)
    else:
        headline = dict.fromkeys(SCORE_KEYS)
        headline["n_scored_letters"] = 0
    fmt = {"f1": min_probe_f1, "n": min_eligible_letters}
    return {
        **headline,
        "score_rule": SAEBENCH_RULE.format(**fmt),
        "se_kind": SE_KIND,
        "all_eligible_letters": {"rule": ALL_LETTERS_RULE.format(**fmt), **everything},
    }
