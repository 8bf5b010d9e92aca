"""Report statistics: t intervals, paired differences, log-L0 interpolation, equal-L0 and
equal-k comparisons and the L0 flag, against scipy and hand computation."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from masksae.evaluate.report.compare import equal_k, equal_l0
from masksae.evaluate.report.frontier import interpolate_log_l0, l0_flagged
from masksae.evaluate.report.grouping import group_results
from masksae.evaluate.report.rows import row_by_key
from masksae.evaluate.report.stats import mean_interval, paired_interval, t_quantile
from test_report import _doc

EV = row_by_key("explained_variance")


def test_t_interval_matches_scipy_and_a_t_table():
    values = [70.0, 72.0, 74.0, 71.0]
    iv = mean_interval(values)
    sem = scipy_stats.sem(values)
    lo, hi = scipy_stats.t.interval(0.95, df=3, loc=sum(values) / 4, scale=sem)
    assert iv.mean == pytest.approx(71.75)
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    assert iv.n == 4 and iv.sd == pytest.approx(1.707825127659933)
    # by hand at 3 seeds: t_{0.975, 2} = 4.302653 (printed t tables), sd = 2
    iv3 = mean_interval([70.0, 72.0, 74.0])
    half = 4.302653 * 2.0 / math.sqrt(3)
    assert iv3.low == pytest.approx(72.0 - half, abs=1e-5)
    assert iv3.high == pytest.approx(72.0 + half, abs=1e-5)
    assert t_quantile(0.95, 2) == pytest.approx(4.302653, abs=1e-6)
    assert iv3.fmt(2) == f"72.00 [{72 - half:.2f}, {72 + half:.2f}]"


def test_single_value_missing_values_and_formatting():
    one = mean_interval([5.0, None, float("nan")])
    assert (one.mean, one.n, one.low, one.high, one.sd) == (5.0, 1, None, None, None)
    assert one.fmt(1) == "5.0" and one.excludes_zero is None
    assert mean_interval([None, float("nan")]) is None
    assert mean_interval([]) is None
    same = mean_interval([3.0, 3.0])
    assert (same.low, same.high) == (3.0, 3.0)
    assert mean_interval([1.0, 2.0]).fmt(1, signed=True).startswith("+1.5 [")


def test_paired_difference_pairs_by_seed():
    masked = {0: 10.0, 1: 12.0, 2: 14.0, 3: 99.0}  # seed 3 has no unmasked twin
    unmasked = {0: 9.0, 1: 10.0, 2: 11.0, 4: -5.0}  # nor has seed 4 a masked one
    iv = paired_interval(masked, unmasked)
    # differences 1, 2, 3: mean 2, sd 1
    half = 4.302653 / math.sqrt(3)
    assert iv.n == 3 and iv.mean == pytest.approx(2.0)
    assert (iv.low, iv.high) == (pytest.approx(2 - half, abs=1e-5), pytest.approx(2 + half, 1e-5))
    assert iv.excludes_zero is False  # [-0.48, 4.48]
    # same numbers unpaired would give a wider interval: pairing removes the seed effect
    tight = paired_interval({0: 10.0, 1: 12.0, 2: 14.0}, {0: 9.0, 1: 11.0, 2: 13.0})
    assert tight.mean == pytest.approx(1.0) and tight.low == tight.high == pytest.approx(1.0)
    assert tight.excludes_zero is True
    assert paired_interval({0: 1.0}, {1: 1.0}) is None
    assert paired_interval({0: 1.0, 1: None}, {0: 0.5, 1: 2.0}).n == 1


def test_log_l0_interpolation():
    pts = [(40.0, 3.0), (10.0, 1.0)]  # unsorted on purpose
    assert interpolate_log_l0(pts, 20.0) == pytest.approx(2.0)  # log-midpoint of 10 and 40
    w = math.log(30 / 10) / math.log(40 / 10)
    assert interpolate_log_l0(pts, 30.0) == pytest.approx(1.0 + 2.0 * w)
    assert interpolate_log_l0(pts, 10.0) == pytest.approx(1.0)
    assert interpolate_log_l0(pts, 40.0) == pytest.approx(3.0)
    assert interpolate_log_l0(pts, 9.99) is None  # never extrapolated
    assert interpolate_log_l0(pts, 40.5) is None
    assert interpolate_log_l0([(10.0, 1.0)], 10.0) == 1.0
    assert interpolate_log_l0([(10.0, 1.0)], 11.0) is None
    assert interpolate_log_l0([(10.0, 1.0), (10.0, 3.0), (20.0, 4.0)], 10.0) == 2.0
    assert interpolate_log_l0([], 10.0) is None


def test_l0_flag_rule():
    assert l0_flagged(24.1, 20) and l0_flagged(16.6, 20)  # > 1.2x either way
    assert not l0_flagged(24.0, 20) and not l0_flagged(17.0, 20)
    assert l0_flagged(31.6, 20) and not l0_flagged(21.8, 20)  # the demo's numbers
    assert not l0_flagged(None, 20) and not l0_flagged(30.0, None) and not l0_flagged(3.0, 0)


def _frontier_docs():
    """Three seeds; unmasked points at L0 20 and 40, masked at 20*sqrt(2) and 56.

    EV (fractions): unmasked seed s: 0.70+s/100 at L0 20, 0.80+s/100 at L0 40;
    masked seed s: 0.74 + 2s/100 at L0 28.28 (k=20), 0.85 at L0 56 (k=40)."""
    docs = []
    for s in range(3):
        docs += [
            _doc(20, 0.0, s, 0.70 + s / 100, 0.1, l0=20.0),
            _doc(40, 0.0, s, 0.80 + s / 100, 0.1, l0=40.0),
            _doc(20, 0.3, s, 0.74 + 2 * s / 100, 0.1, l0=20 * math.sqrt(2)),
            _doc(40, 0.3, s, 0.85, 0.1, l0=56.0),
        ]
    return next(iter(group_results(docs).values()))


def test_equal_l0_comparison_on_a_known_case():
    cells = _frontier_docs()
    comps = {(c.anchor_p, c.k): c for c in equal_l0(cells, EV, 0.3)}
    assert [round(c.l0, 2) for c in equal_l0(cells, EV, 0.3)] == [20.0, 28.28, 40.0, 56.0]
    # masked k=20 at L0 20*sqrt(2): the log-midpoint of the unmasked curve 20..40, where
    # unmasked EV is 75 + s; masked 74 + 2s -> differences -1, 0, +1
    c = comps[(0.3, 20)]
    assert c.diff.mean == pytest.approx(0.0, abs=1e-9) and c.diff.n == 3
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert c.diff.high == pytest.approx(half, abs=1e-5)
    assert c.treated.mean == pytest.approx(76.0) and c.control.mean == pytest.approx(76.0)
    assert c.note == ""
    # unmasked k=40 at L0 40: masked interpolated between (28.28, 74+2s) and (56, 85)
    w = math.log(40 / (20 * math.sqrt(2))) / math.log(56 / (20 * math.sqrt(2)))
    c = comps[(0.0, 40)]
    masked_at_40 = [74 + 2 * s + w * (85 - 74 - 2 * s) for s in range(3)]
    diffs = [m - (80 + s) for s, m in enumerate(masked_at_40)]
    assert c.diff.mean == pytest.approx(sum(diffs) / 3)
    assert c.diff.n == 3 and c.control.mean == pytest.approx(81.0)
    # outside the other method's range on both ends: no comparison, and the note says why
    assert comps[(0.0, 20)].diff is None
    assert "outside the w/ masking (p=0.3) L0 range 28.3–56.0" in comps[(0.0, 20)].note
    assert comps[(0.3, 40)].diff is None
    assert "outside the w/o masking L0 range 20.0–40.0" in comps[(0.3, 40)].note


def test_equal_k_comparison_and_flags():
    cells = _frontier_docs()
    comps = {c.k: c for c in equal_k(cells, EV, 0.3)}
    # k=20: masked 74+2s vs unmasked 70+s -> differences 4, 5, 6
    assert comps[20].diff.mean == pytest.approx(5.0) and comps[20].diff.n == 3
    assert comps[20].diff.sd == pytest.approx(1.0)
    assert comps[20].flagged  # masked L0 28.3 is 1.41x k
    # k=40: masked 85 vs 80+s -> 5, 4, 3; masked L0 56 = 1.4x k
    assert comps[40].diff.mean == pytest.approx(4.0) and comps[40].flagged
    unpaired = group_results([_doc(20, 0.0, 0, 0.7, 0.1), _doc(20, 0.3, 1, 0.7, 0.1)])
    (c,) = equal_k(next(iter(unpaired.values())), EV, 0.3)
    assert c.diff is None and c.note == "n/a: no seed in common" and not c.flagged
