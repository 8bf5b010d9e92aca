"""What the report shows: one :class:`MetricRow` per metric, read from result documents.

Adding a metric to every table (and, with ``frontier=True``, a panel of the frontier figure)
is one entry in :data:`METRIC_ROWS`, e.g.::

    MetricRow("sparse_probing", "Sparse Probing top-1 accuracy %", metric_at(
        "sparse_probing", "sae_top_1_test_accuracy", scale=100), unit="points", frontier=True),

A reader returns ``None`` when the result lacks the value (an older result, a metric that
was not run, a score that is undefined); the report then leaves the row out where no run has
it and shows "n/a" in the cells that lack it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from masksae.evaluate.probing.figures import ROWS as PROBING_ROWS

Reader = Callable[[dict[str, Any]], float | None]
"""Reads one value, in reported units, from a result document (None when absent)."""


def lookup(doc: dict[str, Any], *path: str) -> Any:
    """``doc[path[0]][path[1]]...``, or None where a key is missing."""
    obj: Any = doc
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def as_number(value: Any, scale: float = 1.0) -> float | None:
    """``scale * value`` as a float; None for missing, non-numeric or NaN values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    out = float(value) * scale
    return None if math.isnan(out) else out


def metric_at(*path: str, scale: float = 1.0) -> Reader:
    """Reader of ``doc["metrics"][path...]`` times ``scale`` (100 turns a fraction into %)."""
    return lambda doc: as_number(lookup(doc, "metrics", *path), scale)


def absorption_paper_form(doc: dict[str, Any]) -> float | None:
    """Mean full absorption in the paper's form 100 * (1 - score), higher is better.

    The result's own ``absorption_paper_convention`` where the result has that field (None
    there means no headline score, e.g. too few eligible letters); results without the field
    fall back to the SAEBench score ``mean_full_absorption_score`` (lower is better)."""
    absorption = lookup(doc, "metrics", "absorption")
    if not isinstance(absorption, dict):
        return None
    if "absorption_paper_convention" in absorption:  # None = no headline score (too few
        return as_number(absorption["absorption_paper_convention"])  # letters, say)
    score = as_number(absorption.get("mean_full_absorption_score"))
    return None if score is None else 100.0 * (1.0 - score)


def n_eligible_letters(doc: dict[str, Any]) -> float | None:
    """How many letters the absorption mean averages over."""
    absorption = lookup(doc, "metrics", "absorption")
    if not isinstance(absorption, dict):
        return None
    n = as_number(absorption.get("n_eligible_letters"))
    if n is None and isinstance(absorption.get("eligible_letters"), list):
        n = float(len(absorption["eligible_letters"]))
    return n


@dataclass(frozen=True)
class MetricRow:
    """One reported metric: where to read it and how to show it."""

    key: str
    """Identifier used in CSV files, figure names and code (unique)."""
    label: str
    """Row label in the tables and axis label in the figures (no direction arrow)."""
    read: Reader
    """Reads the value, in reported units, from a result document (None when absent)."""
    digits: int = 2
    """Decimals shown in the tables."""
    higher_is_better: bool | None = True
    """Direction shown as an arrow after the label; None for descriptive rows (L0)."""
    unit: str = "points"
    """Unit of a difference in the generated sentences ("points" for percentages)."""
    compare: bool = True
    """Include in the masked-vs-unmasked comparisons (paired differences)."""
    frontier: bool = False
    """Draw a panel of this metric against measured L0 in the frontier figure."""

    @property
    def title(self) -> str:
        """The label with its direction: "Explained Variance % (↑)"."""
        if self.higher_is_better is None:
            return self.label
        return f"{self.label} ({'↑' if self.higher_is_better else '↓'})"


L0_KEY = "l0"
"""Key of the measured-L0 row: the x axis of the frontier and the L0 flag of every cell."""

