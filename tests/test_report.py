"""The report from hand-written result files: tables (Markdown, CSV, LaTeX), comparisons,
figures, colours and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from masksae.evaluate.report import ablation_table, group_results, write_report
from masksae.evaluate.report.stats import mean_interval
from masksae.evaluate.schema import SCHEMA_NAME, SCHEMA_VERSION, ResultFormatError

ARCH = "matryoshka_batch_topk"
SLUG = f"m-L3-{ARCH}-64"
T2 = 4.302653  # t_{0.975, 2}
T1 = 12.706205  # t_{0.975, 1}


def _doc(
    k,
    p,
    seed,
    ev,
    absorption,
    ce=0.9,
    step=100,
    letters=None,
    n_letters=None,
    l0=None,
    masked=None,
    arch=ARCH,
    words=None,
):
    """A result document of the current schema. ``absorption`` is SAEBench's score (lower is
    better; None for no score), ``letters`` letter -> full absorption rate, ``masked`` a
    dict of core metrics on masked text."""
    metrics = {
        "core": {
            "explained_variance": ev,
            "explained_variance_legacy": ev - 0.01,
            "l0": float(k if l0 is None else l0),
            "frac_dead": 0.0,
            "cosine_similarity": 0.9,
            "downstream": {"ce_loss_recovered": ce, "kl_div_sae": 0.1},
        },
        "absorption": {"mean_full_absorption_score": absorption},
    }
    if masked is not None:
        metrics["core_masked"] = masked
    if n_letters is not None:
        metrics["absorption"]["n_eligible_letters"] = n_letters
    if letters:
        metrics["absorption"]["per_letter"] = {
            ltr: {"full_absorption_rate": r, "n_true_positives": (words or {}).get(ltr, 10)}
            for ltr, r in letters.items()
        }
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "checkpoint": f"/runs/k{k}-p{p}-s{seed}",
        "provenance": {
            "model": "m",
            "layer": 3,
            "architecture": arch,
            "d_sae": 64,
            "k": k,
            "mask_prob": p,
            "seed": seed,
            "step": step,
        },
        "metrics": metrics,
        "timings_s": {"total": 1.0},
    }


def _write(folder: Path, docs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"r{i}.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture()
def results(tmp_path):
    docs = [
        _doc(20, 0.0, 0, 0.70, 0.14, letters={"a": 0.1, "b": 0.3}, words={"a": 52, "b": 17}),
        _doc(20, 0.0, 1, 0.72, 0.12, letters={"a": 0.2, "b": 0.1}, words={"a": 52, "b": 17}),
        _doc(20, 0.3, 0, 0.69, 0.11, letters={"a": 0.0, "b": 0.2}, words={"a": 52, "b": 17}),
        _doc(20, 0.3, 1, 0.70, 0.10, letters={"a": 0.1, "b": 0.2}, words={"a": 52, "b": 17}),
        _doc(40, 0.0, 0, 0.80, 0.08),
        _doc(40, 0.3, 0, 0.79, 0.06),
        _doc(20, 0.5, 0, 0.66, 0.10),
        # an older checkpoint of the first run: superseded by the step-100 one
        _doc(20, 0.0, 0, 0.10, 0.90, step=50),
    ]
    return _write(tmp_path / "eval", docs)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _tidy(md: str) -> list[str]:
    """Table lines without tabulate's padding: "| a | b |"."""
    return ["| " + " | ".join(_cells(ln)) + " |" if ln.startswith("|") else ln
            for ln in md.splitlines()]  # fmt: skip


def _row(md: str, start: str) -> list[str]:
    """The cells of the first table line starting with ``start`` (padding ignored)."""
    return _cells(next(ln for ln in _tidy(md) if ln.startswith(start)))


def _ci(values, digits=2) -> str:
    return mean_interval(values).fmt(digits)


