"""The report's figures (PNG, matplotlib's Agg backend).

- Frontier: one figure per (model, layer) with every architecture on it; one panel per
  metric row with ``frontier=True`` against measured L0 on a log axis; points labelled with
  their k; error bars are the 95% intervals over seeds (drawn where n > 1) in both L0 and the
  metric.
- Absorption per letter at one k: each method's per-letter score (higher is better) with
  95% intervals; the tick labels carry the words scored; letters no run scored are marked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from masksae.evaluate.report import rows as row_spec
from masksae.evaluate.report.colors import method_color, method_linestyle
from masksae.evaluate.report.frontier import L0_ROW
from masksae.evaluate.report.grouping import (
    Cells,
    Setting,
    k_label,
    ks_of,
    method_label,
    ps_of,
    sort_key,
)
from masksae.evaluate.report.letters import LETTERS, has_letters, summarize_letters
from masksae.evaluate.report.rows import MetricRow
from masksae.evaluate.report.stats import Interval, mean_interval

MARKERS = ("o", "s", "^", "D", "v", "P")
"""Markers for several dictionary sizes of one architecture (colour stays the method's)."""
NICE_L0_TICKS = (1, 2, 3, 5, 10, 15, 20, 30, 40, 60, 80, 120, 160, 240, 320, 640, 1280, 2560)
"""Candidate tick positions on the log L0 axis (the paper's k grid and its extension)."""


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    from masksae.atomic import atomic_write

    try:  # atomic: an interrupted report leaves the old image or the new one, never half
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        pyplot().close(fig)


def error_bars(intervals: Sequence[Interval]) -> list[list[float]]:
    """matplotlib's asymmetric error arrays [[below...], [above...]] for intervals."""
    return [
        [iv.mean - iv.low if iv.has_interval else 0.0 for iv in intervals],  # type: ignore[operator]
        [iv.high - iv.mean if iv.has_interval else 0.0 for iv in intervals],  # type: ignore[operator]
    ]


def _frontier_points(
    cells: Cells, p: float, row: MetricRow
) -> list[tuple[Any, Interval, Interval]]:
    """(k, L0 interval, metric interval) of method ``p``, ascending in L0."""
    points = []
    for k in ks_of(cells):
        docs = cells.get((k, p), [])
        pairs = [(L0_ROW.read(d), row.read(d)) for d in docs]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None and x > 0]
        x, y = mean_interval(a for a, _ in pairs), mean_interval(b for _, b in pairs)
        if x is not None and y is not None:
            points.append((k, x, y))
    return sorted(points, key=lambda t: t[1].mean)


def _series_label(setting: Setting, p: float, several_sizes: bool) -> str:
    _model, _layer, arch, d_sae = setting
    size = f" F={d_sae}" if several_sizes else ""
    return f"{arch}{size} {method_label(p)}"


def _l0_ticks(ax: Any, l0s: Sequence[float]) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    lo, hi = min(l0s), max(l0s)
    ticks = [t for t in NICE_L0_TICKS if lo / 1.15 <= t <= hi * 1.15]
    if len(ticks) < 2:  # a narrow range: label the measured values themselves
        ticks = sorted({round(v, 1) for v in l0s})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def frontier_rows(settings: dict[Setting, Cells]) -> list[MetricRow]:
    """The frontier panels that have data: rows with ``frontier=True`` some run has."""
    docs = [d for cells in settings.values() for ds in cells.values() for d in ds]
    with_l0 = [d for d in docs if L0_ROW.read(d) is not None]
    return [
        r
        for r in row_spec.METRIC_ROWS
        if r.frontier and any(r.read(d) is not None for d in with_l0)
    ]


