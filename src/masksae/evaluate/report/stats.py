"""Means over seeds with 95% Student-t intervals, and paired differences.

With the few seeds a study affords (typically 3), a bootstrap interval is degenerate (it can
take only a handful of values and under-covers), so every interval here is the Student-t
interval with n - 1 degrees of freedom: mean ± t_{0.975, n-1} · s / sqrt(n), s the sample
standard deviation. A paired difference is the same interval over the per-seed differences
(masked minus unmasked, paired by training seed), which removes the seed-to-seed variation
the two runs of a seed share.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

CONFIDENCE = 0.95
"""Coverage of every interval in the report."""

INTERVAL_METHOD = "Student-t, n − 1 degrees of freedom"
"""How the intervals are computed, as the report states it."""


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t critical value: P(|T_dof| <= q) = confidence."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2.0, dof))


@dataclass(frozen=True)
class Interval:
    """A mean over n values with its confidence interval (none for n = 1)."""

    mean: float
    """Mean of the values."""
    low: float | None
    """Lower end of the interval; None when n = 1 (no spread to estimate)."""
    high: float | None
    """Upper end of the interval; None when n = 1."""
    n: int
    """Number of values (seeds, or seed pairs for a difference)."""
    sd: float | None
    """Sample standard deviation (n - 1 denominator); None when n = 1."""

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def excludes_zero(self) -> bool | None:
        """Whether the interval lies wholly on one side of 0 (None without an interval)."""
        if not self.has_interval:
            return None
        return self.low > 0 or self.high < 0  # type: ignore[operator]

    def fmt(self, digits: int = 2, signed: bool = False) -> str:
        """ "71.00 [65.21, 76.79]"; "71.00" for n = 1; signed: "+1.20 [-0.50, 2.90]"."""
        sign = "+" if signed else ""
        text = f"{self.mean:{sign}.{digits}f}"
        if self.has_interval:
            text += f" [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        return text


def finite_values(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers (None and NaN dropped)."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def mean_interval(
    values: Iterable[float | None], confidence: float = CONFIDENCE
) -> Interval | None:
    """Mean of ``values`` (None/NaN dropped) with its Student-t interval; None if empty."""
    vals = finite_values(values)
    if not vals:
        return None
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return Interval(mean, None, None, 1, None)
    sd = statistics.stdev(vals)
    half = t_quantile(confidence, len(vals) - 1) * sd / math.sqrt(len(vals))
    return Interval(mean, mean - half, mean + half, len(vals), sd)


def paired_differences(
    treated: Mapping[Hashable, float | None], control: Mapping[Hashable, float | None]
) -> dict[Hashable, float]:
    """treated[s] - control[s] for every seed s where both are numbers."""
    both = finite_keys(treated) & finite_keys(control)
    return {s: float(treated[s]) - float(control[s]) for s in both}  # type: ignore[arg-type]


def finite_keys(values: Mapping[Hashable, float | None]) -> set[Hashable]:
    return {s for s, v in values.items() if v is not None and not math.isnan(v)}


def paired_interval(
    treated: Mapping[Hashable, float | None],
    control: Mapping[Hashable, float | None],
    confidence: float = CONFIDENCE,
) -> Interval | None:
    """Mean paired difference treated - control over common seeds, with its t interval."""
    return mean_interval(paired_differences(treated, control).values(), confidence)
