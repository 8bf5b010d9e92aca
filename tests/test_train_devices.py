"""Sweeps spread over several devices (``TrainConfig.devices`` / ``--devices``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from masksae.errors import ConfigError
from masksae.train.config import RunSpec, TrainConfig
from masksae.train.metrics_log import read_metrics
from masksae.train.trainer import Trainer
from test_train_fixtures import make_store

SAE = {"architecture": "batch_topk", "d_sae": 64, "k": 3, "threshold_start_step": 4}
MATRYOSHKA = {
    "architecture": "matryoshka_batch_topk",
    "d_sae": 64,
    "k": 3,
    "group_fractions": [0.25, 0.75],
    "threshold_start_step": 4,
}
RUNS = [
    RunSpec("a", SAE, None, 0),
    RunSpec("b", MATRYOSHKA, None, 1),
    RunSpec("c", {**SAE, "k": 5}, 1e-3, 2),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("dev-store") / "store", n_tokens=2048)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=128, warmup_steps=2, log_every=4, checkpoint_every=6, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def assert_same_runs(a: Path, b: Path, names) -> None:
    for name in names:
        wa, wb = (
            load_file(str(a / name / "sae.safetensors")),
            load_file(str(b / name / "sae.safetensors")),
        )
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}.{key}"
        assert _no_timing(read_metrics(a / name)) == _no_timing(read_metrics(b / name))


def _no_timing(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "data_wait_frac")} for r in records
    ]


def test_devices_config_validation(store, tmp_path):
    with pytest.raises(ConfigError, match="devices"):
        TrainConfig(devices=[])
    with pytest.raises(ConfigError, match="both set"):
        TrainConfig(device="cpu", devices=["cpu"])
    assert TrainConfig(devices=[" cpu", "cpu "]).devices == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="distributed = 'both' is invalid"):
        TrainConfig(distributed="both")
    with pytest.raises(ConfigError, match="cache size '20 parsecs'"):
        TrainConfig(cache_size="20 parsecs")
    # a Trainer is one rank: several devices are spawned as ranks by train_sweep
    with pytest.raises(ConfigError, match="spawned as ranks"):
        Trainer(store, RUNS, cfg(devices=["cpu", "cpu"]), tmp_path / "o")
    with pytest.raises(ConfigError, match="unknown device"):
        Trainer(store, RUNS, cfg(devices=["gpu7"]), tmp_path / "o")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Trainer(store, RUNS, cfg(devices=["cuda:1"]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_devices_cli_resumes_a_sweep_over_two_ranks(store, tmp_path):
    """--devices cpu,cpu spawns two ranks (the torchrun code path); each trains its share of
    the sweep from its own checkpoint, reading the same stream: the weights equal an
    uninterrupted single-process sweep, bit for bit."""
    from masksae.cli import app
    from masksae.train.config import load_sweep
    from masksae.train.trainer import Trainer

    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        "[train]\nsteps = 12\nbatch_size = 128\nwarmup_steps = 2\nlog_every = 3\n"
        'checkpoint_every = 6\ndevice = "cpu"\n'
        '[sae]\narchitecture = "batch_topk"\nd_sae = 32\nthreshold_start_step = 2\n'
        "[grid]\nk = [2, 4, 6]\n"
    )
    names = ["batch_topk-k2-F32-s0", "batch_topk-k4-F32-s0", "batch_topk-k6-F32-s0"]
    cfg_file = load_sweep(sweep)
    Trainer(store, cfg_file.runs(), cfg_file.train, tmp_path / "ref", progress=False).train()

    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 8:
            raise Stop

    with pytest.raises(Stop):  # killed after step 8: the step-6 checkpoints remain
        Trainer(
            store, cfg_file.runs(), cfg_file.train, tmp_path / "two", progress=False, on_step=stop
        ).train()
    base = ["train", "--store", str(store.path), "--config", str(sweep), "--no-progress"]
    runner = CliRunner()
    # --devices replaces the file's device; the runs spread over the ranks (0, 2 | 1)
    two = runner.invoke(
        app, [*base, "--out", str(tmp_path / "two"), "--devices", "cpu, cpu", "--resume"]
    )
    assert two.exit_code == 0, two.output
    assert all(name in two.output for name in names)  # rank 0 prints every run
    assert_same_runs(tmp_path / "ref", tmp_path / "two", names)
    both = runner.invoke(
        app, [*base, "--out", str(tmp_path / "x"), "--devices", "cpu", "--device", "cpu"]
    )
    assert both.exit_code == 2 and "cannot be combined" in both.output
    empty = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--devices", "cpu,,cpu"])
    assert empty.exit_code == 2 and "comma-separated" in empty.output
    assert not (tmp_path / "x").exists()


def test_distribution_modes():
    from masksae.distributed import DistContext
    from masksae.train.trainer import distribution_mode

    one, two = DistContext(), DistContext(rank=1, world=2)
    assert distribution_mode(cfg(), 3, one) == "single"
    assert distribution_mode(cfg(), 3, two) == "runs"
    assert distribution_mode(cfg(), 1, two) == "data"
    assert distribution_mode(cfg(distributed="data"), 3, two) == "data"
    with pytest.raises(ConfigError, match="does not divide over 2 ranks"):
        distribution_mode(cfg(batch_size=127, distributed="data"), 3, two)
