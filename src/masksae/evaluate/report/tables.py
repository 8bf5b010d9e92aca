"""The report's tables as pandas DataFrames: a display frame (text cells, rendered to Markdown
and LaTeX) and a tidy numeric frame (one row per value, written as CSV).

Cell text: the mean over seeds with its 95% interval, ``71.00 [65.21, 76.79]``; the mean
alone for a single seed; ``n/a`` where no run has the value; a trailing ``†`` where the
cell's measured L0 is far from its k (:func:`.frontier.l0_flagged`). Differences are signed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from masksae.evaluate.report import rows as row_spec
from masksae.evaluate.report.compare import Comparison, equal_k, equal_l0
from masksae.evaluate.report.frontier import cell_flagged, mean_l0
from masksae.evaluate.report.grouping import (
    Cells,
    k_label,
    ks_of,
    method_label,
    ps_of,
    seed_of,
    seeds_label,
    short_method,
)
from masksae.evaluate.report.letters import (
    LETTERS,
    has_letters,
    letter_difference,
    summarize_letters,
)
from masksae.evaluate.report.rows import (
    CLEAN_SECTION,
    L0_KEY,
    MASKED_SECTION,
    SHIFT_ROWS,
    MetricRow,
)
from masksae.evaluate.report.stats import Interval, mean_interval, paired_interval

NA = "n/a"
"""Text of a value no run has."""
FLAG = "†"
"""Marks a cell whose measured L0 is far from its k."""
RUNS_LABEL = "Runs (seeds) behind the cell"
"""Label of the first rows of the paper-form and ablation tables."""
MIN_ABLATION_PS = 3
"""A k gets a mask-probability ablation table from this many mask probabilities on."""


def cell_text(
    interval: Interval | None, digits: int = 2, flagged: bool = False, signed: bool = False
) -> str:
    """Display text of one value: "71.00 [65.21, 76.79]", "71.00", "n/a"; "†" when flagged."""
    text = NA if interval is None else interval.fmt(digits, signed=signed)
    return f"{text} {FLAG}" if flagged else text


def interval_columns(prefix: str, interval: Interval | None) -> dict[str, Any]:
    """Tidy columns of one interval: <prefix>_mean, _ci_low, _ci_high, _n (NaN/0 if absent)."""
    if interval is None:
        return {
            f"{prefix}_mean": None,
            f"{prefix}_ci_low": None,
            f"{prefix}_ci_high": None,
            f"{prefix}_n": 0,
        }
    return {
        f"{prefix}_mean": interval.mean,
        f"{prefix}_ci_low": interval.low,
        f"{prefix}_ci_high": interval.high,
        f"{prefix}_n": interval.n,
    }


@dataclass
class Table:
    """One table of the report."""

    name: str
    """File-name part: ``<setting slug>__<name>.csv`` / ``.tex``."""
    title: str
    """Section heading in the Markdown report."""
    display: pd.DataFrame
    """Text cells, as shown (Markdown and LaTeX)."""
    data: pd.DataFrame
    """Tidy numeric rows behind the display (CSV)."""
    notes: list[str] = field(default_factory=list)
    """Lines shown under the table (what a flag or an n/a means here)."""

    def markdown(self) -> str:
        # disable_numparse keeps "71.00" as typed (tabulate would re-format numbers)
        return self.display.to_markdown(index=False, disable_numparse=True)

    def latex(self) -> str:
        return latex_text(self.display.to_latex(index=False, escape=True))


_LATEX_SYMBOLS = {
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "‖": r"$\|$",
    "†": r"$^\dagger$",
    "−": "-",
    "–": "--",
    "·": r"$\cdot$",
    "Δ": r"$\Delta$",
    "≈": r"$\approx$",
    "x̂": r"$\hat{x}$",
}


def latex_text(text: str) -> str:
    """Replace the report's Unicode symbols by LaTeX (after pandas escaped the specials)."""
    for symbol, latex in _LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


