"""SAEBench's score rule, masksae's labelled extra and the standard errors, by hand."""

from __future__ import annotations

import math
import statistics

import pytest

from masksae.evaluate.absorption.summary import binomial_se, letter_scores, summarize


def _row(rate: float, n: int, frac: float = 0.0, var: float = 0.0, main=(1,)) -> dict:
    return {
        "full_absorption_rate": rate,
        "n_true_positives": n,
        "n_full_absorption": round(rate * n),
        "fractional": frac,
        "fractional_var": var,
        "main_latents": list(main),
    }


def test_binomial_se_by_hand() -> None:
    # two letters: 0.5 of 4 and 0.25 of 8 -> sqrt(0.25/4 + 0.1875/8) / 2
    assert binomial_se([0.5, 0.25], [4, 8]) == pytest.approx(math.sqrt(0.0625 + 0.0234375) / 2)
    assert binomial_se([0.0, 1.0], [3, 5]) == 0.0  # plug-in: certain letters add nothing


def test_saebench_rule_needs_20_eligible_letters() -> None:
    per_letter = {chr(97 + i): _row(0.1 * (i % 3), 10) for i in range(19)}
    out = summarize(per_letter, 19, min_eligible_letters=20, min_probe_f1=0.6)
    assert out["mean_full_absorption_score"] is None
    assert out["absorption_paper_convention"] is None
    assert out["mean_full_absorption_score_se"] is None and out["n_true_positives"] is None
    assert "20" in out["score_rule"] and "SAEBench" in out["score_rule"]
    extra = out["all_eligible_letters"]
    assert "not SAEBench" in extra["rule"]
    assert extra["n_scored_letters"] == 19 and extra["n_true_positives"] == 190
    rates = [0.1 * (i % 3) for i in range(19)]
    assert extra["mean_full_absorption_score"] == pytest.approx(statistics.fmean(rates))
    assert extra["absorption_paper_convention"] == pytest.approx(
        100 * (1 - statistics.fmean(rates))
    )

    per_letter["t"] = _row(0.5, 2)
    out = summarize(per_letter, 20, min_eligible_letters=20, min_probe_f1=0.6)
    rates.append(0.5)
    assert out["mean_full_absorption_score"] == pytest.approx(statistics.fmean(rates))
    counts = [10] * 19 + [2]
    se = math.sqrt(sum(r * (1 - r) / n for r, n in zip(rates, counts, strict=True))) / 20
    assert out["mean_full_absorption_score_se"] == pytest.approx(se)
    assert out["absorption_paper_convention_se"] == pytest.approx(100 * se)
    assert out["std_dev_full_absorption_score"] == pytest.approx(statistics.stdev(rates))
    assert out["n_true_positives"] == 192 and out["n_scored_letters"] == 20
    assert out["n_full_absorption"] == sum(round(r * n) for r, n in zip(rates, counts, strict=True))
    # the extra block equals the headline when the rule is met
    extra = out["all_eligible_letters"]
    assert {k: v for k, v in extra.items() if k != "rule"} == {
        k: out[k] for k in extra if k != "rule"
    }


def test_letters_without_true_positives_are_dropped() -> None:
    """SAEBench's per-token table has no row for a letter without true positives, so the
    letter is not in its mean (it is not counted as 0)."""
    per_letter = {chr(97 + i): _row(0.5, 4) for i in range(20)}
    per_letter["u"] = _row(0.0, 0)
    out = summarize(per_letter, 21, min_eligible_letters=20, min_probe_f1=0.6)
    assert out["mean_full_absorption_score"] == pytest.approx(0.5)
    assert out["n_scored_letters"] == 20
    # ... and the eligibility count still includes it (SAEBench counts F1 > 0.6 only)
    out = summarize(
        {k: v for k, v in per_letter.items() if k in "abcdefghijklmnopqrs" or k == "u"},
        20,
        min_eligible_letters=20,
        min_probe_f1=0.6,
    )
    assert out["mean_full_absorption_score"] == pytest.approx(0.5)
    assert out["n_scored_letters"] == 19


def test_fractional_score_and_its_se() -> None:
    rows = [_row(0.0, 4, frac=0.5, var=0.1), _row(0.0, 10, frac=0.2, var=0.05, main=(1, 2))]
    out = letter_scores(rows)
    assert out["mean_fractional_absorption_score"] == pytest.approx(0.35)
    assert out["mean_fractional_absorption_score_se"] == pytest.approx(
        math.sqrt(0.1 / 4 + 0.05 / 10) / 2
    )
    assert out["mean_num_main_latents"] == pytest.approx(1.5)
    empty = letter_scores([])
    assert empty["mean_full_absorption_score"] is None and empty["n_scored_letters"] == 0