def test_paper_table_means_intervals_and_latest_step(results, tmp_path):
    out = tmp_path / "report"
    md = write_report([results], out).read_text()
    ev = _row(md, "| Explained Variance % (↑) | w/o masking")
    # mean 71 over seeds 0 and 1 (the step-50 checkpoint is ignored), t interval with 1 dof
    half = T1 * math.sqrt(2.0) / math.sqrt(2)
    assert ev[2] == f"71.00 [{71 - half:.2f}, {71 + half:.2f}]" == _ci([70.0, 72.0])
    assert ev[3] == "80.00"  # one seed: the mean alone
    masked = _row(md, "| Explained Variance % (↑) | w/ masking (p=0.3)")
    assert masked[2:] == [_ci([69.0, 70.0]), "79.00"]
    absorb = _row(md, "| Mean Full Absorption, 100·(1 − score) (↑) | w/o masking")
    assert absorb[2] == _ci([86.0, 88.0])  # paper form 100 * (1 - score)
    # p=0.5 was run at k=20 only: an ablation, shown in the ablation table, not in this one
    assert not [
        ln for ln in _tidy(md) if ln.startswith("| Explained Variance % (↑) | w/ masking (p=0.5)")
    ]
    assert _row(md, "| L0 (measured) | w/o masking")[2:] == ["20.0 [20.0, 20.0]", "40.0"]
    assert _row(md, "| CE Loss Recovered % (↑) | w/o masking")[3] == "90.00"
    runs = _row(md, "| Runs (seeds) behind the cell | w/o masking")
    assert runs[2:] == ["2 (seeds 0, 1)", "1 (seed 0)"]
    assert "95% confidence interval" in md and "Student-t, n − 1 degrees of freedom" in md
    # ablation at k=20 over p = 0, 0.3, 0.5; none at k=40 (p = 0, 0.3: the table above)
    assert "#### Mask-probability ablation at k=20" in md
    assert _row(md, "| Explained Variance % (↑) | 71.00")[1:] == [
        _ci([70.0, 72.0]),
        _ci([69.0, 70.0]),
        "66.00",
    ]
    assert _row(md, "| Runs (seeds) behind the cell | 2 (seeds 0, 1) |") == [
        "Runs (seeds) behind the cell",
        "2 (seeds 0, 1)",
        "2 (seeds 0, 1)",
        "1 (seed 0)",
    ]
    assert "Mask-probability ablation at k=40" not in md
    assert "Eligible absorption letters" not in md  # no letter counts in these results
    assert "**Warning:**" not in md
    cells = [c for ln in _tidy(md) if ln.startswith("|") for c in _cells(ln)]
    assert not any(c.endswith("†") for c in cells)  # no measured L0 is far from k


def test_comparisons_at_equal_k_and_equal_l0(results, tmp_path):
    md = write_report([results], tmp_path / "r").read_text()
    assert "#### Masked vs unmasked at equal k (paired by seed)" in md
    # EV at k=20: masked - unmasked per seed: 69-70 = -1, 70-72 = -2 -> mean -1.5
    diff = mean_interval([-1.0, -2.0])
    ev = _row(md, "| Explained Variance % (↑) | w/ p=0.3")
    assert ev[2] == diff.fmt(2, signed=True) and ev[2].startswith("-1.50 [")
    assert ev[3] == "-1.00"  # k=40: one seed pair
    assert _row(md, "| L0 (measured) | w/ p=0.3")[2] == "+0.0 [0.0, 0.0]"
    # absorption in points: (89 - 86) and (90 - 88) -> +2.5
    assert _row(md, "| Mean Full Absorption, 100·(1 − score) (↑) | w/ p=0.3")[2].startswith(
        "+2.50 ["
    )
    # equal L0: L0 = k here, so each point's other method is read at its own point
    assert "#### Masked (p=0.3) vs unmasked at equal measured L0 (paired by seed)" in md
    assert (
        "| Metric | L0 20.0 (w/o, k=20) | L0 20.0 (w/ p=0.3, k=20) |"
        in _tidy(md)[
            _tidy(md).index("#### Masked (p=0.3) vs unmasked at equal measured L0 (paired by seed)")
            + 2
        ]
    )
    sentence = next(ln for ln in md.splitlines() if ln.startswith("- **Explained Variance %**"))
    assert f"changed it by {diff.fmt(2, signed=True)} points at L0 = 20.0" in sentence
    assert "interval includes zero" in sentence


