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


@pytest.fixture(scope="module")
def deep_lm():
    """A 4-block tiny Llama: resuming after block 1 leaves blocks 2 and 3 to run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    return SimpleNamespace(
        model=model,
        model_id="tiny-llama-4",
        device=torch.device("cpu"),
        dtype=torch.float32,
        d_model=16,
        n_layers=4,
    )


class BlockRuns:
    """Counts how often each block really computes (its MLP runs; a block skipped by
    resume_after_layer does not reach it)."""

    def __init__(self, lm):
        self.runs = [0] * lm.n_layers
        self.handles = [
            block.mlp.register_forward_hook(self._hook(i))
            for i, block in enumerate(models.get_blocks(lm.model))
        ]

    def _hook(self, i):
        def hook(*_):
            self.runs[i] += 1

        return hook

    def take(self):
        runs, self.runs = self.runs, [0] * len(self.runs)
        return runs

    def close(self):
        for h in self.handles:
            h.remove()


def test_cached_clean_pass_and_resumed_passes_are_exact(deep_lm, batch, monkeypatch):
    from contextlib import nullcontext

    from masksae.evaluate import downstream as ds_mod

    ids, attn, keep = batch
    layer = 1
    cfg = DownstreamConfig(n_sequences=5, batch_size=2)  # batches of 2, 2, 1 sequences
    counter = BlockRuns(deep_lm)
    try:
        # reference: every pass from the embeddings (resuming disabled)
        with monkeypatch.context() as m:
            m.setattr("masksae.models.resume_after_layer", lambda *a, **k: nullcontext())
            full = downstream_metrics(deep_lm, HalfSAE(16), layer, ids, attn, keep, cfg)
        assert counter.take() == [9, 9, 9, 9]  # clean + spliced + zero per batch
        plain = downstream_metrics(deep_lm, HalfSAE(16), layer, ids, attn, keep, cfg)
        # the spliced and zero passes start after the hooked block
        assert counter.take() == [3, 3, 9, 9]
        assert plain["resumed_after_layer_sequences"] == 5
        for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "kl_div_sae", "kl_div_zero"):
            assert plain[key] == pytest.approx(full[key], rel=1e-6, abs=1e-9), key

        one_batch = 2 * ids.shape[1] * 64 * 4  # [2, T, V] float32 log-probs
        resid_bytes = ids.numel() * 16 * 4  # every batch's [B, T, D] residual
        cache = ds_mod.CleanCache(one_batch + resid_bytes)  # log-probs of one batch only
        base = plain["baseline"]
        first = downstream_metrics(
            deep_lm, HalfSAE(16), layer, ids, attn, keep, cfg, baseline=base, clean_cache=cache
        )
        assert counter.take() == [3, 3, 6, 6]  # clean + resumed spliced (no zero pass)
        assert cache.used_bytes == one_batch + resid_bytes
        assert first["clean_forward_cached_sequences"] == 0
        second = downstream_metrics(
            deep_lm, IdentitySAE(16), layer, ids, attn, keep, cfg, baseline=base, clean_cache=cache
        )
        # the first batch's clean pass is skipped; the others still run theirs
        assert counter.take() == [2, 2, 5, 5]
        assert second["clean_forward_cached_sequences"] == 2
        assert second["ce_loss_clean"] == first["ce_loss_clean"] == plain["ce_loss_clean"]
        assert second["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
        assert second["kl_div_sae"] == pytest.approx(0.0, abs=1e-6)
        for key in ("ce_loss_sae", "kl_div_sae", "ce_loss_recovered"):
            assert first[key] == pytest.approx(plain[key], rel=1e-6)
        # log-probs cached but not the residual: blocks 0..layer run once to get it
        lp_only = ds_mod.CleanCache(one_batch)
        lp_only.put(0, cache.get(0))
        third = downstream_metrics(
            deep_lm, HalfSAE(16), layer, ids, attn, keep, cfg, baseline=base, clean_cache=lp_only
        )
        assert counter.take() == [3, 3, 5, 5]
        assert third["ce_loss_sae"] == pytest.approx(plain["ce_loss_sae"], rel=1e-6)
    finally:
        counter.close()
    with pytest.raises(ConfigError):
        DownstreamConfig(clean_cache_mb=-1)
