"""The comparison report: Markdown tables in the paper's form and PNG figures.

Results are grouped by provenance. A *setting* is (model, layer, architecture, d_sae); inside
it a *cell* is (k, mask_prob); the seeds of a cell give mean and sample std. When several
checkpoints of one run (same seed) are given, only the latest step counts.

Tables (all metrics in the paper's "higher is better" percent form where it has one):
- paper form: rows = metric x method (w/o masking, w/ masking p=...), columns = k;
- mask-probability ablation: rows = metric, columns = p, one table per k with >1 p.
Figures: L0 vs explained variance frontier; absorption rate per letter.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masksae.atomic import atomic_write_text
from masksae.evaluate.discover import find_results
from masksae.evaluate.schema import ResultFormatError, load_result

log = logging.getLogger(__name__)


def _get(doc: dict[str, Any], *path: str) -> Any:
    obj: Any = doc
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _pct(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


def _absorption(doc: dict[str, Any]) -> float | None:
    a = _get(doc, "metrics", "absorption")
    if not isinstance(a, dict):
        return None
    if a.get("absorption_paper_convention") is not None:
        return float(a["absorption_paper_convention"])
    score = a.get("mean_full_absorption_score")
    return None if score is None else 100.0 * (1.0 - float(score))


def _n_letters(doc: dict[str, Any]) -> float | None:
    a = _get(doc, "metrics", "absorption")
    if not isinstance(a, dict):
        return None
    n = a.get("n_eligible_letters")
    if n is None and isinstance(a.get("eligible_letters"), list):
        n = len(a["eligible_letters"])
    return None if n is None else float(n)


@dataclass(frozen=True)
class MetricRow:
    """One reported metric: how to read it from a result document and how to label it."""

    key: str
    """Identifier used in tables and plots."""
    label: str
    """Row label in the tables."""
    read: Callable[[dict[str, Any]], float | None]
    """Reads the value (in reported units) from a result document."""
    digits: int = 3
    """Decimals shown in the tables."""


METRIC_ROWS: tuple[MetricRow, ...] = (
    MetricRow("absorption", "Mean Full Absorption, 100*(1-score) (↑)", _absorption),
    MetricRow(
        "explained_variance",
        "Explained Variance % (↑)",
        lambda d: _pct(_get(d, "metrics", "core", "explained_variance")),
    ),
    MetricRow(
        "explained_variance_legacy",
        "Explained Variance, legacy SAEBench % (↑)",
        lambda d: _pct(_get(d, "metrics", "core", "explained_variance_legacy")),
    ),
    MetricRow(
        "ce_loss_recovered",
        "CE Loss Recovered % (↑)",
        lambda d: _pct(_get(d, "metrics", "core", "downstream", "ce_loss_recovered")),
    ),
    MetricRow(
        "kl_div_sae",
        "KL(clean ‖ SAE) nats (↓)",
        lambda d: _get(d, "metrics", "core", "downstream", "kl_div_sae"),
    ),
    MetricRow("l0", "L0 (measured)", lambda d: _get(d, "metrics", "core", "l0")),
    MetricRow(
        "frac_dead", "Dead latents % (↓)", lambda d: _pct(_get(d, "metrics", "core", "frac_dead"))
    ),
    MetricRow(
        "explained_variance_masked",
        "Explained Variance on masked acts % (↑)",
        lambda d: _pct(_get(d, "metrics", "core_masked", "explained_variance")),
    ),
    MetricRow(
        "absorption_letters",
        "Eligible absorption letters (of 26; SAEBench needs 20)",
        _n_letters,
        digits=1,
    ),
)

MIN_ABSORPTION_LETTERS = 20
"""SAEBench's minimum number of eligible letters for the absorption mean."""


@dataclass
class Stat:
    """Mean, sample standard deviation and count of one cell's values over seeds."""

    mean: float
    std: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n <= 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


def stat(values: Sequence[float]) -> Stat | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Stat(statistics.fmean(vals), std, len(vals))


Setting = tuple[Any, Any, Any, Any]  # model, layer, architecture, d_sae
Cell = tuple[Any, float]  # k, mask_prob


def _prov(doc: dict[str, Any], key: str) -> Any:
    return doc["provenance"].get(key)