def test_flags_and_the_l0_paragraph(tmp_path):
    docs = []
    for s in range(3):
        docs += [
            _doc(20, 0.0, s, 0.70, 0.14, l0=21.8),
            _doc(40, 0.0, s, 0.80, 0.08, l0=44.5),
            _doc(20, 0.3, s, 0.73, 0.12, l0=31.6, masked={"l0": 20.4, "explained_variance": 0.8}),
            _doc(40, 0.3, s, 0.83, 0.06, l0=62.5, masked={"l0": 41.0, "explained_variance": 0.9}),
        ]
    md = write_report([_write(tmp_path / "e", docs)], tmp_path / "r").read_text()
    assert _row(md, "| L0 (measured) | w/o masking")[2:] == [
        "21.8 [21.8, 21.8]",
        "44.5 [44.5, 44.5]",
    ]
    assert _row(md, "| L0 (measured) | w/ masking (p=0.3)")[2:] == [
        "31.6 [31.6, 31.6] †",
        "62.5 [62.5, 62.5] †",
    ]
    assert _row(md, "| Explained Variance % (↑) | w/ masking (p=0.3)")[2:] == [
        "73.00 [73.00, 73.00] †",
        "83.00 [83.00, 83.00] †",
    ]
    assert _row(md, "| Explained Variance % (↑) | w/o masking")[2] == "70.00 [70.00, 70.00]"
    note = next(ln for ln in md.splitlines() if ln.startswith("† measured L0 differs"))
    assert "k=20 w/ p=0.3: L0 31.6" in note and "k=20 w/o" not in note
    paragraph = next(ln for ln in md.splitlines() if ln.startswith("**Why the masked SAEs"))
    assert (
        "At k=20 the masked SAE (p=0.3) fires 31.6 latents per clean-text token, the "
        "unmasked one 21.8." in paragraph
    )
    assert (
        "w/ masking (p=0.3): 1.56–1.58× k on clean text at k = 20, 40 (the unmasked "
        "SAEs: 1.09–1.11× k), 1.02× k on masked text" in paragraph
    )
    assert "as this explanation predicts" in paragraph
    # the masked k=20 point (L0 31.6) is compared with the unmasked curve at L0 31.6
    header = next(ln for ln in _tidy(md) if ln.startswith("| Metric") and "L0 31.6" in ln)
    cols = _cells(header)
    assert cols == ["Metric", "L0 31.6 (w/ p=0.3, k=20)", "L0 44.5 (w/o, k=40)"]
    lines = _tidy(md)
    line = _row("\n".join(lines[lines.index(header) :]), "| Explained Variance % (↑) |")
    w = math.log(31.6 / 21.8) / math.log(44.5 / 21.8)
    at_31 = 73.0 - (70.0 + w * 10.0)  # unmasked curve 21.8 -> 44.5 read at 31.6
    w = math.log(44.5 / 31.6) / math.log(62.5 / 31.6)
    at_44 = (73.0 + w * 10.0) - 80.0  # masked curve 31.6 -> 62.5 read at 44.5
    assert line[1:] == [f"{d:+.2f} [{d:.2f}, {d:.2f}]" for d in (at_31, at_44)]
    # the points outside the other method's range are named, and the CSV says why
    assert "No comparison at L0 21.8 (w/o, k=20), L0 62.5 (w/ p=0.3, k=40): outside" in md
    csv = pd.read_csv(tmp_path / "r" / "tables" / f"{SLUG}__equal_l0_p0.3.csv")
    out = csv[(csv.metric == "explained_variance") & (csv.l0.round(1) == 62.5)]
    assert out.note.item() == "outside the w/o masking L0 range 21.8–44.5"
    assert math.isnan(out.diff_mean.item()) and out.masked_mean.item() == pytest.approx(83.0)
    # distribution shift: the same SAE on clean vs masked text, paired within the run
    assert "#### Distribution shift cost: clean vs masked text" in md
    shift = [ln for ln in _tidy(md) if ln.startswith("| L0 (measured)") and "| clean |" in ln]
    assert any("w/ masking (p=0.3)" in ln and "31.6 [31.6, 31.6]" in ln for ln in shift)
    diff = _row(md, "| L0 (measured) | w/ masking (p=0.3) | clean − masked")
    assert diff[3:] == ["+11.2 [11.2, 11.2]", "+21.5 [21.5, 21.5]"]


