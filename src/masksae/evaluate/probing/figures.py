"""What the report shows of the probing metrics: the table rows' readers, a settings note,
and the masking paper's Figure 1 (OOD probing AUC, SAE vs oracle, masked vs unmasked).

The report (``masksae.evaluate.report``) lists :data:`ROWS` among its metric rows and calls
:func:`probing_note` and :func:`plot_ood_figure` from its probing section; the figure uses
the report's intervals, colours and file writing, imported when it is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _section(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    section = (doc.get("metrics") or {}).get(name)
    return section if isinstance(section, dict) else None


def _pct(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


def sparse_probing_accuracy(doc: dict[str, Any]) -> float | None:
    """SAE top-k test accuracy in percent at the run's headline k (SAEBench's sparse probing
    number; the paper's "Sparse Probing" row)."""
    s = _section(doc, "sparse_probing")
    if s is None:
        return None
    return _pct(s.get(f"sae_top_{s.get('headline_k', 1)}_test_accuracy"))


def sparse_probing_llm_accuracy(doc: dict[str, Any]) -> float | None:
    """The same top-k probe on the LLM activations (the reference line), percent."""
    s = _section(doc, "sparse_probing")
    if s is None:
        return None
    return _pct(s.get(f"llm_top_{s.get('headline_k', 1)}_test_accuracy"))


def tpp_score(doc: dict[str, Any]) -> float | None:
    """TPP total metric at the headline N, percent (the paper's "TPP" row)."""
    s = _section(doc, "tpp")
    if s is None:
        return None
    return _pct(s.get(f"tpp_threshold_{s.get('headline_n', 20)}_total_metric"))


def scr_score(doc: dict[str, Any]) -> float | None:
    """SCR metric at the headline N, percent (the paper's "SCR" row)."""
    s = _section(doc, "scr")
    if s is None:
        return None
    return _pct(s.get(f"scr_metric_threshold_{s.get('headline_n', 20)}"))


def ood_sae_auc(doc: dict[str, Any]) -> float | None:
    """Mean OOD test ROC-AUC of the SAE probes over the datasets, percent."""
    s = _section(doc, "ood")
    return None if s is None else _pct(s.get("mean_sae_test_auc"))


def ood_oracle_auc(doc: dict[str, Any]) -> float | None:
    """Mean OOD test ROC-AUC of the oracle probes (raw LLM activations), percent."""
    s = _section(doc, "ood")
    return None if s is None else _pct(s.get("mean_oracle_test_auc"))


ROWS: tuple[tuple[str, str, Any, bool | None, bool], ...] = (
    ("sparse_probing", "Sparse Probing, SAE top-k accuracy %", sparse_probing_accuracy, True, True),
    (
        "sparse_probing_llm",
        "Sparse Probing, LLM top-k accuracy % (reference)",
        sparse_probing_llm_accuracy,
        None,
        False,
    ),
    ("tpp", "TPP %", tpp_score, True, True),
    ("scr", "SCR %", scr_score, True, True),
    ("ood_sae_auc", "OOD probing AUC %, SAE", ood_sae_auc, True, True),
    ("ood_oracle_auc", "OOD probing AUC %, oracle on LLM activations", ood_oracle_auc, None, False),
)
"""(key, label, reader, higher_is_better, compare) of every probing row of the report's
tables (the oracle and LLM reference lines do not depend on the SAE: no direction, no
masked-vs-unmasked comparison)."""


def probing_note(docs: Sequence[dict[str, Any]]) -> str | None:
    """One Markdown line naming the probing settings behind the rows (preset, headline k and
    N, tasks), or None when no result has a probing metric."""
    parts: list[str] = []
    seen: set[str] = set()
    for doc in docs:
        for name in ("sparse_probing", "tpp", "scr", "ood"):
            s = _section(doc, name)
            if s is None or name in seen:
                continue
            seen.add(name)
            preset = (s.get("settings") or {}).get("preset", "?")
            tasks = ", ".join(s.get("tasks") or [])
            if name == "sparse_probing":
                detail = f"top-{s.get('headline_k')} latents"
            elif name == "ood":
                detail = f"top-{s.get('k')} latents, L1 probe, mean over datasets"
            else:
                detail = f"top-{s.get('headline_n')} latents ablated"
            parts.append(f"{name}: {detail}, preset {preset} ({tasks})")
    if not parts:
        return None
    return "Probing rows - " + "; ".join(parts) + "."


