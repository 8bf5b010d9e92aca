"""The sweep trainer: one pass for many SAEs, resume, normalisation folding, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from masksae.errors import CheckpointError, ConfigError, StoreError
from masksae.train.checkpoint import load_sae
from masksae.train.config import RunSpec, TrainConfig
from masksae.train.metrics_log import read_metrics
from masksae.train.trainer import Trainer
from test_train_fixtures import make_store

MATRYOSHKA = {
    "architecture": "matryoshka_batch_topk",
    "d_sae": 64,
    "k": 3,
    "group_fractions": [0.25, 0.25, 0.5],
    "threshold_start_step": 10,
    "dead_tokens_threshold": 2048,
}
BATCH_TOPK = {
    "architecture": "batch_topk",
    "d_sae": 64,
    "k": 3,
    "threshold_start_step": 10,
    "dead_tokens_threshold": 2048,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("train-store") / "store", n_tokens=4096)


def cfg(**kw) -> TrainConfig:
    base = dict(
        steps=24,
        batch_size=128,
        warmup_steps=4,
        checkpoint_every=8,
        log_every=4,
        device="cpu",
        lr=3e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sae.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_sweep_in_one_pass_equals_separate_runs(store, tmp_path):
    runs = [
        RunSpec("m", MATRYOSHKA, None, 0),
        RunSpec("b", BATCH_TOPK, None, 1),
        RunSpec("b2", BATCH_TOPK, 1e-3, 2),
    ]
    Trainer(store, runs, cfg(), tmp_path / "sweep", progress=False).train()
    for run in runs:
        Trainer(store, [run], cfg(), tmp_path / f"solo-{run.name}", progress=False).train()
        assert_same_weights(tmp_path / "sweep" / run.name, tmp_path / f"solo-{run.name}" / run.name)
    # different seeds/lrs really gave different SAEs
    assert not torch.equal(
        weights(tmp_path / "sweep" / "b")["W_enc"], weights(tmp_path / "sweep" / "b2")["W_enc"]
    )


def test_training_learns_and_batch_topk_l0_is_exactly_k(store, tmp_path):
    # a fast threshold EMA so 50 updates reach the steady state (reference: 0.999)
    run = RunSpec("b", {**BATCH_TOPK, "threshold_beta": 0.9}, None, 0)
    summary = Trainer(
        store, [run], cfg(steps=60, checkpoint_every=0), tmp_path / "o", progress=False
    ).train()
    records = read_metrics(tmp_path / "o" / "b")
    assert [r["step"] for r in records] == list(range(4, 61, 4))
    assert all(r["l0"] == 3.0 for r in records)  # batch top-k: k * B entries per batch
    assert records[-1]["fvu"] < 0.5 * records[0]["fvu"]
    assert records[-1]["fvu"] < 0.6
    assert 0 <= summary.data_wait_frac < 1
    assert all(0 <= r["data_wait_frac"] <= 1 and r["tokens_per_s"] > 0 for r in records)
    sae, meta = load_sae(tmp_path / "o" / "b")
    # decoder rows stay unit norm (renormalised after every step; folding keeps W_dec)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert meta["step"] == 60 and meta["tokens"] == 60 * 128 and meta["complete"]
    assert meta["store"]["mask_prob"] == 0.3 and meta["store_fingerprint"] == store.fingerprint
    assert meta["train"]["lr"] == 3e-3 and meta["sae"]["d_in"] == store.d_model
    assert float(sae.threshold) > 0
    # the inference rule (threshold) gives an L0 near k on store data
    x = torch.from_numpy(store.read(0, 1024).activations)
    l0 = (sae.encode(x) != 0).float().sum(-1).mean()
    assert 1.5 < float(l0) < 6
    # periodic checkpoints are removed once the run completes
    assert not (tmp_path / "o" / "b" / "checkpoints").exists()


def test_normalisation_is_folded_into_saved_weights(store, tmp_path):
    run = RunSpec("m", MATRYOSHKA, None, 0)
    Trainer(store, [run], cfg(steps=16), tmp_path / "o", progress=False).train()
    saved, meta = load_sae(tmp_path / "o" / "m")
    s = meta["normalization_scale"]
    assert s == pytest.approx(store.norm_scale()) and s != 1.0
    # the training-space weights (train_state.pt) act on s * x
    state = torch.load(tmp_path / "o" / "m" / "train_state.pt", weights_only=False)
    trained, _ = load_sae(tmp_path / "o" / "m")
    trained.load_state_dict(state["model"])
    x = torch.from_numpy(store.read(0, 512).activations)
    with torch.no_grad():
        torch.testing.assert_close(saved(x), trained(s * x) / s, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(saved.encode(x), trained.encode(s * x) / s, rtol=1e-4, atol=1e-4)


def test_unit_normalisation_target_matches_dictionary_learning(store, tmp_path):
    """normalize_target = "unit": E||s x||^2 = 1 (dictionary_learning's get_norm_factor is
    sqrt(mean squared norm), activations divided by it), still folded back at save."""
    run = RunSpec("m", MATRYOSHKA, None, 0)
    Trainer(
        store, [run], cfg(steps=4, normalize_target="unit"), tmp_path / "o", progress=False
    ).train()
    saved, meta = load_sae(tmp_path / "o" / "m")
    x = torch.from_numpy(store.read(0, store.n_tokens).activations).double()
    by_hand = 1.0 / float(x.pow(2).sum(-1).mean().sqrt())
    assert meta["normalization_scale"] == pytest.approx(by_hand, rel=1e-3)
    assert meta["normalization_scale"] == pytest.approx(store.norm_scale() / store.d_model**0.5)
    with pytest.raises(ConfigError, match="normalize_target"):
        cfg(normalize_target="sqrt")


class Crash(Exception):
    pass


def test_resume_after_crash_is_bit_exact(store, tmp_path):
    runs = [RunSpec("m", MATRYOSHKA, None, 0), RunSpec("b", BATCH_TOPK, None, 1)]
    Trainer(store, runs, cfg(), tmp_path / "full", progress=False).train()

    def crash_at_13(step: int) -> None:
        if step == 13:
            raise Crash()

    with pytest.raises(Crash):
        Trainer(store, runs, cfg(), tmp_path / "cut", progress=False, on_step=crash_at_13).train()
    assert not (tmp_path / "cut" / "m" / "config.json").exists()
    with pytest.raises(CheckpointError, match="--resume"):  # no silent reuse
        Trainer(store, runs, cfg(), tmp_path / "cut", progress=False).train()
    summary = Trainer(
        store, runs, cfg(device="cpu", log_every=4), tmp_path / "cut", resume=True, progress=False
    ).train()
    assert summary.steps_this_session == 24 - 8  # resumed from the step-8 checkpoint
    for run in runs:
        assert_same_weights(tmp_path / "full" / run.name, tmp_path / "cut" / run.name)
        steps = [r["step"] for r in read_metrics(tmp_path / "cut" / run.name)]
        assert steps == [r["step"] for r in read_metrics(tmp_path / "full" / run.name)]
        full = read_metrics(tmp_path / "full" / run.name)
        cut = read_metrics(tmp_path / "cut" / run.name)
        assert [r["loss"] for r in cut] == [r["loss"] for r in full]


def test_resume_with_changed_config_is_refused(store, tmp_path):
    runs = [RunSpec("b", BATCH_TOPK, None, 0)]
    Trainer(store, runs, cfg(steps=8), tmp_path / "o", progress=False).train()
    with pytest.raises(CheckpointError) as err:
        Trainer(
            store,
            runs,
            cfg(steps=8, batch_size=64, lr=1e-3),
            tmp_path / "o",
            resume=True,
            progress=False,
        ).train()
    msg = str(err.value)
    assert "train.batch_size: 128 -> 64" in msg and "train.lr" in msg
    changed = [RunSpec("b", {**BATCH_TOPK, "k": 4}, None, 0)]
    with pytest.raises(CheckpointError, match=r"runs\[0\]\.sae\.k: 3 -> 4"):
        Trainer(store, changed, cfg(steps=8), tmp_path / "o", resume=True, progress=False).train()
    # resuming a finished run is a no-op
    s = Trainer(store, runs, cfg(steps=8), tmp_path / "o", resume=True, progress=False).train()
    assert s.steps_this_session == 0
    assert s.runs[0].last_metrics["step"] == 8


def test_output_folder_checks(store, tmp_path):
    runs = [RunSpec("b", BATCH_TOPK, None, 0)]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        Trainer(store, runs, cfg(steps=4), other, progress=False).train()
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="drop --resume"):
        Trainer(store, runs, cfg(steps=4), tmp_path / "new", resume=True, progress=False).train()


def test_d_in_mismatch_and_bad_sae_configs(store, tmp_path):
    with pytest.raises(ConfigError, match=r"d_in = 32.*d_model = 16"):
        Trainer(store, [RunSpec("x", {**BATCH_TOPK, "d_in": 32})], cfg(), tmp_path / "o")
    with pytest.raises(ConfigError, match="k=100"):
        Trainer(store, [RunSpec("x", {**BATCH_TOPK, "k": 100})], cfg(), tmp_path / "o")
    with pytest.raises(ConfigError, match="group_fractions"):
        Trainer(
            store,
            [RunSpec("x", {**MATRYOSHKA, "group_fractions": [0.5, 0.6]})],
            cfg(),
            tmp_path / "o",
        )
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(store, [RunSpec("x", BATCH_TOPK)], cfg(batch_size=100_000), tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written for a refused config


def test_nan_activations_name_the_chunk(tmp_path):
    bad = make_store(tmp_path / "nan", n_tokens=1024, chunk_tokens=256, nan_at=(600, 3))
    with pytest.raises(StoreError, match=r"chunk\(s\) \[2\]"):
        Trainer(
            bad,
            [RunSpec("b", BATCH_TOPK)],
            cfg(normalize_activations=False, steps=8),
            tmp_path / "o",
            progress=False,
        ).train()


def test_incomplete_store_is_refused(tmp_path):
    from masksae.storage import ChunkData, StoreSpec, StoreWriter
    from masksae.train.sweep import open_store

    spec = StoreSpec(d_model=4, dtype="float32", chunk_tokens=8, total_tokens=32, provenance={})
    with StoreWriter.open(tmp_path / "s", spec) as w:
        w.write_chunk(
            0,
            ChunkData(
                np.ones((8, 4), np.float32),
                np.zeros(8, np.int32),
                np.zeros(8, bool),
                np.zeros(8, bool),
                np.zeros(8, np.int64),
                np.arange(8, dtype=np.int32),
            ),
        )
    with pytest.raises(StoreError, match="incomplete.*harvest"):
        open_store(tmp_path / "s")


def test_sweep_manifest_records_runs(store, tmp_path):
    runs = [RunSpec("b", BATCH_TOPK, None, 0)]
    Trainer(store, runs, cfg(steps=4), tmp_path / "o", progress=False).train()
    manifest = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert manifest["runs"][0]["name"] == "b" and manifest["total_steps"] == 4
    assert manifest["store_fingerprint"] == store.fingerprint


def test_missing_optional_logger_is_refused_before_training(store, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        Trainer(store, [RunSpec("b", BATCH_TOPK)], cfg(tensorboard=True), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_periodic_checkpoint_is_loadable_and_pruned(store, tmp_path):
    from masksae.train import checkpoint as ckpt

    def stop(step: int) -> None:
        if step == 20:
            raise Crash()

    with pytest.raises(Crash):
        Trainer(
            store,
            [RunSpec("b", BATCH_TOPK)],
            cfg(checkpoint_every=4),
            tmp_path / "o",
            progress=False,
            on_step=stop,
        ).train()
    steps = sorted(ckpt.list_checkpoints(tmp_path / "o" / "b"))
    assert steps == [16, 20]  # keep_checkpoints = 2
    with pytest.raises(CheckpointError, match="latest periodic checkpoint"):
        load_sae(tmp_path / "o" / "b")
    sae, meta = load_sae(ckpt.checkpoint_dir(tmp_path / "o" / "b", 20))
    assert meta["step"] == 20 and meta["complete"] is False
    assert not list((tmp_path / "o" / "b" / "checkpoints").glob(".*tmp*"))


def test_sweep_shows_one_progress_bar(store, tmp_path, capsys):
    """A sweep of three SAEs draws one bar (they take the same steps), its postfix giving
    each metric's range over the SAEs."""
    from masksae.train.trainer import _bar_postfix

    runs = [RunSpec("m", MATRYOSHKA, None, 0), RunSpec("b", BATCH_TOPK, None, 1)]
    Trainer(store, runs, cfg(steps=8), tmp_path / "o", progress=True).train()
    err = capsys.readouterr().err
    assert "train 2 SAEs" in err and "8/8" in err
    assert not any(part.lstrip().startswith(("m:", "b:")) for part in err.split("\r"))
    post = _bar_postfix([{"loss": 2.0, "l0": 3.0}, {"loss": 1.0, "l0": 3.0, "fvu": 0.5}], 10.0)
    assert post == {"tok/s": "10", "loss": "1-2", "fvu": "0.5", "l0": "3", "dead": "-"}
