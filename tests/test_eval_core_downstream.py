"""CE loss recovered / KL with the reconstruction spliced into a tiny random Llama."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from masksae.errors import ConfigError
from masksae.evaluate.downstream import DownstreamConfig, downstream_metrics, keep_positions
from test_eval_fixtures import IdentitySAE

models = pytest.importorskip("masksae.models")


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
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    return SimpleNamespace(
        model=model,
        model_id="tiny-llama",
        device=torch.device("cpu"),
        dtype=torch.float32,
        d_model=16,
        n_layers=2,
    )


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
    m = downstream_metrics(
        tiny_lm, IdentitySAE(16), 0, ids, attn, keep, DownstreamConfig(n_sequences=5, batch_size=2)
    )
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
    reused = downstream_metrics(
        tiny_lm, HalfSAE(16), 1, ids, attn, keep, cfg, baseline=m["baseline"]
    )
    assert reused["ce_loss_recovered"] == pytest.approx(half["ce_loss_recovered"], rel=1e-6)
    assert half["kl_div_sae"] > 0


class _CountingLM:
    """Wraps the tiny LM, counting full forward passes."""

    def __init__(self, lm):
        self.__dict__.update(lm.__dict__)
        self.calls = 0
        inner = lm.model

        def model(**kw):
            self.calls += 1
            return inner(**kw)

        self.model = model
        self._inner = inner


def test_clean_cache_skips_clean_forward_and_is_exact(tiny_lm, batch, monkeypatch):
    from masksae.evaluate import downstream as ds_mod

    ids, attn, keep = batch
    # splice_resid_post hooks the real module: give it the real model
    monkeypatch.setattr("masksae.models.splice_resid_post", _splice_on_inner(ds_mod), raising=True)
    cfg = DownstreamConfig(n_sequences=5, batch_size=2)  # batches of 2, 2, 1 sequences
    lm = _CountingLM(tiny_lm)
    plain = downstream_metrics(lm, HalfSAE(16), 1, ids, attn, keep, cfg)
    assert lm.calls == 3 * 3  # clean + spliced + zero per batch
    one_batch = 2 * ids.shape[1] * 64 * 4  # [2, T, V] float32 bytes
    cache = ds_mod.CleanCache(one_batch)  # room for the first batch only
    lm.calls = 0
    first = downstream_metrics(
        lm, HalfSAE(16), 1, ids, attn, keep, cfg, baseline=plain["baseline"], clean_cache=cache
    )
    assert lm.calls == 3 * 2 and first["clean_forward_cached_sequences"] == 0
    assert cache.used_bytes == one_batch
    lm.calls = 0
    second = downstream_metrics(
        lm, IdentitySAE(16), 1, ids, attn, keep, cfg, baseline=plain["baseline"], clean_cache=cache
    )
    assert lm.calls == 3 * 2 - 1  # the cached batch skipped its clean forward
    assert second["clean_forward_cached_sequences"] == 2
    assert second["ce_loss_clean"] == first["ce_loss_clean"] == plain["ce_loss_clean"]
    assert second["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert second["kl_div_sae"] == pytest.approx(0.0, abs=1e-6)
    for key in ("ce_loss_sae", "kl_div_sae", "ce_loss_recovered"):
        assert first[key] == pytest.approx(plain[key], rel=1e-6)
    with pytest.raises(ConfigError):
        DownstreamConfig(clean_cache_mb=-1)


def _splice_on_inner(ds_mod):
    from masksae.models import splice_resid_post as real

    def splice(lm, layer, fn):
        inner = getattr(lm, "_inner", None)
        if inner is None:
            return real(lm, layer, fn)
        from types import SimpleNamespace

        return real(SimpleNamespace(**{**lm.__dict__, "model": inner}), layer, fn)

    return splice