def _auc(doc: dict[str, Any], task: str | None, key: str) -> float | None:
    s = _section(doc, "ood")
    if s is None:
        return None
    if task is None:
        value = s.get("mean_sae_test_auc" if key == "sae_test_auc" else "mean_oracle_test_auc")
    else:
        value = (s.get("per_task") or {}).get(task, {}).get(key)
    return None if value is None else float(value)


def plot_ood_figure(
    cells: Mapping[tuple[Any, float], Sequence[dict[str, Any]]],
    setting: Sequence[Any],
    k: Any,
    path: Path,
    title: str,
) -> bool:
    """The paper's Figure 1 for one setting at sparsity ``k``: test ROC-AUC per OOD dataset
    and the mean over the datasets, bars for the oracle (probes on raw LLM activations, red)
    and for the SAE probes of each mask probability (the report's method colours), with the
    report's 95% intervals over seeds where there are several. ``cells`` maps (k,
    mask_prob) to result documents (one per seed); ``setting`` is (model, layer,
    architecture, d_sae). Returns False (nothing written) when no result at ``k`` has OOD
    probing."""
    from masksae.evaluate.report.colors import method_color
    from masksae.evaluate.report.figures import error_bars, pyplot, save_figure
    from masksae.evaluate.report.grouping import k_label, method_label, ps_of
    from masksae.evaluate.report.stats import mean_interval

    ps = [p for p in ps_of(cells, k) if any(_section(d, "ood") for d in cells[(k, p)])]
    if not ps:
        return False
    docs_at_k = [d for p in ps for d in cells[(k, p)] if _section(d, "ood") is not None]
    tasks: list[str] = []
    for d in docs_at_k:
        section = _section(d, "ood") or {}
        for t in section.get("tasks") or section.get("per_task", {}):  # the run's order
            if t not in tasks:
                tasks.append(t)
    groups: list[str | None] = [*tasks, None]  # None: the mean over the datasets
    # the oracle does not depend on the SAE: every result at k holds the same value
    series = [
        (
            "oracle (LLM activations)",
            "tab:red",
            [mean_interval([_auc(docs_at_k[0], t, "oracle_test_auc")]) for t in groups],
        )
    ]
    for p in ps:
        docs = [d for d in cells[(k, p)] if _section(d, "ood") is not None]
        series.append(
            (
                f"SAE, {method_label(p)}",
                method_color(setting[2], p),
                [mean_interval(_auc(d, t, "sae_test_auc") for d in docs) for t in groups],
            )
        )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.5 * len(groups) * len(series)), 4.0))
    width = 0.8 / len(series)
    for j, (label, color, intervals) in enumerate(series):
        xs = [g + (j - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [iv.mean if iv else 0.0 for iv in intervals], width, label=label, color=color)
        spread = [(x, iv) for x, iv in zip(xs, intervals, strict=True) if iv and iv.n > 1]
        if spread:  # error bars only where several seeds give an interval
            ax.errorbar(
                [x for x, _ in spread],
                [iv.mean for _, iv in spread],
                yerr=error_bars([iv for _, iv in spread]),
                fmt="none",
                ecolor="black",
                capsize=2,
            )
    ax.set_xticks(
        range(len(groups)), [t or "mean" for t in groups], rotation=30, ha="right", fontsize=8
    )
    ax.axvline(len(groups) - 1.5, color="black", linewidth=0.5)
    lows = [iv.mean for _, _, ivs in series for iv in ivs if iv]
    ax.set_ylim(max(0.0, min(0.5, min(lows, default=0.5) - 0.05)), 1.0)
    ax.set_ylabel("OOD test ROC-AUC (↑)", fontsize=8)
    ax.set_title(f"{title} · {k_label(k)}: OOD probing (95% intervals)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
    return True
