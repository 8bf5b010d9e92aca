"""Assemble ``report.md`` from the sections, writing every table as CSV and LaTeX beside it.

Layout: one ``##`` part per (model, layer), opening with its frontier figure (every
architecture on it); inside, one ``###`` part per setting (architecture, d_sae) whose
``####`` sections come from :data:`SETTING_SECTIONS`. A section is a function of the
:class:`ReportContext` and the part it describes, returning Markdown lines (none when it has
nothing to show); adding a table or figure to the report is one function and one entry in
:data:`SETTING_SECTIONS` or :data:`MODEL_LAYER_SECTIONS`.

Files under the output directory: ``report.md``, the PNG figures, and ``tables/`` holding
``<setting>__<table>.csv`` (tidy numbers: means, interval ends, seed counts) and ``.tex``
(the table as shown, booktabs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masksae.atomic import atomic_write_text
from masksae.evaluate.discover import find_results
from masksae.evaluate.report import figures, tables
from masksae.evaluate.report.frontier import L0_FLAG_RATIO, cell_flagged, mean_l0
from masksae.evaluate.report.grouping import (
    Cells,
    Setting,
    by_model_layer,
    group_results,
    k_label,
    ks_of,
    ps_of,
    setting_slug,
    setting_title,
    short_method,
    slug,
)
from masksae.evaluate.report.narrative import comparison_sentence, l0_shift_paragraph
from masksae.evaluate.report.rows import MIN_ABSORPTION_LETTERS, n_eligible_letters
from masksae.evaluate.report.stats import CONFIDENCE, INTERVAL_METHOD
from masksae.evaluate.schema import ResultFormatError, load_result

log = logging.getLogger(__name__)

TABLES_DIR = "tables"
"""Subfolder of the CSV and LaTeX tables."""


@dataclass
class ReportContext:
    """Where a report is written, and what it has written so far."""

    out_dir: Path
    """The report folder (report.md, PNGs, tables/)."""
    files: list[Path] = field(default_factory=list)
    """Every table and figure file written, in order."""

    def table(self, table: tables.Table, prefix: str, level: str = "####") -> list[str]:
        """Write ``table`` as CSV and LaTeX; its Markdown section (heading, table, notes)."""
        stem = f"{prefix}__{table.name}"
        csv_path = self.out_dir / TABLES_DIR / f"{stem}.csv"
        tex_path = self.out_dir / TABLES_DIR / f"{stem}.tex"
        atomic_write_text(csv_path, table.data.to_csv(index=False))
        atomic_write_text(tex_path, table.latex())
        self.files += [csv_path, tex_path]
        links = f"[CSV]({TABLES_DIR}/{csv_path.name}) · [LaTeX]({TABLES_DIR}/{tex_path.name})"
        lines = [f"{level} {table.title}", "", table.markdown(), ""]
        lines += [*(f"{note}  " for note in table.notes), f"Files: {links}", ""]
        return lines

    def figure(self, path: Path, alt: str) -> list[str]:
        """The Markdown of a figure written at ``path``."""
        self.files.append(path)
        return [f"![{alt}]({path.name})", ""]


@dataclass(frozen=True)
class SettingPart:
    """One setting's cells and names."""

    setting: Setting
    cells: Cells

    @property
    def title(self) -> str:
        return setting_title(self.setting)

    @property
    def slug(self) -> str:
        return setting_slug(self.setting)


@dataclass(frozen=True)
class ModelLayerPart:
    """Every setting of one model and layer."""

    model: Any
    layer: Any
    settings: dict[Setting, Cells]

    @property
    def title(self) -> str:
        return f"{self.model} layer {self.layer}"

    @property
    def slug(self) -> str:
        return slug(self.model, f"L{self.layer}")


# ---- sections of a model/layer part ----------------------------------------------------


def frontier_section(ctx: ReportContext, part: ModelLayerPart) -> list[str]:
    path = ctx.out_dir / f"frontier_{part.slug}.png"
    if not figures.plot_frontier(part.settings, path, part.title):
        return []
    return [
        "### Frontier: metrics vs measured L0, every architecture",
        "",
        *ctx.figure(path, "frontier"),
    ]


MODEL_LAYER_SECTIONS: tuple[Callable[[ReportContext, ModelLayerPart], list[str]], ...] = (
    frontier_section,
)
"""Sections at the top of each (model, layer) part, in order."""


# ---- sections of a setting part ---------------------------------------------------------


