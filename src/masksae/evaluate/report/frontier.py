"""The L0 frontier: measured L0 per cell, the far-from-k flag, and log-L0 interpolation.

A threshold SAE's measured L0 at inference need not equal its nominal k, so comparing two
methods at equal k can compare different sparsities. The frontier comparison puts them at
equal measured L0 instead: each seed's run of a method across k is a curve of (L0, metric)
points, and a value at another L0 is read off it by linear interpolation in log L0 between
the two neighbouring points - never extrapolated beyond the curve's L0 range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from masksae.evaluate.report.grouping import Cells, seed_of
from masksae.evaluate.report.rows import L0_KEY, MetricRow, row_by_key
from masksae.evaluate.report.stats import mean_interval

L0_FLAG_RATIO = 1.2
"""A cell is flagged when its mean measured L0 and k differ by more than this factor
(L0 > 1.2 k or L0 < k / 1.2): its numbers are not at the sparsity its k names."""

L0_ROW = row_by_key(L0_KEY)


def l0_flagged(l0: float | None, k: Any) -> bool:
    """Whether measured ``l0`` is more than :data:`L0_FLAG_RATIO` away from ``k`` (either
    way). False when either is unknown (no k for ReLU-style SAEs) or not positive."""
    if l0 is None or isinstance(k, bool) or not isinstance(k, (int, float)):
        return False
    if k <= 0 or l0 <= 0:
        return False
    return max(l0 / k, k / l0) > L0_FLAG_RATIO


def mean_l0(docs: Sequence[dict[str, Any]]) -> float | None:
    """Measured L0 of a cell: the mean over its seeds (None when no run has it)."""
    interval = mean_interval(L0_ROW.read(d) for d in docs)
    return None if interval is None else interval.mean


def cell_flagged(cells: Cells, cell: tuple[Any, float]) -> bool:
    """Whether a cell's mean measured L0 is far from its k."""
    return l0_flagged(mean_l0(cells.get(cell, [])), cell[0])


def interpolate_log_l0(points: Sequence[tuple[float, float]], l0: float) -> float | None:
    """The value at ``l0`` on the curve through ``points`` ((L0, value) pairs), linear in
    log L0 between neighbours; None when ``l0`` lies outside the points' L0 range.

    Points at the same L0 are averaged first; a single point answers only at its own L0."""
    by_l0: dict[float, list[float]] = {}
    for x, y in points:
        if x is not None and y is not None and x > 0 and not math.isnan(y):
            by_l0.setdefault(float(x), []).append(float(y))
    if not by_l0 or l0 is None or l0 <= 0:
        return None
    xs = sorted(by_l0)
    ys = [sum(by_l0[x]) / len(by_l0[x]) for x in xs]
    tol = 1e-9 * xs[-1]  # the anchor's own L0, read back after a mean, may differ in the ulp
    if l0 < xs[0] - tol or l0 > xs[-1] + tol:
        return None
    if len(xs) == 1 or l0 <= xs[0]:
        return ys[0]
    if l0 >= xs[-1]:
        return ys[-1]
    i = next(j for j in range(1, len(xs)) if xs[j] >= l0)
    x0, x1 = math.log(xs[i - 1]), math.log(xs[i])
    w = (math.log(l0) - x0) / (x1 - x0)
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


def seed_curves(cells: Cells, p: float, row: MetricRow) -> dict[Any, list[tuple[float, float]]]:
    """seed -> the (measured L0, metric) points of method ``p`` across k, for that seed."""
    curves: dict[Any, list[tuple[float, float]]] = {}
    for (_k, pp), docs in cells.items():
        if pp != p:
            continue
        for doc in docs:
            l0, y = L0_ROW.read(doc), row.read(doc)
            if l0 is not None and y is not None:
                curves.setdefault(seed_of(doc), []).append((l0, y))
    return curves


def l0_range(cells: Cells, p: float) -> tuple[float, float] | None:
    """Smallest and largest measured L0 of any run of method ``p`` (None when none)."""
    l0s = [v for (_k, pp), docs in cells.items() if pp == p for d in docs if (v := L0_ROW.read(d))]
    return (min(l0s), max(l0s)) if l0s else None