def rows_present(cells: Cells, rows: Sequence[MetricRow] | None = None) -> list[MetricRow]:
    """The rows (default: ``rows.METRIC_ROWS``, read at call time) at least one run of
    ``cells`` has a value for; the others are left out."""
    rows = row_spec.METRIC_ROWS if rows is None else rows
    docs = [d for ds in cells.values() for d in ds]
    return [r for r in rows if any(r.read(d) is not None for d in docs)]


def _value_record(row: MetricRow, k: Any, p: float, cells: Cells) -> tuple[str, dict[str, Any]]:
    docs = cells.get((k, p), [])
    interval = mean_interval(row.read(d) for d in docs)
    flagged = bool(docs) and cell_flagged(cells, (k, p))
    record = {
        "metric": row.key,
        "k": k,
        "mask_prob": p,
        **interval_columns("value", interval),
        "value_sd": None if interval is None else interval.sd,
        "l0_mean": mean_l0(docs),
        "l0_flagged": flagged,
        "seeds": " ".join(str(seed_of(d)) for d in docs),
    }
    return cell_text(interval, row.digits, flagged), record


def paper_methods(cells: Cells) -> list[float]:
    """Mask probabilities of the paper-form table: p = 0 and every masked p run at more
    than one k or at as many k as the most-run masked p. A masked p run at a single k while
    another runs at several is an ablation (the paper's Table 3) with its own table."""
    ks = ks_of(cells)
    counts = {p: sum((k, p) in cells for k in ks) for p in ps_of(cells)}
    most = max((n for p, n in counts.items() if p > 0), default=0)
    return [p for p, n in counts.items() if p == 0 or n > 1 or n == most]


def paper_table(cells: Cells) -> Table:
    """Rows metric x method, columns k (the paper's Table 1/2 form); the first rows say
    how many runs (seeds) back each cell."""
    ks, ps = ks_of(cells), paper_methods(cells)
    display: list[dict[str, str]] = []
    for p in ps:
        runs = {k_label(k): seeds_label(cells.get((k, p), [])) for k in ks}
        display.append({"Metric": RUNS_LABEL, "Method": method_label(p), **runs})
    data = []
    for row in rows_present(cells):
        for p in ps:
            line = {"Metric": row.title, "Method": method_label(p)}
            for k in ks:
                text, record = _value_record(row, k, p, cells)
                line[k_label(k)] = text
                if cells.get((k, p)):
                    data.append(record)
            display.append(line)
    return Table(
        "paper",
        "Metrics by sparsity, with vs without masking",
        pd.DataFrame(display),
        pd.DataFrame(data),
    )


def ablation_table(cells: Cells, k: Any) -> Table | None:
    """Rows metric, columns mask probability, at one k (the paper's Table 3); None when the
    k has fewer than :data:`MIN_ABLATION_PS` mask probabilities - unless one of them is
    missing from the paper-form table (run at this k only) - or fewer than two."""
    ps = ps_of(cells, k)
    only_here = set(ps) - set(paper_methods(cells))
    if len(ps) < 2 or (len(ps) < MIN_ABLATION_PS and not only_here):
        return None
    sub = {c: d for c, d in cells.items() if c[0] == k}
    display = [{"Metric": RUNS_LABEL, **{f"p={p:g}": seeds_label(sub[(k, p)]) for p in ps}}]
    data = []
    for row in rows_present(sub):
        line = {"Metric": row.title}
        for p in ps:
            text, record = _value_record(row, k, p, cells)
            line[f"p={p:g}"] = text
            data.append(record)
        display.append(line)
    return Table(
        f"ablation_k{k}",
        f"Mask-probability ablation at {k_label(k)}",
        pd.DataFrame(display),
        pd.DataFrame(data),
    )


