"""Absorption per first letter, in the tables' convention (higher is better).

Each letter's score is 100 · (1 − full absorption rate) of that letter, the per-letter form
of the headline number; its word count is the number of true-positive words the absorption
metric scored for it. A letter absent from a run's ``per_letter`` was not eligible (its
ground-truth probe missed SAEBench's F1 bar) and is shown as missing, not as a zero.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from masksae.evaluate.report.grouping import seed_of
from masksae.evaluate.report.rows import as_number, lookup
from masksae.evaluate.report.stats import Interval, mean_interval, paired_interval

LETTERS = tuple(string.ascii_lowercase)
"""The 26 first letters, in axis order."""


def letter_scores(doc: dict[str, Any]) -> dict[str, float]:
    """letter -> 100 · (1 − full absorption rate) for the letters this run scored."""
    per = lookup(doc, "metrics", "absorption", "per_letter")
    out: dict[str, float] = {}
    if isinstance(per, dict):
        for letter, entry in per.items():
            rate = as_number(
                entry.get("full_absorption_rate") if isinstance(entry, dict) else entry
            )
            if rate is not None:
                out[str(letter)] = 100.0 * (1.0 - rate)
    return out


def letter_words(doc: dict[str, Any]) -> dict[str, int]:
    """letter -> true-positive words scored for it (letters without a count left out)."""
    per = lookup(doc, "metrics", "absorption", "per_letter")
    out: dict[str, int] = {}
    if isinstance(per, dict):
        for letter, entry in per.items():
            n = as_number(entry.get("n_true_positives")) if isinstance(entry, dict) else None
            if n is not None:
                out[str(letter)] = int(n)
    return out


def has_letters(docs: Sequence[dict[str, Any]]) -> bool:
    return any(letter_scores(d) for d in docs)


@dataclass(frozen=True)
class LetterSummary:
    """One letter of one cell, over its seeds."""

    letter: str
    score: Interval | None
    """100 · (1 − full absorption rate), mean over seeds; None when no run scored it."""
    words: tuple[int, int] | None
    """(min, max) true-positive words over the runs (equal when the LLM stage is shared)."""
    n_runs_scored: int
    """Runs that scored this letter (fewer than the cell's runs: eligible in some only)."""

    @property
    def words_text(self) -> str:
        if self.words is None:
            return "n/a"
        lo, hi = self.words
        return str(lo) if lo == hi else f"{lo}–{hi}"


def summarize_letters(docs: Sequence[dict[str, Any]]) -> dict[str, LetterSummary]:
    """letter -> its summary over ``docs``, for all 26 letters (missing ones have no score)."""
    scores = [letter_scores(d) for d in docs]
    words = [letter_words(d) for d in docs]
    out = {}
    for letter in LETTERS:
        vals = [s[letter] for s in scores if letter in s]
        counts = [w[letter] for w in words if letter in w]
        out[letter] = LetterSummary(
            letter=letter,
            score=mean_interval(vals),
            words=(min(counts), max(counts)) if counts else None,
            n_runs_scored=len(vals),
        )
    return out


def letter_difference(
    masked: Sequence[dict[str, Any]], unmasked: Sequence[dict[str, Any]], letter: str
) -> Interval | None:
    """Masked minus unmasked score of one letter, paired by seed."""
    t = {seed_of(d): letter_scores(d).get(letter) for d in masked}
    c = {seed_of(d): letter_scores(d).get(letter) for d in unmasked}
    return paired_interval(t, c)
