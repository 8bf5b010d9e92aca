"""Sweep TOML files: grid expansion, run names, validation; the bundled configs parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from masksae.errors import ConfigError
from masksae.train.config import RunSpec, SweepConfig, TrainConfig, default_lr, load_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_grid_is_crossed_into_named_runs(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(
        "[train]\nsteps = 10\nbatch_size = 64\n"
        '[sae]\narchitecture = "matryoshka_batch_topk"\nd_sae = 4096\n'
        "[grid]\nk = [20, 40]\nseed = [0, 1]\n"
    )
    sweep = load_sweep(p)
    names = [r.name for r in sweep.runs()]
    assert names == [
        "matryoshka_batch_topk-k20-F4096-s0",
        "matryoshka_batch_topk-k20-F4096-s1",
        "matryoshka_batch_topk-k40-F4096-s0",
        "matryoshka_batch_topk-k40-F4096-s1",
    ]
    assert sweep.runs()[1].sae == {"architecture": "matryoshka_batch_topk", "d_sae": 4096, "k": 20}
    assert sweep.runs()[1].seed == 1


def test_lr_and_architecture_grid():
    sweep = SweepConfig(
        train=TrainConfig(),
        sae={"d_sae": 1024, "k": 8},
        grid={"architecture": ["batch_topk", "topk"], "lr": [1e-3, 3e-4]},
    )
    runs = sweep.runs()
    assert [r.name for r in runs][:2] == [
        "batch_topk-k8-F1024-lr0.001-s0",
        "batch_topk-k8-F1024-lr0.0003-s0",
    ]
    assert runs[0].resolved_lr(sweep.train) == 1e-3
    assert "lr" not in runs[0].sae


def test_default_lr_rule():
    assert default_lr(16384) == pytest.approx(2e-4)
    assert default_lr(4096) == pytest.approx(4e-4)
    run = RunSpec("x", {"architecture": "topk", "d_sae": 4096, "k": 4})
    assert run.resolved_lr(TrainConfig()) == pytest.approx(4e-4)
    assert run.resolved_lr(TrainConfig(lr=1e-3)) == 1e-3


def test_unknown_keys_and_tables_refused(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[train]\nstepz = 10\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_sweep(p)
    p.write_text("[trian]\nsteps = 10\n")
    with pytest.raises(ConfigError, match="trian"):
        load_sweep(p)


@pytest.mark.parametrize(
    "bad", [{"batch_size": 0}, {"decay_start_frac": 2.0}, {"lr": -1.0}, {"adam_betas": (0.9, 1.5)}]
)
def test_train_config_validation(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_grid_values_must_be_lists():
    with pytest.raises(ConfigError, match="grid.k"):
        SweepConfig(sae={"architecture": "topk", "d_sae": 8}, grid={"k": 4}).runs()


def test_bundled_configs_parse():
    demo = load_sweep(ROOT / "configs" / "demo-sweep.toml")
    assert [r.sae["k"] for r in demo.runs()] == [20, 40]
    assert demo.train.batch_size == 512
    paper = load_sweep(ROOT / "configs" / "paper-pythia.toml")
    assert [r.sae["k"] for r in paper.runs()] == [20, 40, 80, 160]
    assert paper.train.tokens == 500_000_000 and paper.train.batch_size == 2048
    assert all(r.sae["d_sae"] == 4096 for r in paper.runs())
    assert paper.runs()[0].resolved_lr(paper.train) == pytest.approx(4e-4)
    # Gemma-2-2B layer 12: the same recipe, only the model (hence the store) differs
    gemma = load_sweep(ROOT / "configs" / "paper-gemma.toml")
    assert gemma.train == paper.train and gemma.sae == paper.sae and gemma.grid == paper.grid
    assert "d_in" not in gemma.sae  # taken from the store's d_model (2304)
