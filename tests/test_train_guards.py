"""Training refusals and failures with a clear one-line error: a second process training into
the same folder, unwritable or full output folders, damaged weight files, bad flags."""

from __future__ import annotations

import fcntl
import os

import pytest
from typer.testing import CliRunner

from masksae.errors import CheckpointError
from masksae.train.config import RunSpec, TrainConfig
from masksae.train.metrics_log import read_metrics
from masksae.train.trainer import LOCK_FILE, Trainer
from test_train_fixtures import make_store

pytestmark = pytest.mark.usefixtures("one_thread")

SAE = {"architecture": "topk", "d_sae": 32, "k": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("guards") / "store", n_tokens=2048)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=128, warmup_steps=1, log_every=1, device="cpu", lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------- folder lock
def test_second_trainer_into_the_same_folder_is_refused(store, tmp_path):
    out = tmp_path / "run"
    refused: list[str] = []

    def start_another(step: int) -> None:
        if step == 2:  # the first run holds the folder now
            for resume in (False, True):
                with pytest.raises(CheckpointError) as info:
                    Trainer(store, [RunSpec("a", SAE)], cfg(), out, resume=resume).train()
                refused.append(str(info.value))

    Trainer(store, [RunSpec("a", SAE)], cfg(), out, progress=False, on_step=start_another).train()
    assert len(refused) == 2
    for message in refused:
        assert f"is being trained into by pid {os.getpid()}" in message and "--resume" in message
    # the first run was not disturbed: every step logged exactly once
    assert [r["step"] for r in read_metrics(out / "a")] == [1, 2, 3, 4, 5, 6]
    # and the folder is free again once it finished
    Trainer(store, [RunSpec("a", SAE)], cfg(), out, resume=True, progress=False).train()


def test_folder_held_by_another_process_is_refused_by_the_cli(store, tmp_path):
    from masksae.cli import app

    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_FILE, "a+") as held:  # what a running `masksae train` holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 424242\n")
        held.flush()
        res = CliRunner().invoke(
            app,
            ["train", "--store", str(store.path), "--out", str(out), "--architecture", "topk",
             "--k", "2", "--d-sae", "32", "--steps", "2", "--batch-size", "128",
             "--device", "cpu", "--no-progress"],
        )  # fmt: skip
    assert res.exit_code == 2
    assert "being trained into by pid 424242" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written


def test_refused_start_leaves_no_folder_behind(store, tmp_path):
    with pytest.raises(CheckpointError, match="drop --resume"):
        Trainer(store, [RunSpec("a", SAE)], cfg(), tmp_path / "new", resume=True).train()
    assert not (tmp_path / "new").exists()
