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


# ---------------------------------------------------------------------------- disk full, read-only
def train_args(store, out, *extra: str) -> list[str]:
    return [
        "train", "--store", str(store.path), "--out", str(out), "--architecture", "topk",
        "--k", "2", "--d-sae", "32", "--steps", "12", "--batch-size", "128",
        "--checkpoint-every", "4", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def test_full_disk_while_checkpointing_is_one_clear_line_and_resumable(
    store, tmp_path, monkeypatch
):
    import torch

    from masksae.cli import app

    real_save = torch.save

    def full_disk_at_step_8(obj, f, *args, **kwargs):
        if "step-000000008" in str(f):  # what torch's zip writer says on a short write
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 4672 vs 4560"
            )
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_disk_at_step_8)
    res = CliRunner().invoke(app, train_args(store, out))
    assert res.exit_code == 2 and "Traceback" not in res.output
    message = res.output.strip().splitlines()[-1]
    assert "writing the checkpoint of step 8" in message and "no space left on device" in message
    assert "MiB free on" in message
    assert "the last complete checkpoint (step 4) is intact" in message and "--resume" in message
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-000000004"]  # no half-written step 8 left behind
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    res = CliRunner().invoke(app, train_args(store, out, "--resume"))
    assert res.exit_code == 0, res.output
    steps = [r["step"] for r in read_metrics(run)]
    assert steps[-1] == 12 and steps == sorted(set(steps))
    assert (run / "sae.safetensors").is_file()


def refuse_writes_under(monkeypatch, root):
    """Path.mkdir under ``root`` fails as on a read-only file system (tests run as root,
    for whom permission bits do not stop writes)."""
    import errno
    from pathlib import Path

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_read_only_out_is_one_clear_line_in_train(store, tmp_path, monkeypatch):
    from masksae.cli import app

    refuse_writes_under(monkeypatch, tmp_path / "ro")
    res = CliRunner().invoke(app, train_args(store, tmp_path / "ro" / "run"))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "cannot write the output folder" in res.output
    assert "Read-only file system: choose a writable --out" in res.output


@pytest.fixture(scope="module")
def trained_run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    Trainer(store, [RunSpec("a", SAE)], cfg(checkpoint_every=0), out, progress=False).train()
    return out / "a"


@pytest.mark.parametrize("fmt", ["saelens", "dictionary_learning"])
def test_read_only_out_is_one_clear_line_in_export(trained_run, tmp_path, monkeypatch, fmt):
    from masksae.cli import app

    refuse_writes_under(monkeypatch, tmp_path / "ro")
    res = CliRunner().invoke(
        app, ["export", str(trained_run), "--format", fmt, "--out", str(tmp_path / "ro" / "x")]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"cannot write the {fmt} export to" in res.output
    assert "Read-only file system" in res.output


# ---------------------------------------------------------------------------- damaged weights
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_file_is_named_in_export_and_evaluate(
    trained_run, tmp_path, damage, tiny_model_dir
):
    import shutil

    from masksae.cli import app

    run = tmp_path / "a"
    shutil.copytree(trained_run, run)
    weights = run / "sae.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 3] if damage == "truncated" else b"\x93garbage" * 64)
    res = CliRunner().invoke(
        app, ["export", str(run), "--format", "saelens", "--out", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"{weights} cannot be read" in res.output and "truncated or damaged" in res.output
    res = CliRunner().invoke(
        app,
        ["evaluate", "--checkpoints", str(run), "--metrics", "reconstruction",
         "--model", str(tiny_model_dir), "--out", str(tmp_path / "e"), "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"{weights} cannot be read" in res.output


# ---------------------------------------------------------------------------- damaged values
def plant_row(store_path, chunk: int, row: int, value: float) -> None:
    """Overwrite one activation row of an uncompressed float32 shard in place (the shard
    index and size stay valid: damage only a checksum finds)."""
    import numpy as np

    from masksae.storage import ActivationStore, fastread

    store = ActivationStore.open(store_path)
    assert store.spec.compression == "none" and store.spec.dtype == "float32"
    shard = store_path / "activations" / "c" / str(chunk) / "0"
    inner = fastread.plain_shard_rows(store_path / "activations")
    n_inner = -(-store.spec.chunk_tokens // inner)
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(raw[-(n_inner * 16 + 4) : -4]), "<u8").reshape(n_inner, 2)
    row_bytes = 4 * store.d_model
    start = int(index[row // inner, 0]) + (row % inner) * row_bytes
    raw[start : start + row_bytes] = np.full(store.d_model, value, np.float32).tobytes()
    shard.write_bytes(bytes(raw))


def test_overflowing_garbage_values_name_the_chunk_not_the_lr(tmp_path):
    from masksae.cli import app

    make_store(tmp_path / "s", n_tokens=2048, chunk_tokens=512)
    plant_row(tmp_path / "s", chunk=2, row=5, value=3e25)  # finite, but x^2 overflows
    res = CliRunner().invoke(
        app,
        ["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"),
         "--architecture", "topk", "--k", "2", "--d-sae", "32", "--steps", "16",
         "--batch-size", "128", "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "holds non-finite activations: chunk(s) [2] of the store hold them" in res.output
    assert "masksae store verify" in res.output and "lower the lr" not in res.output


def test_divergence_on_absurd_rows_names_the_chunk(tmp_path, monkeypatch):
    from masksae.errors import MasksaeError, StoreError
    from masksae.train import trainer as trainer_module

    make_store(tmp_path / "s", n_tokens=2048, chunk_tokens=512)
    plant_row(tmp_path / "s", chunk=1, row=7, value=1e11)  # finite squares, absurd norm
    from masksae.storage import ActivationStore

    store = ActivationStore.open(tmp_path / "s")
    real_step = trainer_module._Run.step

    def diverge_on_huge_rows(self, x_BD, step, total, *, want_metrics):
        if float(x_BD.norm(dim=-1).max()) > 1e9 or step == 20:
            raise trainer_module.TrainingDivergedError(
                f"run {self.spec.name}: the loss became inf at step {step} (the input batch "
                "was finite): lower the lr"
            )
        return real_step(self, x_BD, step, total, want_metrics=want_metrics)

    monkeypatch.setattr(trainer_module._Run, "step", diverge_on_huge_rows)
    config = cfg(steps=24, normalize_activations=False)
    with pytest.raises(StoreError) as info:
        Trainer(store, [RunSpec("a", SAE)], config, tmp_path / "o", progress=False).train()
    message = str(info.value)
    assert "chunk(s) [1] hold such rows" in message and "the data, not the lr" in message
    assert f"x the store's mean norm {store.stats.mean_norm:.3g}" in message
    # a divergence on ordinary data keeps its own advice
    good = make_store(tmp_path / "good", n_tokens=2048, chunk_tokens=512)
    with pytest.raises(MasksaeError, match="lower the lr") as info:
        Trainer(good, [RunSpec("a", SAE)], config, tmp_path / "o2", progress=False).train()
    assert not isinstance(info.value, StoreError)