def absorption_warning(cells: Cells) -> str | None:
    """A warning naming every cell whose absorption averages over fewer than 20 eligible
    letters (None when there is none)."""
    few = []
    for k in ks_of(cells):
        for p in ps_of(cells, k):
            counts = [n for d in cells[(k, p)] if (n := n_eligible_letters(d)) is not None]
            if counts and min(counts) < MIN_ABSORPTION_LETTERS:
                few.append(f"{k_label(k)} {short_method(p)}: {int(min(counts))}")
    if not few:
        return None
    return (
        f"> **Warning:** absorption averages over fewer than {MIN_ABSORPTION_LETTERS} "
        f"eligible letters (SAEBench's minimum) in {len(few)} cell(s) - "
        + "; ".join(few)
        + ". Compare those absorption numbers with care."
    )


def flag_note(cells: Cells, only_k: Any = ...) -> str | None:
    """What "†" means, naming the flagged cells (at ``only_k`` when given; None when no
    cell is flagged)."""
    flagged = []
    for k in ks_of(cells):
        if only_k is not ... and k != only_k:
            continue
        for p in ps_of(cells, k):
            l0 = mean_l0(cells[(k, p)])
            if l0 is not None and cell_flagged(cells, (k, p)):
                flagged.append(f"{k_label(k)} {short_method(p)}: L0 {l0:.1f}")
    if not flagged:
        return None
    return (
        f"{tables.FLAG} measured L0 differs from k by more than a factor {L0_FLAG_RATIO:g} "
        f"({'; '.join(flagged)}): such cells are not at the sparsity their k names; compare "
        "at equal measured L0 (the frontier comparison)."
    )


def paper_section(ctx: ReportContext, part: SettingPart) -> list[str]:
    table = tables.paper_table(part.cells)
    table.notes += [n for n in (flag_note(part.cells), absorption_warning(part.cells)) if n]
    return ctx.table(table, part.slug)


def l0_explanation_section(ctx: ReportContext, part: SettingPart) -> list[str]:
    paragraph = l0_shift_paragraph(part.setting, part.cells)
    return [paragraph, ""] if paragraph else []


def equal_l0_section(ctx: ReportContext, part: SettingPart) -> list[str]:
    lines: list[str] = []
    if 0.0 not in ps_of(part.cells):
        return lines
    rows = {r.key: r for r in tables.comparison_rows(part.cells)}
    for p in [p for p in ps_of(part.cells) if p > 0]:
        table = tables.equal_l0_table(part.cells, p)
        if table is None:
            continue
        comparisons = tables.equal_l0_comparisons(part.cells, p)
        sentences = [
            comparison_sentence(rows[key], p, cs)
            for key, cs in comparisons.items()
            if rows[key].frontier
        ]
        table.notes.append(
            "Each column is a point of one method (its measured values); the other method's "
            "curve for the same seed is interpolated linearly in log L0 at that L0, never "
            "extrapolated. Cells: masked minus unmasked, mean over seeds [95% interval]."
        )
        lines += ctx.table(table, part.slug)
        if sentences:
            lines += [*sentences, ""]
    return lines


def equal_k_section(ctx: ReportContext, part: SettingPart) -> list[str]:
    table = tables.equal_k_table(part.cells)
    if table is None:
        return []
    table.notes.append(
        "Masked minus unmasked at the same nominal k, mean of the per-seed differences "
        f"[95% interval]; {tables.FLAG} where either run's measured L0 is far from k."
    )
    return ctx.table(table, part.slug)


def shift_section(ctx: ReportContext, part: SettingPart) -> list[str]:
    table = tables.shift_table(part.cells)
    if table is None:
        if any(p > 0 for p in ps_of(part.cells)):
            return [
                "#### Distribution shift cost: clean vs masked text",
                "",
                "n/a: no result carries metrics on masked text; evaluate with "
                "`masksae evaluate --eval-masked` to compare each SAE's reconstruction on "
                "clean text with that on masked text.",
                "",
            ]
        return []
    table.notes.append(
        "The same SAE scored on clean held-out text and on masked text (p of its method); "
        "clean − masked is paired within each run. For a masked-trained SAE this is the cost "
        "of being used on text unlike its training data."
    )
    return ctx.table(table, part.slug)


def ablation_section(ctx: ReportContext, part: SettingPart) -> list[str]:
    lines: list[str] = []
    for k in ks_of(part.cells):
        table = tables.ablation_table(part.cells, k)
        if table is not None:
            note = flag_note(part.cells, only_k=k)
            table.notes += [note] if note else []
            lines += ctx.table(table, part.slug)
    return lines