def test_l0_paragraph_without_masked_metrics_says_how_to_test(tmp_path):
    docs = [_doc(20, 0.0, 0, 0.7, 0.1, l0=21.0), _doc(20, 0.3, 0, 0.7, 0.1, l0=30.0)]
    md = write_report([_write(tmp_path / "e", docs)], tmp_path / "r").read_text()
    assert "`masksae evaluate --eval-masked`" in md
    assert "n/a: no result carries metrics on masked text" in md
    docs = [_doc(20, 0.0, 0, 0.7, 0.1), _doc(20, 0.3, 0, 0.7, 0.1)]
    md = write_report([_write(tmp_path / "e2", docs)], tmp_path / "r2").read_text()
    assert "**Why the masked SAEs" not in md  # nothing flagged, nothing to explain


def test_csv_and_latex_tables(results, tmp_path):
    out = tmp_path / "r"
    md = write_report([results], out).read_text()
    paper = pd.read_csv(out / "tables" / f"{SLUG}__paper.csv")
    ev = paper[(paper.metric == "explained_variance") & (paper.k == 20) & (paper.mask_prob == 0)]
    (rec,) = ev.to_dict("records")
    iv = mean_interval([70.0, 72.0])
    assert rec["value_mean"] == pytest.approx(71.0) and rec["value_n"] == 2
    assert (rec["value_ci_low"], rec["value_ci_high"]) == (
        pytest.approx(iv.low),
        pytest.approx(iv.high),
    )
    assert rec["seeds"] == "0 1" and rec["l0_mean"] == pytest.approx(20.0) and not rec["l0_flagged"]
    single = paper[
        (paper.metric == "explained_variance") & (paper.k == 40) & (paper.mask_prob == 0)
    ]
    assert single.value_n.item() == 1 and math.isnan(single.value_ci_low.item())
    eq = pd.read_csv(out / "tables" / f"{SLUG}__equal_k.csv")
    row = eq[(eq.metric == "explained_variance") & (eq.k == 20)].to_dict("records")[0]
    assert row["diff_mean"] == pytest.approx(-1.5) and row["diff_n"] == 2
    assert row["masked_mean"] == pytest.approx(69.5) and row["unmasked_mean"] == pytest.approx(71)
    tex = (out / "tables" / f"{SLUG}__paper.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "\\toprule" in tex
    assert "Explained Variance \\% ($\\uparrow$)" in tex
    assert f"& w/o masking & {iv.fmt(2)} & 80.00 \\\\" in tex
    assert "↑" not in tex and "·" not in tex
    for name in (
        "paper",
        "equal_k",
        "equal_l0_p0.3",
        "equal_l0_p0.5",
        "ablation_k20",
        "absorption_letters_k20",
    ):
        for ext in ("csv", "tex"):
            path = out / "tables" / f"{SLUG}__{name}.{ext}"
            assert path.is_file(), path
            assert f"(tables/{path.name})" in md
    assert not (out / "tables" / f"{SLUG}__ablation_k40.csv").exists()


def test_absorption_per_letter_convention_words_and_missing(results, tmp_path):
    out = tmp_path / "r"
    md = write_report([results], out).read_text()
    letters = pd.read_csv(out / "tables" / f"{SLUG}__absorption_letters_k20.csv")
    a0 = letters[(letters.letter == "a") & (letters.mask_prob == 0)].to_dict("records")[0]
    assert (
        a0["score_mean"] == pytest.approx(85.0) and a0["words_min"] == a0["words_max"] == 52
    )  # 100*(1-0.15)
    assert _row(md, "| a ")[1:] == [
        "52",
        _ci([90.0, 80.0]),
        _ci([100.0, 90.0]),
        "+10.00 [10.00, 10.00]",
    ]
    assert _row(md, "| c ")[1:] == ["n/a", "not eligible", "not eligible", "n/a"]
    png = out / f"absorption_letters_{SLUG}_k20.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / f"absorption_letters_{SLUG}_k40.png").exists()  # no per-letter data


def test_ablation_table_numbers():
    docs = [
        _doc(20, 0.0, 0, 0.72171, 0.13881),
        _doc(20, 0.2, 0, 0.71860, 0.12621),
        _doc(20, 0.3, 0, 0.71270, 0.11525),
        _doc(20, 0.5, 0, 0.69540, 0.10398),
    ]
    cells = next(iter(group_results(docs).values()))
    table = ablation_table(cells, 20).markdown()
    assert _row(table, "| Metric")[1:] == ["p=0", "p=0.2", "p=0.3", "p=0.5"]
    paper_form = [f"{100 * (1 - s):.2f}" for s in (0.13881, 0.12621, 0.11525, 0.10398)]
    assert (
        _row(table, "| Mean Full Absorption")[1:]
        == paper_form
        == ["86.12", "87.38", "88.48", "89.60"]
    )
    assert _row(table, "| Explained Variance % (↑)")[1:] == ["72.17", "71.86", "71.27", "69.54"]
    assert ablation_table(cells, 40) is None


def test_missing_metrics_show_na_and_a_new_row_is_one_entry(tmp_path, monkeypatch):
    from masksae.evaluate.report import rows
    from masksae.evaluate.report.rows import MetricRow, metric_at

    no_abs = _doc(20, 0.0, 0, 0.7, None)
    del no_abs["metrics"]["absorption"]
    docs = [
        no_abs,
        _doc(20, 0.3, 0, 0.7, None, n_letters=12),  # headline score None (< 20 letters)
        _doc(40, 0.0, 0, 0.8, 0.1),
        _doc(40, 0.3, 0, 0.8, None),
    ]
    docs[2]["metrics"]["probing"] = {"top1": 0.75}
    extra = MetricRow("probing", "Sparse probing top-1 %", metric_at("probing", "top1", scale=100),
                      frontier=True)  # fmt: skip
    monkeypatch.setattr(rows, "METRIC_ROWS", (*rows.METRIC_ROWS, extra))
    out = tmp_path / "r"
    md = write_report([_write(tmp_path / "e", docs)], out).read_text()
    absorb = _row(md, "| Mean Full Absorption, 100·(1 − score) (↑) | w/o masking")
    assert absorb[2:] == ["n/a", "90.00"]
    assert _row(md, "| Mean Full Absorption, 100·(1 − score) (↑) | w/ masking")[2:] == [
        "n/a",
        "n/a",
    ]
    assert _row(md, "| Sparse probing top-1 % (↑) | w/o masking")[2:] == ["n/a", "75.00"]
    assert "k=20 w/ p=0.3: 12" in md  # the < 20 letters warning
    assert "CE Loss Recovered" in md and "None" not in md


def test_error_bars_only_where_several_seeds(results, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    calls = []
    real = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        calls.append((list(x), list(y), kwargs.get("xerr"), kwargs.get("yerr")))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    write_report([results], tmp_path / "r")
    # frontier: 3 panels x 2 series (k=20 of p=0 and of p=0.3 have 2 seeds); letters: 2 series
    assert len(calls) == 8
    ev_unmasked = next(c for c in calls if c[1] == [pytest.approx(71.0)])
    iv = mean_interval([70.0, 72.0])
    assert ev_unmasked[0] == [20.0]
    assert ev_unmasked[3][0] == [pytest.approx(iv.mean - iv.low)]  # the 95% interval
    assert ev_unmasked[2] == [[0.0], [0.0]]  # L0 is the same for both seeds

    calls.clear()
    single = _write(
        tmp_path / "single",
        [_doc(20, 0.0, 0, 0.7, 0.1, letters={"a": 0.2}), _doc(40, 0.3, 0, 0.8, 0.1)],
    )
    write_report([single], tmp_path / "r3")
    assert calls == []  # n == 1 everywhere: no error bars at all


def test_colours_are_fixed_per_method_across_reports(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from masksae.evaluate.report.colors import method_color

    seen: list[tuple[str, str]] = []
    real = Axes.plot

    def spy(self, *args, **kwargs):
        if "label" in kwargs and "color" in kwargs:
            seen.append((kwargs["label"], kwargs["color"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    both = [_doc(20, p, 0, 0.7, 0.1, arch=a) for p in (0.0, 0.3) for a in (ARCH, "topk")]
    write_report([_write(tmp_path / "a", both)], tmp_path / "ra")
    first = dict(seen)
    seen.clear()
    only_masked = [_doc(20, 0.3, 0, 0.7, 0.1, arch="topk"), _doc(20, 0.5, 0, 0.7, 0.1)]
    write_report([_write(tmp_path / "b", only_masked)], tmp_path / "rb")
    second = dict(seen)
    label = "topk w/ masking (p=0.3)"
    assert first[label] == second[label] == method_color("topk", 0.3)
    colours = {method_color(a, p) for a in (ARCH, "topk", "relu") for p in (0.0, 0.2, 0.3, 0.5)}
    assert len(colours) == 12  # every method its own colour
    assert method_color("my_new_arch", 0.3) == method_color("my_new_arch", 0.3)


def test_frontier_figure_per_model_layer_with_every_architecture(tmp_path):
    docs = [_doc(k, p, 0, 0.7, 0.1, arch=a) for k in (20, 40) for p in (0.0, 0.3)
            for a in (ARCH, "topk")]  # fmt: skip
    out = tmp_path / "r"
    md = write_report([_write(tmp_path / "e", docs)], out).read_text()
    frontiers = sorted(p.name for p in out.glob("frontier_*.png"))
    assert frontiers == ["frontier_m-L3.png"]
    assert md.count("![frontier](frontier_m-L3.png)") == 1
    assert f"### m layer 3 · {ARCH} · d_sae=64" in md and "### m layer 3 · topk · d_sae=64" in md


def test_report_refuses_non_results(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ResultFormatError, match="not a masksae evaluation result"):
        write_report([bad], tmp_path / "out")


def test_report_cli_prints_its_result_once(results, tmp_path):
    out = tmp_path / "rep"
    exe = Path(sys.executable).with_name("masksae")
    proc = subprocess.run(
        [str(exe), "report", str(results), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [f"wrote {out / 'report.md'}"]
    assert proc.stderr.strip() == ""
    assert (out / "report.md").is_file()


def test_paper_table_methods_and_unusual_results(tmp_path):
    from masksae.evaluate.report.tables import paper_methods

    study = [_doc(k, p, 0, 0.7, 0.1) for k in (20, 40) for p in (0.0, 0.3)]
    study += [_doc(20, 0.2, 0, 0.7, 0.1), _doc(20, 0.5, 0, 0.7, 0.1)]
    assert paper_methods(next(iter(group_results(study).values()))) == [0.0, 0.3]
    partial = [_doc(20, 0.0, 0, 0.7, 0.1), _doc(40, 0.0, 0, 0.7, 0.1), _doc(20, 0.3, 0, 0.7, 0.1)]
    assert paper_methods(next(iter(group_results(partial).values()))) == [0.0, 0.3]

    relu = [
        _doc(None, p, s, 0.7, 0.1, arch="relu", l0=30.0 + s) for p in (0.0, 0.3) for s in (0, 1)
    ]
    no_core = [_doc(20, p, 0, 0.7, 0.1) for p in (0.0, 0.3)]
    for doc in no_core:
        del doc["metrics"]["core"]
    headline_none = _doc(40, 0.0, 0, 0.7, 0.1)  # a score, but the result says no headline
    headline_none["metrics"]["absorption"]["absorption_paper_convention"] = None
    md = write_report([_write(tmp_path / "e", [*relu, *no_core, headline_none])], tmp_path / "r")
    md = md.read_text()
    assert (
        _row(md, "| Runs (seeds) behind the cell | w/o masking | 2 (seeds 0, 1) |")[2]
        == "2 (seeds 0, 1)"
    )
    assert "| Metric | Method | k=? |" in _tidy(md)
    absorb = _row(md, "| Mean Full Absorption, 100·(1 − score) (↑) | w/o masking | 90.00 |")
    assert absorb[2:] == ["90.00", "n/a"]
    assert "L0 (measured) | w/o masking | 20" not in "\n".join(_tidy(md))  # no core: no L0
