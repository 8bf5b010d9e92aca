"""The comparison report: tables in the paper's form, masked-vs-unmasked comparisons at equal
k and at equal measured L0, and figures, from evaluation result JSONs only.

Modules, one concern each:
- ``rows``: what is reported - :data:`METRIC_ROWS` (one entry per metric) and the
  distribution-shift rows; readers that tolerate missing metrics.
- ``grouping``: results -> settings (model, layer, architecture, d_sae) -> cells (k, p) ->
  one result per seed (latest step); method names and labels.
- ``stats``: mean over seeds with a 95% Student-t interval; paired differences.
- ``frontier``: measured L0, the far-from-k flag, log-L0 interpolation of a seed's curve.
- ``compare``: masked minus unmasked, paired by seed, at equal k and at equal L0.
- ``letters``: absorption per letter (higher is better), word counts, missing letters.
- ``tables``: pandas DataFrames (Markdown, LaTeX, tidy CSV).
- ``colors``: a fixed colour per (architecture, mask probability).
- ``figures``: the frontier figure per model/layer and absorption per letter.
- ``narrative``: generated sentences and the why-L0-exceeds-k paragraph.
- ``writer``: the sections of ``report.md`` and :func:`write_report`.
"""

from masksae.evaluate.report.grouping import group_results
from masksae.evaluate.report.rows import METRIC_ROWS, MetricRow, metric_at
from masksae.evaluate.report.tables import Table, ablation_table, paper_table
from masksae.evaluate.report.writer import build_report, load_results, write_report

__all__ = [
    "METRIC_ROWS",
    "MetricRow",
    "Table",
    "ablation_table",
    "build_report",
    "group_results",
    "load_results",
    "metric_at",
    "paper_table",
    "write_report",
]
