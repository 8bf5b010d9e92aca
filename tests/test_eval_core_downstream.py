"""CE loss recovered / KL with the reconstruction spliced into a tiny random Llama."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from masksae.evaluate.downstream import DownstreamConfig, downstream_metrics, keep_positions

models = pytest.importorskip("masksae.models")


class IdentitySAE:
    def __init__(self, d: int) -> None:
        eye = torch.eye(d)
        self.W_enc = torch.cat([eye, -eye], dim=1)
        self.W_dec = torch.cat([eye, -eye], dim=0)

    def encode(self, x):
        return torch.relu(x @ self.W_enc)

    def decode(self, f):
        return f @ self.W_dec


class ZeroSAE:
    def encode(self, x):
        return torch.zeros(x.shape[0], 1)

    def decode(self, f):
        return torch.zeros(f.shape[0], 16)


class HalfSAE(IdentitySAE):
    def decode(self, f):
        return 0.5 * super().decode(f)


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    return SimpleNamespace(model=model, model_id="tiny-llama", device=torch.device("cpu"),
                           dtype=torch.float32, d_model=16, n_layers=2)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (5, 12), generator=g)
    ids[:, 0] = 1  # BOS
    ids[2, 6] = 0  # a special token mid-sequence
    attn = torch.ones_like(ids)
    return ids, attn, keep_positions(ids, attn, special_ids=[0, 1])


def test_keep_positions_drops_position0_specials_and_padding():
    ids = torch.tensor([[1, 5, 0, 7], [4, 5, 6, 7]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    keep = keep_positions(ids, attn, special_ids=[0, 1])
    assert keep.tolist() == [[False, True, False, True], [False, True, True, False]]


def test_perfect_reconstruction_recovers_everything(tiny_lm, batch):
    ids, attn, keep = batch
    m = downstream_metrics(tiny_lm, IdentitySAE(16), 0, ids, attn, keep,
                           DownstreamConfig(n_sequences=5, batch_size=2))
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div_sae"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_clean"], abs=1e-5)
    assert m["ce_loss_zero"] != pytest.approx(m["ce_loss_clean"], abs=1e-3)
    assert m["kl_div_zero"] > 0
    # counted predictions: kept source and kept target -> 5 * 10 minus two around the special
    assert m["n_tokens"] == 5 * 10 - 2


def test_zero_reconstruction_recovers_nothing_and_baseline_reuse(tiny_lm, batch):
    ids, attn, keep = batch
    cfg = DownstreamConfig(n_sequences=5, batch_size=5)
    m = downstream_metrics(tiny_lm, ZeroSAE(), 1, ids, attn, keep, cfg)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    half = downstream_metrics(tiny_lm, HalfSAE(16), 1, ids, attn, keep, cfg)
    reused = downstream_metrics(tiny_lm, HalfSAE(16), 1, ids, attn, keep, cfg,
                                baseline=m["baseline"])
    assert reused["ce_loss_recovered"] == pytest.approx(half["ce_loss_recovered"], rel=1e-6)
    assert half["kl_div_sae"] > 0