METRIC_ROWS: tuple[MetricRow, ...] = (
    MetricRow(
        "absorption",
        "Mean Full Absorption, 100·(1 − score)",
        absorption_paper_form,
        frontier=True,
    ),
    MetricRow(
        "explained_variance",
        "Explained Variance %",
        metric_at("core", "explained_variance", scale=100),
        frontier=True,
    ),
    MetricRow(
        "explained_variance_legacy",
        "Explained Variance, legacy SAEBench %",
        metric_at("core", "explained_variance_legacy", scale=100),
    ),
    MetricRow(
        "ce_loss_recovered",
        "CE Loss Recovered %",
        metric_at("core", "downstream", "ce_loss_recovered", scale=100),
        frontier=True,
    ),
    MetricRow(
        "kl_div_sae",
        "KL(clean ‖ SAE) nats",
        metric_at("core", "downstream", "kl_div_sae"),
        digits=3,
        higher_is_better=False,
        unit="nats",
    ),
    MetricRow(
        L0_KEY,
        "L0 (measured)",
        metric_at("core", "l0"),
        digits=1,
        higher_is_better=None,
        unit="latents",
    ),
    MetricRow(
        "frac_dead",
        "Dead latents %",
        metric_at("core", "frac_dead", scale=100),
        higher_is_better=False,
    ),
    MetricRow(
        "absorption_letters",
        "Eligible absorption letters (of 26; SAEBench needs 20)",
        n_eligible_letters,
        digits=1,
        higher_is_better=None,
        unit="letters",
        compare=False,
    ),
    MetricRow(
        "absorption_se",
        "Absorption standard error (binomial, letters fixed), points",
        metric_at("absorption", "absorption_paper_convention_se"),
        higher_is_better=None,
        compare=False,
    ),
    MetricRow(
        "absorption_true_positives",
        "Absorption true positives (words scored)",
        metric_at("absorption", "n_true_positives"),
        digits=0,
        higher_is_better=None,
        unit="words",
        compare=False,
    ),
    MetricRow(
        "cooc_npmi",
        "Frequent-latent pairs: mean normalised PMI",
        metric_at("cooccurrence", "frequent_pairs", "npmi", "mean"),
        digits=3,
        higher_is_better=None,
        unit="npmi",
    ),
    MetricRow(
        "cooc_observed_over_expected",
        "Frequent-latent pairs: co-firing observed / expected",
        metric_at("cooccurrence", "frequent_pairs", "observed_over_expected"),
        digits=3,
        higher_is_better=None,
        unit="(ratio)",
    ),
    MetricRow(
        "cooc_parent_child",
        "Absorbed parent-child pairs: P(main latent | absorbing latent) %",
        metric_at("cooccurrence", "parent_child", "mean_p_main_given_absorber", scale=100),
        higher_is_better=None,
    ),
)
"""Rows of the paper-form and ablation tables, in order."""

METRIC_ROWS += tuple(
    MetricRow(key, label, read, higher_is_better=better, compare=compare)
    for key, label, read, better, compare in PROBING_ROWS
)
"""The probing metrics' rows (sparse probing, TPP, SCR, OOD AUC: masksae.evaluate.probing)."""


MIN_ABSORPTION_LETTERS = 20
"""SAEBench's minimum number of eligible letters for the absorption mean."""


def row_by_key(key: str) -> MetricRow:
    """The row of :data:`METRIC_ROWS` called ``key``."""
    return next(r for r in METRIC_ROWS if r.key == key)


@dataclass(frozen=True)
class ShiftRow:
    """A core metric shown on clean and on masked text (the distribution-shift table)."""

    key: str
    """Name inside ``metrics["core"]`` and ``metrics["core_masked"]``."""
    label: str
    """Row label."""
    scale: float = 1.0
    """Multiplier to reported units (100 for a fraction shown as %)."""
    digits: int = 2
    """Decimals shown."""

    def reader(self, section: str) -> Reader:
        """Reader of this metric in ``metrics[section]`` ("core" or "core_masked")."""
        return metric_at(section, self.key, scale=self.scale)


CLEAN_SECTION = "core"
"""Core metrics on clean held-out text."""
MASKED_SECTION = "core_masked"
"""The same metrics on masked text (``masksae evaluate --eval-masked``)."""

SHIFT_ROWS: tuple[ShiftRow, ...] = (
    ShiftRow("explained_variance", "Explained Variance %", scale=100),
    ShiftRow("l0", "L0 (measured)", digits=1),
    ShiftRow("cosine_similarity", "Cosine similarity", digits=3),
    ShiftRow("relative_norm", "Relative norm ‖x̂‖/‖x‖", digits=3),
    ShiftRow("frac_dead", "Dead latents %", scale=100),
)
"""Rows of the distribution-shift table."""