def plot_frontier(settings: dict[Setting, Cells], path: Path, title: str) -> bool:
    """Every metric with ``frontier=True`` vs measured L0 for all settings of one model and
    layer; False (nothing written) when no run has L0 and such a metric."""
    rows = frontier_rows(settings)
    if not rows:
        return False
    plt = pyplot()
    ncols = min(2, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    sizes: dict[Any, set] = {}
    for _m, _l, arch, d_sae in settings:
        sizes.setdefault(arch, set()).add(d_sae)
    handles: dict[str, Any] = {}
    for ax, row in zip(axes.flat, rows, strict=False):
        l0s: list[float] = []
        for setting, cells in settings.items():
            arch, d_sae = setting[2], setting[3]
            ordered_sizes = sorted(sizes[arch], key=sort_key)
            marker = MARKERS[ordered_sizes.index(d_sae) % len(MARKERS)]
            for p in ps_of(cells):
                points = _frontier_points(cells, p, row)
                if not points:
                    continue
                color = method_color(arch, p)
                xs = [x.mean for _, x, _ in points]
                ys = [y.mean for _, _, y in points]
                l0s += xs
                label = _series_label(setting, p, len(ordered_sizes) > 1)
                (line,) = ax.plot(
                    xs, ys, marker=marker, color=color, linestyle=method_linestyle(p), label=label
                )
                handles.setdefault(label, line)
                spread = [(x, y) for _, x, y in points if x.n > 1 or y.n > 1]
                if spread:  # error bars only where several seeds give an interval
                    ax.errorbar(
                        [x.mean for x, _ in spread],
                        [y.mean for _, y in spread],
                        xerr=error_bars([x for x, _ in spread]),
                        yerr=error_bars([y for _, y in spread]),
                        fmt="none",
                        ecolor=color,
                        capsize=3,
                    )
                for k, x, y in points:
                    ax.annotate(
                        f"k={k}",
                        (x.mean, y.mean),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=color,
                    )
        ax.set_xscale("log")
        _l0_ticks(ax, l0s)
        ax.set_xlabel("measured L0 (active latents per token, log scale)")
        ax.set_ylabel(row.title, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.suptitle(f"{title}: metrics vs measured L0 (95% intervals over seeds)", fontsize=9)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        fontsize=8,
        ncol=min(3, len(handles)),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(handles) // 3), 1, 0.96))
    save_figure(fig, path)
    return True


def plot_absorption_letters(cells: Cells, setting: Setting, k: Any, path: Path, title: str) -> bool:
    """Per-letter absorption score (higher is better) at one k, one series per mask
    probability; False (nothing written) when no run at this k has per-letter scores."""
    ps = [p for p in ps_of(cells, k) if has_letters(cells[(k, p)])]
    if not ps:
        return False
    plt = pyplot()
    summaries = {p: summarize_letters(cells[(k, p)]) for p in ps}
    fig, ax = plt.subplots(figsize=(10.5, 3.9))
    width = 0.7 / len(ps)
    scored_any = {ltr for s in summaries.values() for ltr, v in s.items() if v.score}
    for i, p in enumerate(ps):
        entries = [(j, summaries[p][ltr].score) for j, ltr in enumerate(LETTERS)]
        entries = [(j + (i - (len(ps) - 1) / 2) * width, iv) for j, iv in entries if iv]
        color = method_color(setting[2], p)
        ax.plot(
            [x for x, _ in entries],
            [iv.mean for _, iv in entries],
            linestyle="none",
            marker="o",
            color=color,
            label=method_label(p),
        )
        spread = [(x, iv) for x, iv in entries if iv.n > 1]
        if spread:  # error bars only where several seeds give an interval
            ax.errorbar(
                [x for x, _ in spread],
                [iv.mean for _, iv in spread],
                yerr=error_bars([iv for _, iv in spread]),
                fmt="none",
                ecolor=color,
                capsize=2,
            )
    missing = [j for j, ltr in enumerate(LETTERS) if ltr not in scored_any]
    if missing:  # marked at the bottom edge, not drawn as a score
        ax.plot(
            missing,
            [0.02] * len(missing),
            linestyle="none",
            marker="x",
            color="0.5",
            transform=ax.get_xaxis_transform(),
            label="not eligible (no score)",
        )
    labels = []
    for ltr in LETTERS:
        words = next((s[ltr].words_text for s in summaries.values() if s[ltr].words), "–")
        labels.append(f"{ltr}\n{words}")
    ax.set_xticks(range(len(LETTERS)), labels, fontsize=7)
    for j in missing:
        ax.get_xticklabels()[j].set_color("0.6")
    ax.set_xlim(-0.6, len(LETTERS) - 0.4)
    ax.set_xlabel("first letter / true-positive words scored", fontsize=8)
    ax.set_ylabel("100·(1 − full absorption rate) (↑)", fontsize=8)
    ax.set_title(f"{title} · {k_label(k)}: absorption per letter (95% intervals)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
    return True
