"""Report tables and figures from hand-written result files."""

from __future__ import annotations

import json
import statistics

import pytest

from masksae.evaluate.report import ablation_table, group_results, write_report
from masksae.evaluate.schema import SCHEMA_NAME, SCHEMA_VERSION, ResultFormatError


def _doc(k, p, seed, ev, absorption, ce=0.9, step=100, letters=None, n_letters=None):
    metrics = {
        "core": {
            "explained_variance": ev,
            "explained_variance_legacy": ev - 0.01,
            "l0": float(k),
            "frac_dead": 0.0,
            "downstream": {"ce_loss_recovered": ce, "kl_div_sae": 0.1},
        },
        "absorption": {"mean_full_absorption_score": absorption},
    }
    if n_letters is not None:
        metrics["absorption"]["n_eligible_letters"] = n_letters
    if letters:
        metrics["absorption"]["per_letter"] = {
            ltr: {"full_absorption_rate": r} for ltr, r in letters.items()
        }
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "checkpoint": f"/runs/k{k}-p{p}-s{seed}",
        "provenance": {
            "model": "m",
            "layer": 3,
            "architecture": "matryoshka_batch_topk",
            "d_sae": 64,
            "k": k,
            "mask_prob": p,
            "seed": seed,
            "step": step,
        },
        "metrics": metrics,
        "timings_s": {"total": 1.0},
    }


@pytest.fixture()
def results(tmp_path):
    docs = [
        _doc(20, 0.0, 0, 0.70, 0.14, letters={"a": 0.1, "b": 0.3}),
        _doc(20, 0.0, 1, 0.72, 0.12, letters={"a": 0.2, "b": 0.1}),
        _doc(20, 0.3, 0, 0.69, 0.11, letters={"a": 0.0, "b": 0.2}),
        _doc(40, 0.0, 0, 0.80, 0.08),
        _doc(40, 0.3, 0, 0.79, 0.06),
        _doc(20, 0.5, 0, 0.66, 0.10),
        # an older checkpoint of the first run: superseded by the step-100 one
        _doc(20, 0.0, 0, 0.10, 0.90, step=50),
    ]
    d = tmp_path / "eval"
    d.mkdir()
    for i, doc in enumerate(docs):
        (d / f"r{i}.json").write_text(json.dumps(doc))
    return d


