"""Masked vs unmasked: paired differences at equal k and at equal measured L0.

Every comparison pairs a masked run with the unmasked run of the same training seed in the
same setting (model, layer, architecture, d_sae) and reports the mean of the per-seed
differences (masked minus unmasked) with its Student-t interval (:mod:`.stats`).

- At equal k the pair is the two runs trained with the same k.
- At equal L0 (the frontier) every point of either method is an *anchor*: its own measured
  value is compared with the other method's curve for the same seed, interpolated in log L0
  at the anchor's L0 (:mod:`.frontier`). Anchors outside the other method's L0 range have no
  comparison, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from masksae.evaluate.report.frontier import (
    L0_ROW,
    cell_flagged,
    interpolate_log_l0,
    l0_range,
    seed_curves,
)
from masksae.evaluate.report.grouping import Cells, ks_of, method_label, seed_of, sort_key
from masksae.evaluate.report.rows import MetricRow
from masksae.evaluate.report.stats import Interval, mean_interval, paired_interval


@dataclass(frozen=True)
class Comparison:
    """One masked-vs-unmasked comparison of one metric at one point."""

    metric: MetricRow
    """The metric compared."""
    mask_prob: float
    """The masked method's p (the control is always p = 0)."""
    k: Any
    """Equal k: the k of both runs. Equal L0: the k of the anchor point."""
    anchor_p: float | None
    """Equal L0: the method whose point is the anchor (its values are measured, the other
    method's interpolated); None at equal k."""
    l0: float | None
    """Equal L0: the anchor's measured L0 (mean over its seeds); None at equal k."""
    treated: Interval | None
    """The masked method's value over seeds."""
    control: Interval | None
    """The unmasked method's value over seeds."""
    diff: Interval | None
    """Masked minus unmasked, paired by seed; None when no seed pairs."""
    note: str = ""
    """Why ``diff`` is missing or rests on fewer seeds than the anchor ("" otherwise)."""
    flagged: bool = False
    """Equal k: a run's measured L0 is far from k (see ``frontier.L0_FLAG_RATIO``)."""


def _by_seed(docs: list[dict[str, Any]], row: MetricRow) -> dict[Any, float | None]:
    return {seed_of(d): row.read(d) for d in docs}


def _pair_note(treated: dict[Any, float | None], control: dict[Any, float | None]) -> str:
    t_seeds = {s for s, v in treated.items() if v is not None}
    c_seeds = {s for s, v in control.items() if v is not None}
    if not t_seeds or not c_seeds:
        return "n/a: a method lacks this metric"
    if not t_seeds & c_seeds:
        return "n/a: no seed in common"
    return ""


def equal_k(cells: Cells, row: MetricRow, mask_prob: float) -> list[Comparison]:
    """Masked (p = ``mask_prob``) minus unmasked at every k both methods have."""
    out = []
    for k in ks_of(cells):
        masked, unmasked = cells.get((k, mask_prob)), cells.get((k, 0.0))
        if not masked or not unmasked:
            continue
        t, c = _by_seed(masked, row), _by_seed(unmasked, row)
        t_iv, c_iv = mean_interval(t.values()), mean_interval(c.values())
        if t_iv is None and c_iv is None:
            continue
        out.append(
            Comparison(
                metric=row,
                mask_prob=mask_prob,
                k=k,
                anchor_p=None,
                l0=None,
                treated=t_iv,
                control=c_iv,
                diff=paired_interval(t, c),
                note=_pair_note(t, c),
                flagged=cell_flagged(cells, (k, mask_prob)) or cell_flagged(cells, (k, 0.0)),
            )
        )
    return out


def equal_l0(cells: Cells, row: MetricRow, mask_prob: float) -> list[Comparison]:
    """Masked minus unmasked at the measured L0 of every point of either method, in
    ascending L0; the other method's value is interpolated on its own curve for the seed."""
    out = []
    curves = {p: seed_curves(cells, p, row) for p in (0.0, mask_prob)}
    for anchor_p, other_p in ((0.0, mask_prob), (mask_prob, 0.0)):
        if not curves[other_p]:
            continue
        other_range = l0_range(cells, other_p)
        for k in ks_of(cells):
            docs = cells.get((k, anchor_p))
            if not docs:
                continue
            anchor: dict[Any, float | None] = {}
            other: dict[Any, float | None] = {}
            l0s = []
            for doc in docs:
                l0, y = L0_ROW.read(doc), row.read(doc)
                if l0 is None or y is None:
                    continue
                seed = seed_of(doc)
                l0s.append(l0)
                anchor[seed] = y
                if seed in curves[other_p]:
                    other[seed] = interpolate_log_l0(curves[other_p][seed], l0)
            if not anchor:
                continue
            l0_mean = sum(l0s) / len(l0s)
            inside = {s for s, v in other.items() if v is not None}
            note = ""
            if not other:
                note = f"n/a: no {method_label(other_p)} run with the same seed"
            elif not inside:
                lo, hi = other_range or (float("nan"), float("nan"))
                note = f"outside the {method_label(other_p)} L0 range {lo:.1f}–{hi:.1f}"
            elif len(inside) < len(anchor):
                note = f"{len(inside)} of {len(anchor)} seeds inside the other method's L0 range"
            treated, control = (anchor, other) if anchor_p == mask_prob else (other, anchor)
            out.append(
                Comparison(
                    metric=row,
                    mask_prob=mask_prob,
                    k=k,
                    anchor_p=anchor_p,
                    l0=l0_mean,
                    treated=mean_interval(treated.values()),
                    control=mean_interval(control.values()),
                    diff=paired_interval(treated, control),
                    note=note,
                )
            )
    out.sort(key=lambda c: (c.l0, sort_key(c.k), c.anchor_p))
    return out
