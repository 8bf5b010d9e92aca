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
    "relu": {"architecture": "relu", "d_sae": 64, "l1_coefficient": 0.01},
    "jumprelu": {"architecture": "jumprelu", "d_sae": 64, "target_l0": 4.0},
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


@pytest.mark.parametrize("arch", ["matryoshka_batch_topk", "batch_topk", "topk"])
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


# dictionary_learning's classes as their state_dicts and forward rules define them
# (transcribed from dictionary.py, trainers/batch_top_k.py, top_k.py, matryoshka_batch_top_k.py):
# loading our ae.pt with load_state_dict(strict=True) checks every key name and shape.
class DLLinearSAE(torch.nn.Module):
    """BatchTopKSAE / AutoEncoderTopK: nn.Linear encoder and decoder, ``b_dec``, k, threshold."""

    def __init__(self, d: int, f: int, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.encoder = torch.nn.Linear(d, f)
        self.decoder = torch.nn.Linear(f, d, bias=False)
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.register_buffer("k", torch.tensor(1, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0))

    def encode(self, x):
        post = torch.relu(self.encoder(x - self.b_dec))
        if self.rule == "threshold":
            return post * (post > self.threshold)
        top = post.topk(int(self.k), dim=-1)
        return torch.zeros_like(post).scatter(-1, top.indices, top.values)

    def decode(self, f):
        return self.decoder(f) + self.b_dec


class DLAutoEncoder(torch.nn.Module):
    """AutoEncoder (StandardTrainer): ``bias`` is the decoder bias, subtracted from the input."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(d))
        self.encoder = torch.nn.Linear(d, f)
        self.decoder = torch.nn.Linear(f, d, bias=False)

    def encode(self, x):
        return torch.relu(self.encoder(x - self.bias))

    def decode(self, f):
        return self.decoder(f) + self.bias


class DLParamSAE(torch.nn.Module):
    """MatryoshkaBatchTopKSAE (k, threshold, group_sizes) / JumpReluAutoEncoder (threshold [F],
    no b_dec subtraction): W_enc [D, F], W_dec [F, D] parameters."""

    def __init__(self, d: int, f: int, rule: str, groups: list[int] | None = None) -> None:
        super().__init__()
        self.rule = rule
        self.W_enc = torch.nn.Parameter(torch.zeros(d, f))
        self.b_enc = torch.nn.Parameter(torch.zeros(f))
        self.W_dec = torch.nn.Parameter(torch.zeros(f, d))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        if rule == "jumprelu":
            self.threshold = torch.nn.Parameter(torch.zeros(f))
        else:
            self.register_buffer("k", torch.tensor(1, dtype=torch.int))
            self.register_buffer("threshold", torch.tensor(-1.0))
            self.register_buffer("group_sizes", torch.tensor(groups))

    def encode(self, x):
        if self.rule == "jumprelu":
            pre = x @ self.W_enc + self.b_enc
            return torch.relu(pre * (pre > self.threshold))
        post = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        return post * (post > self.threshold)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def dl_reference_module(arch: str, d: int = 16, f: int = 64) -> torch.nn.Module:
    return {
        "batch_topk": lambda: DLLinearSAE(d, f, "threshold"),
        "topk": lambda: DLLinearSAE(d, f, "topk"),
        "relu": lambda: DLAutoEncoder(d, f),
        "matryoshka_batch_topk": lambda: DLParamSAE(d, f, "threshold", [16, 16, 32]),
        "jumprelu": lambda: DLParamSAE(d, f, "jumprelu"),
    }[arch]()


DL_CLASSES = {
    "batch_topk": ("BatchTopKTrainer", "BatchTopKSAE"),
    "matryoshka_batch_topk": ("MatryoshkaBatchTopKTrainer", "MatryoshkaBatchTopKSAE"),
    "topk": ("TopKTrainer", "AutoEncoderTopK"),
    "relu": ("StandardTrainer", "AutoEncoder"),
    "jumprelu": ("JumpReluTrainer", "JumpReluAutoEncoder"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dictionary_learning_export_loads_into_the_reference_class(trained, tmp_path, arch):
    out, x = trained
    export(out / arch, "dictionary_learning", tmp_path / "dl")
    native, _ = load_sae(out / arch)
    state = torch.load(tmp_path / "dl" / "ae.pt", weights_only=True)
    reference = dl_reference_module(arch)
    reference.load_state_dict(state, strict=True)  # every key, no extra, same shapes
    cfg = json.loads((tmp_path / "dl" / "config.json").read_text())
    trainer = cfg["trainer"]
    assert (trainer["trainer_class"], trainer["dict_class"]) == DL_CLASSES[arch]
    assert trainer["activation_dim"] == 16 and trainer["dict_size"] == 64
    assert trainer["layer"] == 3 and trainer["lm_name"] == "synthetic" and "buffer" in cfg
    if "k" in state:
        assert state["k"].dtype == torch.int32 and int(state["k"]) == 3 == trainer["k"]
    if arch in ("batch_topk", "matryoshka_batch_topk"):
        assert state["threshold"].shape == () and float(state["threshold"]) > 0
    if arch == "matryoshka_batch_topk":
        assert state["group_sizes"].tolist() == [16, 16, 32] == trainer["group_sizes"]
    if arch == "jumprelu":
        assert state["threshold"].shape == (64,)
    with torch.no_grad():
        f_native = native.encode(x)
        assert (f_native != 0).any()
        torch.testing.assert_close(reference.encode(x), f_native, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            reference.decode(reference.encode(x)), native(x), rtol=1e-5, atol=1e-5
        )
        # our reference loader reads the same files with the same result
        exported, _ = load_dictionary_learning_export(tmp_path / "dl")
        torch.testing.assert_close(exported.encode(x), f_native, rtol=1e-5, atol=1e-5)
    json.dumps(cfg)  # JSON-able


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dictionary_learning_loader_reads_reference_written_fixtures(tmp_path, arch):
    """An ae.pt written by the reference class's own state_dict is read back exactly."""
    torch.manual_seed(0)
    reference = dl_reference_module(arch)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.05 if "threshold" in name else 0.3))
        if arch == "jumprelu":
            reference.threshold.abs_()
        else:
            for buf, value in (("k", 3), ("threshold", 0.2)):
                if hasattr(reference, buf) and not isinstance(
                    getattr(reference, buf), torch.nn.Parameter
                ):
                    getattr(reference, buf).fill_(value)
    (tmp_path / "dl").mkdir()
    torch.save(reference.state_dict(), tmp_path / "dl" / "ae.pt")
    trainer_class, dict_class = DL_CLASSES[arch]
    (tmp_path / "dl" / "config.json").write_text(
        json.dumps({"trainer": {"trainer_class": trainer_class, "dict_class": dict_class}})
    )
    exported, _ = load_dictionary_learning_export(tmp_path / "dl")
    x = torch.randn(32, 16)
    with torch.no_grad():
        f_ref = reference.encode(x)
        assert (f_ref != 0).any() and (f_ref == 0).any()
        torch.testing.assert_close(exported.encode(x), f_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            exported.decode(f_ref), reference.decode(f_ref), rtol=1e-6, atol=1e-6
        )


def test_export_refusals(trained, tmp_path):
    out, _ = trained
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
