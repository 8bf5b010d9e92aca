"""Exports: SAELens and dictionary_learning round trips against the native SAE."""

from __future__ import annotations

import json

import pytest
import torch

from masksae.errors import CheckpointError, ConfigError
from masksae.train.checkpoint import load_sae
from masksae.train.config import RunSpec, TrainConfig
from masksae.train.export import (
    export,
    export_dictionary_learning,
    export_saelens,
    load_dictionary_learning_export,
    load_saelens_export,
)
from masksae.train.trainer import Trainer
from test_train_fixtures import make_store

ARCHS = {
    "matryoshka_batch_topk": {
        "architecture": "matryoshka_batch_topk",
        "d_sae": 64,
        "k": 3,
        "group_fractions": [0.25, 0.25, 0.5],
        "threshold_start_step": 4,
        "threshold_beta": 0.9,
    },
    "batch_topk": {
        "architecture": "batch_topk",
        "d_sae": 64,
        "k": 3,
        "threshold_start_step": 4,
        "threshold_beta": 0.9,
    },
    "topk": {"architecture": "topk", "d_sae": 64, "k": 3},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    store = make_store(root / "store", n_tokens=2048, chunk_tokens=512)
    runs = [RunSpec(name, sae, None, 0) for name, sae in ARCHS.items()]
    cfg = TrainConfig(
        steps=16,
        batch_size=128,
        warmup_steps=2,
        log_every=8,
        device="cpu",
        lr=3e-3,
        checkpoint_every=0,
    )
    Trainer(store, runs, cfg, root / "out", progress=False).train()
    x = torch.from_numpy(store.read(0, 512).activations)
    return root / "out", x


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saelens_round_trip(trained, tmp_path, arch):
    out, x = trained
    export_saelens(out / arch, tmp_path / "sl")
    exported, cfg = load_saelens_export(tmp_path / "sl")
    native, meta = load_sae(out / arch)
    assert cfg["architecture"] == ("topk" if arch == "topk" else "jumprelu")
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["normalize_activations"] == "none"
    assert cfg["hook_name"] == "blocks.3.hook_resid_post" and cfg["hook_layer"] == 3
    assert cfg["apply_b_dec_to_input"] is True and cfg["model_name"] == "synthetic"
    assert cfg["metadata"]["masksae"]["mask_prob"] == 0.3
    assert exported.W_enc.shape == (16, 64) and exported.W_dec.shape == (64, 16)
    assert torch.allclose(exported.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)
    if arch != "topk":
        assert exported.threshold.shape == (64,) and bool((exported.threshold >= 0).all())
        assert float(exported.threshold[0]) == pytest.approx(float(native.threshold))
    with torch.no_grad():
        f_native = native.encode(x)
        assert (f_native != 0).any()
        torch.testing.assert_close(exported.encode(x), f_native, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            exported.decode(exported.encode(x)), native(x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("arch", ["matryoshka_batch_topk", "batch_topk"])
def test_dictionary_learning_round_trip(trained, tmp_path, arch):
    out, x = trained
    export(out / arch, "dictionary_learning", tmp_path / "dl")
    exported, cfg = load_dictionary_learning_export(tmp_path / "dl")
    native, _ = load_sae(out / arch)
    state = torch.load(tmp_path / "dl" / "ae.pt", weights_only=True)
    assert set(state) >= {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "k"}
    assert int(state["k"]) == 3 and float(state["threshold"]) >= 0
    trainer = cfg["trainer"]
    assert trainer["activation_dim"] == 16 and trainer["dict_size"] == 64 and trainer["k"] == 3
    assert trainer["layer"] == 3 and trainer["lm_name"] == "synthetic" and "buffer" in cfg
    if arch == "matryoshka_batch_topk":
        assert state["group_sizes"].tolist() == [16, 16, 32] == trainer["group_sizes"]
        assert trainer["dict_class"] == "MatryoshkaBatchTopKSAE"
    with torch.no_grad():
        torch.testing.assert_close(exported.encode(x), native.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            exported.decode(exported.encode(x)), native(x), rtol=1e-5, atol=1e-5
        )
    json.dumps(cfg)  # JSON-able


def test_export_refusals(trained, tmp_path):
    out, _ = trained
    with pytest.raises(ConfigError, match="dictionary_learning export supports"):
        export_dictionary_learning(out / "topk", tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown export format"):
        export(out / "topk", "onnx", tmp_path / "x")
    with pytest.raises(CheckpointError, match="holds the runs"):
        export_saelens(out, tmp_path / "x")


def test_export_refuses_an_unlearned_threshold(tmp_path):
    store = make_store(tmp_path / "store", n_tokens=1024, chunk_tokens=512)
    sae = {"architecture": "batch_topk", "d_sae": 32, "k": 2, "threshold_start_step": 100}
    cfg = TrainConfig(steps=2, batch_size=128, warmup_steps=1, device="cpu", checkpoint_every=0)
    Trainer(store, [RunSpec("b", sae)], cfg, tmp_path / "out", progress=False).train()
    with pytest.raises(CheckpointError, match="threshold_start_step"):
        export_saelens(tmp_path / "out" / "b", tmp_path / "sl")
    assert not (tmp_path / "sl" / "cfg.json").exists()


def test_export_refuses_a_folder_holding_other_files(trained, tmp_path):
    from masksae.errors import CheckpointError
    from masksae.train.export import export

    run = trained[0] / "matryoshka_batch_topk"
    out = tmp_path / "exp"
    export(run, "saelens", out)
    export(run, "saelens", out)  # replacing an earlier export of the same format is fine
    with pytest.raises(CheckpointError, match=r"already holds other files \(cfg.json, sae_weights"):
        export(run, "dictionary_learning", out)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