def letters_section(ctx: ReportContext, part: SettingPart) -> list[str]:
    lines: list[str] = []
    for k in ks_of(part.cells):
        png = ctx.out_dir / f"absorption_letters_{part.slug}_k{k}.png"
        if not figures.plot_absorption_letters(part.cells, part.setting, k, png, part.title):
            continue
        l0s = ", ".join(
            f"{short_method(p)} {v:.1f}"
            for p in ps_of(part.cells, k)
            if (v := mean_l0(part.cells[(k, p)])) is not None
        )
        table = tables.letters_table(part.cells, k)
        heading = f"#### Absorption per letter at {k_label(k)}" + (
            f" (measured L0: {l0s})" if l0s else ""
        )
        lines += [heading, "", *ctx.figure(png, "absorption per letter")]
        if table is not None:
            lines += ["<details><summary>Per-letter table</summary>", ""]
            lines += ctx.table(table, part.slug, level="#####")
            lines += ["</details>", ""]
    return lines


def probing_section(ctx: ReportContext, part: SettingPart) -> list[str]:
    """The probing settings behind the probing rows, and the paper's Figure 1 (OOD probing)
    per k."""
    from masksae.evaluate.probing.figures import plot_ood_figure, probing_note

    note = probing_note([d for docs in part.cells.values() for d in docs])
    lines = [note, ""] if note else []
    for k in ks_of(part.cells):
        png = ctx.out_dir / f"ood_probing_{part.slug}_k{k}.png"
        if plot_ood_figure(part.cells, part.setting, k, png, part.title):
            lines += [
                f"#### OOD probing at {k_label(k)} (the paper's Figure 1)",
                "",
                *ctx.figure(png, "OOD probing AUC"),
            ]
    return lines


SETTING_SECTIONS: tuple[Callable[[ReportContext, SettingPart], list[str]], ...] = (
    paper_section,
    l0_explanation_section,
    equal_l0_section,
    equal_k_section,
    shift_section,
    ablation_section,
    letters_section,
    probing_section,
)
"""Sections of each setting part, in order."""


# ---- the whole report -------------------------------------------------------------------


def introduction(n_docs: int) -> list[str]:
    pct = f"{CONFIDENCE:.0%}"
    return [
        "# masksae evaluation report",
        "",
        f"{n_docs} result file(s); when several checkpoints of one run are given, the latest "
        "step counts. **Statistics:** every cell is the mean over seeds followed by its "
        f"{pct} confidence interval in brackets ({INTERVAL_METHOD}); a single-seed cell "
        "shows the mean alone, and the first rows of each table name the seeds behind it. "
        "Every masked-vs-unmasked comparison is the mean of the differences between runs "
        f"of the same training seed, with its {pct} interval (same method), at equal k and "
        "at equal measured L0. Figures draw the same intervals where there are several "
        f"seeds. **n/a**: no run has the value. **{tables.FLAG}**: the cell's measured L0 "
        f"differs from its k by more than a factor {L0_FLAG_RATIO:g}.",
        "",
        "Absorption is SAEBench's mean full absorption score in the paper's form "
        "100·(1 − score) (higher is better); explained variance is the corrected "
        "definition unless labelled legacy; L0 is measured on clean held-out text.",
        "",
    ]


def build_report(docs: Sequence[dict[str, Any]], out_dir: str | Path) -> str:
    """Write the figures and tables under ``out_dir``; return the Markdown text."""
    ctx = ReportContext(Path(out_dir))
    md = introduction(len(docs))
    grouped = group_results(docs)
    for (model, layer), settings in by_model_layer(grouped).items():
        part = ModelLayerPart(model, layer, settings)
        md += [f"## {part.title}", ""]
        for group_section in MODEL_LAYER_SECTIONS:
            md += group_section(ctx, part)
        for setting, cells in settings.items():
            setting_part = SettingPart(setting, cells)
            md += [f"### {setting_part.title}", ""]
            for section in SETTING_SECTIONS:
                md += section(ctx, setting_part)
    return "\n".join(md).rstrip() + "\n"


def load_results(results: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read result files (or folders of them); a bad file named explicitly is an error,
    one found in a folder is skipped with a warning."""
    docs: list[dict[str, Any]] = []
    named = {Path(r) for r in results}
    for path in find_results(results):
        try:
            docs.append(load_result(path))
        except ResultFormatError as exc:
            if Path(path) in named:
                raise
            log.warning("skipping %s: %s", path, exc)
    if not docs:
        raise ResultFormatError(f"no masksae evaluation results among {[str(r) for r in results]}")
    return docs


def write_report(results: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Read result files (or folders of them); write ``out_dir/report.md``, the PNG figures
    and ``out_dir/tables/*.csv|.tex``; return the report's path."""
    out_dir = Path(out_dir)
    text = build_report(load_results(results), out_dir)
    path = out_dir / "report.md"
    atomic_write_text(path, text)
    log.debug("report written to %s", path)  # the CLI prints the path once
    return path