def group_results(docs: Sequence[dict[str, Any]]) -> dict[Setting, dict[Cell, list[dict]]]:
    """setting -> (k, p) -> one result per seed (the latest step when a seed repeats)."""
    latest: dict[tuple, dict[str, Any]] = {}
    for doc in docs:
        setting = (
            _prov(doc, "model"),
            _prov(doc, "layer"),
            _prov(doc, "architecture"),
            _prov(doc, "d_sae"),
        )
        cell = (_prov(doc, "k"), float(_prov(doc, "mask_prob") or 0.0))
        ident = (setting, cell, _prov(doc, "seed"))
        old = latest.get(ident)
        if old is None or (_prov(doc, "step") or 0) >= (_prov(old, "step") or 0):
            latest[ident] = doc
    grouped: dict[Setting, dict[Cell, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for (setting, cell, _seed), doc in sorted(latest.items(), key=lambda kv: str(kv[0])):
        grouped[setting][cell].append(doc)
    return grouped


def _sort_key(v: Any) -> tuple[int, Any]:
    return (1, str(v)) if v is None or not isinstance(v, (int, float)) else (0, v)


def _method(p: float) -> str:
    return "w/o masking" if p == 0 else f"w/ masking (p={p:g})"


def _k_label(k: Any) -> str:
    return f"k={k}" if k is not None else "k=?"


def _rows_present(cells: dict[Cell, list[dict]]) -> list[MetricRow]:
    return [
        r
        for r in METRIC_ROWS
        if any(r.read(d) is not None for docs in cells.values() for d in docs)
    ]


RUNS_LABEL = "Runs (seeds) behind the cell"


def runs_label(docs: Sequence[dict[str, Any]]) -> str:
    """ "2 (seeds 0, 1)": how many runs back a cell, and which seeds."""
    if not docs:
        return "–"
    seeds = sorted((_prov(d, "seed") for d in docs), key=_sort_key)
    word = "seed" if len(seeds) == 1 else "seeds"
    return f"{len(docs)} ({word} {', '.join(str(s) for s in seeds)})"


def _cell_text(row: MetricRow, docs: Sequence[dict[str, Any]]) -> str:
    """One table cell: ``row``'s mean ± std over the runs ``docs`` ("–" when none has it)."""
    s = stat([row.read(d) for d in docs])
    return s.fmt(row.digits) if s else "–"


def paper_table(cells: dict[Cell, list[dict]]) -> str:
    """Markdown: rows metric x method, columns k (the paper's Table 1/2 form); the first
    rows say how many runs (seeds) back each cell."""
    ks = sorted({k for k, _ in cells}, key=_sort_key)
    ps = sorted({p for _, p in cells})
    lines = [
        "| Metric | Method | " + " | ".join(_k_label(k) for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for p in ps:
        lines.append(
            f"| {RUNS_LABEL} | {_method(p)} | "
            + " | ".join(runs_label(cells.get((k, p), [])) for k in ks)
            + " |"
        )
    for row in _rows_present(cells):
        for p in ps:
            vals = [_cell_text(row, cells.get((k, p), [])) for k in ks]
            lines.append(f"| {row.label} | {_method(p)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def ablation_table(cells: dict[Cell, list[dict]], k: Any) -> str | None:
    """Markdown: rows metric, columns mask probability, at one k (the paper's Table 3)."""
    ps = sorted({p for kk, p in cells if kk == k})
    if len(ps) < 2:
        return None
    sub = {c: d for c, d in cells.items() if c[0] == k}
    lines = [
        "| Metric | " + " | ".join(f"p={p:g}" for p in ps) + " |",
        "|---|" + "---|" * len(ps),
        f"| {RUNS_LABEL} | " + " | ".join(runs_label(sub.get((k, p), [])) for p in ps) + " |",
    ]
    for row in _rows_present(sub):
        vals = [_cell_text(row, sub.get((k, p), [])) for p in ps]
        lines.append(f"| {row.label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def absorption_warning(cells: dict[Cell, list[dict]]) -> str | None:
    """A warning line naming every cell whose absorption averages over fewer than 20
    eligible letters (None when there is none)."""
    few = []
    for (k, p), docs in sorted(cells.items(), key=lambda kv: (_sort_key(kv[0][0]), kv[0][1])):
        counts = [n for d in docs if (n := _n_letters(d)) is not None]
        if counts and min(counts) < MIN_ABSORPTION_LETTERS:
            few.append(f"{_k_label(k)} {_method(p)}: {int(min(counts))}")
    if not few:
        return None
    return (
        f"> **Warning:** absorption averages over fewer than {MIN_ABSORPTION_LETTERS} "
        f"eligible letters (SAEBench's minimum) in {len(few)} cell(s) - "
        + "; ".join(few)
        + ". Compare those absorption numbers with care."
    )


def _slug(*parts: Any) -> str:
    text = "-".join(str(p) for p in parts if p is not None)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def plot_frontier(cells: dict[Cell, list[dict]], path: Path, title: str) -> bool:
    """L0 (measured) vs explained variance, one series per mask probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    l0_row = next(r for r in METRIC_ROWS if r.key == "l0")
    ev_row = next(r for r in METRIC_ROWS if r.key == "explained_variance")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    drawn = False
    for p in sorted({p for _, p in cells}):
        pts = []
        for k in sorted({k for k, pp in cells if pp == p}, key=_sort_key):
            docs = cells[(k, p)]
            x, y = stat([l0_row.read(d) for d in docs]), stat([ev_row.read(d) for d in docs])
            if x and y:
                pts.append((x, y))
        if pts:
            drawn = True
            (line,) = ax.plot(
                [a.mean for a, _ in pts], [b.mean for _, b in pts], marker="o", label=_method(p)
            )
            spread = [(a, b) for a, b in pts if a.n > 1 or b.n > 1]
            if spread:  # error bars only where several seeds give a spread
                ax.errorbar(
                    [a.mean for a, _ in spread],
                    [b.mean for _, b in spread],
                    xerr=[a.std for a, _ in spread],
                    yerr=[b.std for _, b in spread],
                    fmt="none",
                    ecolor=line.get_color(),
                    capsize=3,
                )
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = sorted({round(x, 1) for line in ax.get_lines() for x in line.get_xdata()})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # the measured L0s, in plain numbers
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("explained variance (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def _letter_rates(doc: dict[str, Any]) -> dict[str, float]:
    per = _get(doc, "metrics", "absorption", "per_letter")
    out: dict[str, float] = {}
    if isinstance(per, dict):
        for letter, v in per.items():
            if isinstance(v, dict):
                v = v.get("full_absorption_rate")
            if isinstance(v, (int, float)):
                out[str(letter)] = float(v)
    return out


def plot_absorption_letters(cells: dict[Cell, list[dict]], k: Any, path: Path, title: str) -> bool:
    """Full-absorption rate per letter at one k, bars per mask probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = sorted({p for kk, p in cells if kk == k})
    series: dict[float, dict[str, Stat]] = {}
    for p in ps:
        by_letter: dict[str, list[float]] = defaultdict(list)
        for doc in cells[(k, p)]:
            for letter, rate in _letter_rates(doc).items():
                by_letter[letter].append(rate)
        stats = {ltr: s for ltr, vals in by_letter.items() if (s := stat(vals))}
        if stats:
            series[p] = stats
    if not series:
        return False
    letters = sorted({ltr for s in series.values() for ltr in s})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(letters) * len(series)), 3.8))
    width = 0.8 / len(series)
    for i, (p, stats) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(letters))]
        bars = ax.bar(
            xs,
            [stats[ltr].mean if ltr in stats else 0.0 for ltr in letters],
            width,
            label=_method(p),
        )
        err = [
            (x, stats[ltr])
            for x, ltr in zip(xs, letters, strict=True)
            if ltr in stats and stats[ltr].n > 1
        ]
        if err:  # error bars only where several seeds give a spread
            ax.errorbar(
                [x for x, _ in err],
                [st.mean for _, st in err],
                yerr=[st.std for _, st in err],
                fmt="none",
                capsize=2,
                ecolor=bars.patches[0].get_facecolor() if bars.patches else "k",
            )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(letters))], letters)
    ax.set_ylabel("full absorption rate (↓)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(docs: Sequence[dict[str, Any]], out_dir: Path) -> str:
    """Write the figures under ``out_dir`` and return the Markdown text."""
    out_dir = Path(out_dir)
    md = [
        "# masksae evaluation report",
        "",
        f"{len(docs)} result file(s). Cells are the mean over seeds, with ± sample std and "
        "the seed count n where there are several; the first rows of each table give the "
        "runs (seeds) behind every cell, and plots draw error bars only where n > 1. "
        "Absorption is SAEBench's mean full "
        "absorption score in the paper's form 100·(1 − score) (higher is better); "
        "explained variance is the corrected definition unless labelled legacy.",
        "",
    ]
    for setting, cells in group_results(docs).items():
        model, layer, arch, d_sae = setting
        title = f"{model} layer {layer} · {arch} · d_sae={d_sae}"
        slug = _slug(model, f"L{layer}", arch, d_sae)
        md += [
            f"## {title}",
            "",
            "### Metrics by sparsity, with vs without masking",
            "",
            paper_table(cells),
            "",
        ]
        warning = absorption_warning(cells)
        if warning:
            md += [warning, ""]
        for k in sorted({k for k, _ in cells}, key=_sort_key):
            table = ablation_table(cells, k)
            if table:
                md += [f"### Mask-probability ablation at {_k_label(k)}", "", table, ""]
        frontier = out_dir / f"frontier_{slug}.png"
        if plot_frontier(cells, frontier, title):
            md += ["### L0 vs explained variance", "", f"![frontier]({frontier.name})", ""]
        for k in sorted({k for k, _ in cells}, key=_sort_key):
            png = out_dir / f"absorption_letters_{slug}_k{k}.png"
            if plot_absorption_letters(cells, k, png, f"{title} · {_k_label(k)}"):
                md += [
                    f"### Absorption per letter at {_k_label(k)}",
                    "",
                    f"![absorption per letter]({png.name})",
                    "",
                ]
    return "\n".join(md)


def write_report(results: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Read result files (or directories of them) and write ``out_dir/report.md`` + PNGs."""
    out_dir = Path(out_dir)
    docs: list[dict[str, Any]] = []
    for p in find_results(results):
        try:
            docs.append(load_result(p))
        except ResultFormatError as exc:
            if Path(p) in {Path(r) for r in results}:
                raise  # named explicitly by the user
            log.warning("skipping %s: %s", p, exc)
    if not docs:
        raise ResultFormatError(f"no masksae evaluation results among {[str(r) for r in results]}")
    text = build_report(docs, out_dir)
    path = out_dir / "report.md"
    atomic_write_text(path, text + "\n")
    log.info("report written to %s", path)
    return path
