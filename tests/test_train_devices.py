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


def test_two_devices_give_the_single_device_sweep(store, tmp_path, monkeypatch):
    Trainer(store, RUNS, cfg(device="cpu"), tmp_path / "one", progress=False).train()

    drawn: list[int] = []
    stream = store.stream

    def counting_stream(*args, **kwargs):
        for batch in stream(*args, **kwargs):
            drawn.append(batch.shape[0])
            yield batch

    monkeypatch.setattr(store, "stream", counting_stream)
    trainer = Trainer(store, RUNS, cfg(devices=["cpu", "cpu"]), tmp_path / "two", progress=False)
    assert [trainer.run_device(i) for i in range(3)] == [torch.device("cpu")] * 3
    trainer.train()
    assert len(drawn) == 12  # each batch read once for the three runs
    assert_same_runs(tmp_path / "one", tmp_path / "two", ["a", "b", "c"])


def test_round_robin_placement(store, tmp_path):
    trainer = Trainer(store, RUNS, cfg(devices=["cpu", "meta", "cpu"]), tmp_path / "x")
    assert [str(trainer.run_device(i)) for i in range(5)] == ["cpu", "meta", "cpu", "cpu", "meta"]


def test_devices_config_validation(store, tmp_path):
    with pytest.raises(ConfigError, match="devices"):
        TrainConfig(devices=[])
    with pytest.raises(ConfigError, match="both set"):
        TrainConfig(device="cpu", devices=["cpu"])
    assert TrainConfig(devices=[" cpu", "cpu "]).devices == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="unknown device"):
        Trainer(store, RUNS, cfg(devices=["cpu", "gpu7"]), tmp_path / "o")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Trainer(store, RUNS, cfg(devices=["cpu", "cuda:1"]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_devices_may_change_on_resume(store, tmp_path):
    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 7:
            raise Stop

    with pytest.raises(Stop):
        Trainer(
            store, RUNS[:2], cfg(device="cpu"), tmp_path / "o", progress=False, on_step=stop
        ).train()
    Trainer(
        store, RUNS[:2], cfg(devices=["cpu", "cpu"]), tmp_path / "o", resume=True, progress=False
    ).train()
    Trainer(store, RUNS[:2], cfg(device="cpu"), tmp_path / "ref", progress=False).train()
    assert_same_runs(tmp_path / "ref", tmp_path / "o", ["a", "b"])


def test_devices_cli(store, tmp_path):
    from masksae.cli import app

    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        '[train]\nsteps = 6\nbatch_size = 128\nwarmup_steps = 2\nlog_every = 3\ndevice = "cpu"\n'
        '[sae]\narchitecture = "batch_topk"\nd_sae = 32\nthreshold_start_step = 2\n'
        "[grid]\nk = [2, 4]\n"
    )
    base = ["train", "--store", str(store.path), "--config", str(sweep), "--no-progress"]
    runner = CliRunner()
    one = runner.invoke(app, [*base, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    # --devices replaces the file's device
    two = runner.invoke(app, [*base, "--out", str(tmp_path / "two"), "--devices", "cpu, cpu"])
    assert two.exit_code == 0, two.output
    assert_same_runs(
        tmp_path / "one", tmp_path / "two", ["batch_topk-k2-F32-s0", "batch_topk-k4-F32-s0"]
    )
    both = runner.invoke(
        app, [*base, "--out", str(tmp_path / "x"), "--devices", "cpu", "--device", "cpu"]
    )
    assert both.exit_code == 2 and "cannot be combined" in both.output
    empty = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--devices", "cpu,,cpu"])
    assert empty.exit_code == 2 and "comma-separated" in empty.output
    assert not (tmp_path / "x").exists()


def force_two_workers(monkeypatch):
    """Split CPU runs over two worker threads, as two devices would be (test only: one
    worker per device is the invariant that lets CPU runs swap the CPU RNG safely)."""
    from masksae.train import trainer

    monkeypatch.setattr(trainer.Trainer, "device_groups", lambda self, runs: [[0, 2], [1]])
    monkeypatch.setattr(trainer._Run, "_swaps_cpu_rng", lambda self: False)


def test_worker_threads_give_the_sequential_sweep(store, tmp_path, monkeypatch):
    import threading

    from masksae.train import trainer

    Trainer(store, RUNS, cfg(device="cpu"), tmp_path / "seq", progress=False).train()
    force_two_workers(monkeypatch)
    threads: dict[tuple[str, int], str] = {}
    step = trainer._Run.step

    def recording_step(self, x, n, *args, **kwargs):
        threads[self.spec.name, n] = threading.current_thread().name
        return step(self, x, n, *args, **kwargs)

    monkeypatch.setattr(trainer._Run, "step", recording_step)
    before = threading.active_count()
    Trainer(store, RUNS, cfg(devices=["cpu", "cpu"]), tmp_path / "par", progress=False).train()
    assert all(name.startswith("masksae-dev") for name in threads.values())
    assert len(set(threads.values())) == 2  # a worker per device group
    assert all(threads["a", n] == threads["c", n] for n in range(12))  # a group: in order
    assert threading.active_count() == before  # the workers are gone
    assert_same_runs(tmp_path / "seq", tmp_path / "par", ["a", "b", "c"])


def test_worker_error_stops_the_sweep(store, tmp_path, monkeypatch):
    from masksae.train import trainer

    force_two_workers(monkeypatch)
    step = trainer._Run.step

    def failing_step(self, x, n, *args, **kwargs):
        if self.spec.name == "b" and n == 5:
            raise trainer.TrainingDivergedError("run b: the loss became nan at step 5")
        return step(self, x, n, *args, **kwargs)

    monkeypatch.setattr(trainer._Run, "step", failing_step)
    with pytest.raises(trainer.TrainingDivergedError, match="run b"):
        Trainer(store, RUNS, cfg(devices=["cpu", "cpu"]), tmp_path / "o", progress=False).train()
    for name in ("a", "b", "c"):  # the step-6 checkpoint was never reached
        assert not (tmp_path / "o" / name / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_in_one_sweep_agree(store, tmp_path):
    Trainer(store, RUNS, cfg(device="cpu"), tmp_path / "cpu", progress=False).train()
    Trainer(store, RUNS, cfg(devices=["cuda:0", "cpu"]), tmp_path / "mix", progress=False).train()
    for name in ("a", "b", "c"):
        wa = load_file(str(tmp_path / "cpu" / name / "sae.safetensors"))
        wb = load_file(str(tmp_path / "mix" / name / "sae.safetensors"))
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-4)