def _comparison_record(c: Comparison) -> dict[str, Any]:
    return {
        "metric": c.metric.key,
        "mask_prob": c.mask_prob,
        "k": c.k,
        **({} if c.anchor_p is None else {"anchor": short_method(c.anchor_p), "l0": c.l0}),
        **interval_columns("masked", c.treated),
        **interval_columns("unmasked", c.control),
        **interval_columns("diff", c.diff),
        "diff_excludes_zero": None if c.diff is None else c.diff.excludes_zero,
        "l0_flagged": c.flagged,
        "note": c.note,
    }


def comparison_rows(cells: Cells) -> list[MetricRow]:
    """Rows compared masked vs unmasked (present ones with ``compare``)."""
    return [r for r in rows_present(cells) if r.compare]


def equal_k_table(cells: Cells) -> Table | None:
    """Paired difference masked minus unmasked at equal k: rows metric x masked p, columns k."""
    masked = [p for p in ps_of(cells) if p > 0]
    if 0.0 not in ps_of(cells) or not masked:
        return None
    ks = ks_of(cells)
    display, data = [], []
    for row in comparison_rows(cells):
        for p in masked:
            line = {"Metric": row.title, "Δ (masked − unmasked)": short_method(p)}
            found = {c.k: c for c in equal_k(cells, row, p)}
            for k in ks:
                c = found.get(k)
                if c is None:
                    line[k_label(k)] = NA
                    continue
                data.append(_comparison_record(c))
                if c.diff is None and c.note:  # say why there is no difference
                    line[k_label(k)] = c.note
                else:
                    line[k_label(k)] = cell_text(c.diff, row.digits, c.flagged, signed=True)
            display.append(line)
    if not data:
        return None
    return Table(
        "equal_k",
        "Masked vs unmasked at equal k (paired by seed)",
        pd.DataFrame(display),
        pd.DataFrame(data),
    )


def anchor_label(c: Comparison) -> str:
    """Column header of an equal-L0 point: "L0 31.6 (w/ p=0.3, k=20)"."""
    return f"L0 {c.l0:.1f} ({short_method(c.anchor_p)}, {k_label(c.k)})"  # type: ignore[arg-type]


def equal_l0_comparisons(cells: Cells, p: float) -> dict[str, list[Comparison]]:
    """metric key -> its equal-L0 comparisons of method ``p`` vs unmasked."""
    rows = [r for r in comparison_rows(cells) if r.key != L0_KEY]
    return {r.key: cs for r in rows if (cs := equal_l0(cells, r, p))}


def equal_l0_table(cells: Cells, p: float) -> Table | None:
    """Paired difference masked (``p``) minus unmasked at equal measured L0: rows metric,
    columns the measured L0 of every point of either method; the other method's value is
    interpolated in log L0 on its curve for the same seed."""
    comparisons = equal_l0_comparisons(cells, p)
    if not comparisons:
        return None
    points: dict[tuple, str] = {}
    compared: set[str] = set()
    for cs in comparisons.values():
        for c in cs:
            points.setdefault((c.l0, str(c.k), c.anchor_p), anchor_label(c))
            if c.diff is not None:
                compared.add(anchor_label(c))
    ordered = [points[key] for key in sorted(points)]
    columns = [label for label in ordered if label in compared]
    if not columns:
        return None
    rows = {r.key: r for r in comparison_rows(cells)}
    display, data = [], []
    for key, cs in comparisons.items():
        row = rows[key]
        line = dict.fromkeys(columns, NA)
        for c in cs:
            data.append(_comparison_record(c))
            if anchor_label(c) not in compared:
                continue
            if c.diff is None:
                line[anchor_label(c)] = c.note or NA
            else:
                text = cell_text(c.diff, row.digits, signed=True)
                line[anchor_label(c)] = f"{text} ({c.note})" if c.note else text
        display.append({"Metric": row.title, **line})
    left_out = [label for label in ordered if label not in compared]
    notes = []
    if left_out:
        notes.append(
            f"No comparison at {', '.join(left_out)}: outside the other method's L0 range "
            "(never extrapolated) or no run of the same seed; see the CSV for each reason."
        )
    return Table(
        f"equal_l0_p{p:g}",
        f"Masked (p={p:g}) vs unmasked at equal measured L0 (paired by seed)",
        pd.DataFrame(display),
        pd.DataFrame(data),
        notes,
    )