def _row(md: str, start: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_paper_table_means_std_and_latest_step(results, tmp_path):
    out = tmp_path / "report"
    path = write_report([results], out)
    md = path.read_text()
    assert "| Metric | Method | k=20 | k=40 |" in md
    ev = _row(md, "| Explained Variance % (↑) | w/o masking")
    sd = statistics.stdev([70.0, 72.0])
    assert ev[2] == f"71.000 ± {sd:.3f} (n=2)"
    assert ev[3] == "80.000"
    masked = _row(md, "| Explained Variance % (↑) | w/ masking (p=0.3)")
    assert masked[2:] == ["69.000", "79.000"]
    absorb = _row(md, "| Mean Full Absorption, 100*(1-score) (↑) | w/o masking")
    assert absorb[2] == f"87.000 ± {statistics.stdev([86.0, 88.0]):.3f} (n=2)"
    p5 = _row(md, "| Explained Variance % (↑) | w/ masking (p=0.5)")
    assert p5[2:] == ["66.000", "–"]
    ce = _row(md, "| CE Loss Recovered % (↑) | w/o masking")
    assert ce[3] == "90.000"
    # ablation table at k=20 over p = 0, 0.3, 0.5
    assert "### Mask-probability ablation at k=20" in md
    assert "| Metric | p=0 | p=0.3 | p=0.5 |" in md
    assert "Mask-probability ablation at k=40" in md  # p=0 and 0.3 there
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert any(n.startswith("frontier_") for n in pngs)
    assert any(n.startswith("absorption_letters_") and n.endswith("_k20.png") for n in pngs)
    assert not any(n.endswith("_k40.png") for n in pngs)  # no per-letter data at k=40
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in md


def test_ablation_table_numbers():
    docs = [
        _doc(20, 0.0, 0, 0.72171, 0.13881),
        _doc(20, 0.2, 0, 0.71860, 0.12621),
        _doc(20, 0.3, 0, 0.71270, 0.11525),
        _doc(20, 0.5, 0, 0.69540, 0.10398),
    ]
    cells = next(iter(group_results(docs).values()))
    table = ablation_table(cells, 20)
    assert "| Metric | p=0 | p=0.2 | p=0.3 | p=0.5 |" in table
    assert _row(table, "| Mean Full Absorption")[1:] == ["86.119", "87.379", "88.475", "89.602"]
    assert _row(table, "| Explained Variance % (↑)")[1:] == ["72.171", "71.860", "71.270", "69.540"]
    assert ablation_table(cells, 40) is None


def test_report_refuses_non_results(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ResultFormatError, match="not a masksae evaluation result"):
        write_report([bad], tmp_path / "out")


def test_report_cli(results, tmp_path):
    from typer.testing import CliRunner

    from masksae.cli import app

    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["report", str(results), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.md").is_file()


def test_runs_per_cell_letters_and_warning(results, tmp_path):
    md = write_report([results], tmp_path / "r").read_text()
    runs = _row(md, "| Runs (seeds) behind the cell | w/o masking")
    assert runs[2:] == ["2 (seeds 0, 1)", "1 (seed 0)"]
    assert _row(md, "| Runs (seeds) behind the cell | w/ masking (p=0.5)")[2:] == [
        "1 (seed 0)",
        "–",
    ]
    # the ablation tables carry the counts too
    assert "| Runs (seeds) behind the cell | 2 (seeds 0, 1) | 1 (seed 0) | 1 (seed 0) |" in md
    assert "Eligible absorption letters" not in md  # no letter counts in these results
    assert "**Warning:**" not in md

    docs = [
        _doc(20, 0.0, 0, 0.7, 0.1, n_letters=17),
        _doc(20, 0.0, 1, 0.7, 0.1, n_letters=21),
        _doc(20, 0.3, 0, 0.7, 0.1, n_letters=24),
    ]
    d = tmp_path / "few"
    d.mkdir()
    for i, doc in enumerate(docs):
        (d / f"r{i}.json").write_text(json.dumps(doc))
    md = write_report([d], tmp_path / "r2").read_text()
    assert _row(md, "| Eligible absorption letters")[2:] == ["19.0 ± 2.8 (n=2)"]
    assert _row(md, "| Eligible absorption letters (of 26; SAEBench needs 20) | w/ masking")[
        2:
    ] == ["24.0"]
    warnings = [ln for ln in md.splitlines() if "**Warning:**" in ln]
    assert len(warnings) == 1
    assert "1 cell(s) - k=20 w/o masking: 17." in warnings[0]  # the smallest count of the cell
    assert "p=0.3" not in warnings[0]


def test_error_bars_only_where_several_seeds(results, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    calls = []
    real = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        calls.append((list(x), kwargs.get("xerr"), kwargs.get("yerr")))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    write_report([results], tmp_path / "r")
    # frontier: only the (k=20, p=0) point has 2 seeds; letters: only p=0 at k=20 has 2 seeds
    assert len(calls) == 2
    frontier, letters = calls
    assert frontier[0] == [20.0] and frontier[2] == [pytest.approx(statistics.stdev([70, 72]))]
    assert len(letters[0]) == 2  # letters a and b of the p=0 series
    assert letters[2] == [
        pytest.approx(statistics.stdev([0.1, 0.2])),
        pytest.approx(statistics.stdev([0.3, 0.1])),
    ]

    calls.clear()
    single = tmp_path / "single"
    single.mkdir()
    (single / "a.json").write_text(json.dumps(_doc(20, 0.0, 0, 0.7, 0.1, letters={"a": 0.2})))
    (single / "b.json").write_text(json.dumps(_doc(40, 0.3, 0, 0.8, 0.1, letters={"a": 0.1})))
    write_report([single], tmp_path / "r3")
    assert calls == []  # n == 1 everywhere: no error bars at all