def _has_masked(doc: dict[str, Any]) -> bool:
    return isinstance(doc["metrics"].get(MASKED_SECTION), dict)


def shift_table(cells: Cells) -> Table | None:
    """Reconstruction on clean text beside the same SAE on masked text (the distribution
    shift cost): rows metric x method x {clean, masked, clean − masked}, columns k. The
    difference pairs each run with itself. None when no run has masked-text metrics."""
    with_masked = {c: ds for c, ds in cells.items() if any(_has_masked(d) for d in ds)}
    if not with_masked:
        return None
    ks = ks_of(with_masked)
    ps = ps_of(with_masked)
    display, data = [], []
    for spec in SHIFT_ROWS:
        clean_read, masked_read = spec.reader(CLEAN_SECTION), spec.reader(MASKED_SECTION)
        if not any(masked_read(d) is not None for ds in with_masked.values() for d in ds):
            continue
        for p in ps:
            lines = {
                part: {"Metric": spec.label, "Method": method_label(p), "Text": part}
                for part in ("clean", "masked", "clean − masked")
            }
            for k in ks:
                docs = with_masked.get((k, p), [])
                clean = {seed_of(d): clean_read(d) for d in docs}
                masked = {seed_of(d): masked_read(d) for d in docs}
                values = {
                    "clean": mean_interval(clean.values()),
                    "masked": mean_interval(masked.values()),
                    "clean − masked": paired_interval(clean, masked),
                }
                for part, interval in values.items():
                    lines[part][k_label(k)] = cell_text(
                        interval, spec.digits, signed=part == "clean − masked"
                    )
                if docs:
                    data.append(
                        {
                            "metric": spec.key,
                            "mask_prob": p,
                            "k": k,
                            **interval_columns("clean", values["clean"]),
                            **interval_columns("masked", values["masked"]),
                            **interval_columns("diff", values["clean − masked"]),
                        }
                    )
            display.extend(lines.values())
    if not data:
        return None
    return Table(
        "distribution_shift",
        "Distribution shift cost: clean vs masked text",
        pd.DataFrame(display),
        pd.DataFrame(data),
    )


def letters_table(cells: Cells, k: Any) -> Table | None:
    """Absorption per letter at one k (higher is better): rows letters, columns the words
    scored, each method's score and each masked method's paired difference. Letters no run
    scored are marked "not eligible"."""
    ps = [p for p in ps_of(cells, k) if has_letters(cells[(k, p)])]
    if not ps:
        return None
    summaries = {p: summarize_letters(cells[(k, p)]) for p in ps}
    display, data = [], []
    for letter in LETTERS:
        words = next((s[letter].words_text for s in summaries.values() if s[letter].words), NA)
        line = {"Letter": letter, "Words": words}
        for p in ps:
            s = summaries[p][letter]
            n_runs = len(cells[(k, p)])
            text = cell_text(s.score) if s.score else "not eligible"
            if s.score and s.n_runs_scored < n_runs:
                text += f" ({s.n_runs_scored} of {n_runs} runs)"
            line[method_label(p)] = text
            data.append(
                {
                    "letter": letter,
                    "mask_prob": p,
                    "k": k,
                    "words_min": s.words[0] if s.words else None,
                    "words_max": s.words[1] if s.words else None,
                    **interval_columns("score", s.score),
                }
            )
        for p in ps:
            if p > 0 and 0.0 in ps:
                diff = letter_difference(cells[(k, p)], cells[(k, 0.0)], letter)
                line[f"Δ {short_method(p)}"] = cell_text(diff, signed=True)
        display.append(line)
    return Table(
        f"absorption_letters_k{k}",
        f"Absorption per letter at {k_label(k)}",
        pd.DataFrame(display),
        pd.DataFrame(data),
    )
