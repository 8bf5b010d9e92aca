"""Known-answer tests of the core reconstruction metrics (tensor math only)."""

from __future__ import annotations

import math

import pytest
import torch

from masksae.evaluate.core import (
    CoreConfig,
    ReconstructionAccumulator,
    density_histogram,
    iter_batches,
    reconstruction_metrics,
)
from test_eval_fixtures import IdentitySAE


class BiasOnlySAE(torch.nn.Module):
    """W_dec = 0: every token is reconstructed as b_dec."""

    def __init__(self, b_dec: torch.Tensor, d_sae: int) -> None:
        super().__init__()
        self.b_dec = b_dec
        self.d_sae = d_sae

    def encode(self, x):
        return torch.zeros(x.shape[0], self.d_sae)

    def decode(self, f):
        return self.b_dec.expand(f.shape[0], -1)


def _acts(n: int = 300, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d) + 2.0


def test_identity_sae_explains_everything():
    x = _acts() - 2.0  # centred, so every +/- latent fires on some token
    m = reconstruction_metrics(IdentitySAE(8), iter_batches(x, 64), d_sae=16)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert m["explained_variance_legacy"] == pytest.approx(1.0, abs=1e-9)
    assert m["mse"] == pytest.approx(0.0, abs=1e-10)
    assert m["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert m["relative_norm"] == pytest.approx(1.0, abs=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    # each dim fires exactly one of its +/- latents
    assert m["l0"] == pytest.approx(8.0)
    assert m["n_tokens"] == 300
    assert m["frac_dead"] == 0.0 and m["frac_alive"] == 1.0


def test_bias_only_sae_at_mean_explains_nothing():
    x = _acts()
    sae = BiasOnlySAE(x.mean(0), d_sae=5)
    m = reconstruction_metrics(sae, iter_batches(x, 64), d_sae=5)
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert m["l0"] == 0.0
    assert m["frac_dead"] == 1.0
    assert m["feature_density"]["n_dead"] == 5
    # legacy definition centres per batch: 0 only when the batch is the whole set
    one_batch = reconstruction_metrics(sae, iter_batches(x, 1000), d_sae=5)
    assert one_batch["explained_variance_legacy"] == pytest.approx(0.0, abs=1e-6)
    assert m["explained_variance_legacy"] < 0.0


def test_hand_computed_two_tokens():
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    f = torch.tensor([[0.5, 0.0, 0.0], [0.0, -1.0, 3.0]])
    acc = ReconstructionAccumulator(d_sae=3)
    acc.update(x, f, x_hat)
    m = acc.result()
    # errors per token: 2 and 0 -> mean 1; per-dim variances 1 and 1 -> total 2
    assert m["sq_error_per_token"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx(0.5)
    assert m["total_variance"] == pytest.approx(2.0)
    assert m["explained_variance"] == pytest.approx(0.5)
    # legacy: token 0: 1 - 2 / ||(1,-1)||^2 = 0; token 1: 1 - 0 = 1
    assert m["explained_variance_legacy"] == pytest.approx(0.5)
    assert m["cosine_similarity"] == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    assert m["relative_norm"] == pytest.approx((math.sqrt(2) / 2 + 1) / 2)
    # E||x_hat||^2 / E[x . x_hat] = (2 + 4) / (2 + 4)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert m["l0"] == pytest.approx(1.5)
    assert m["l1"] == pytest.approx(2.25)
    assert m["frac_alive"] == pytest.approx(1.0)


def test_legacy_and_corrected_differ_on_anisotropic_data():
    # one high-variance dim reconstructed perfectly, one low-variance dim not at all
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 2, generator=g, dtype=torch.float64) * torch.tensor([10.0, 0.1])
    x_hat = x.clone()
    x_hat[:, 1] = 0.0
    acc = ReconstructionAccumulator(d_sae=1)
    acc.update(x, torch.ones(400, 1), x_hat)  # float64 in, float64 sums
    m = acc.result()
    var = x.var(0, unbiased=False)
    expected = 1 - float((x[:, 1] ** 2).mean() / var.sum())
    assert m["explained_variance"] == pytest.approx(expected, rel=1e-9)
    assert m["explained_variance"] > 0.99
    legacy = float((1 - x[:, 1] ** 2 / ((x - x.mean(0)) ** 2).sum(-1)).mean())
    assert m["explained_variance_legacy"] == pytest.approx(legacy, rel=1e-9)


def test_corrected_ev_does_not_depend_on_batching():
    x = _acts(n=257)
    torch.manual_seed(0)
    scale = torch.rand(8) + 0.5

    class Linear:
        # row-wise elementwise maps: a matmul's float32 rounding may depend on the batch
        # shape (BLAS kernel choice), which is not what this test is about - aggregation is
        def encode(self, x):
            return torch.relu(x * scale)

        def decode(self, f):
            return f * scale.flip(0)

    a = reconstruction_metrics(Linear(), iter_batches(x, 10), d_sae=8)
    b = reconstruction_metrics(Linear(), iter_batches(x, 1000), d_sae=8)
    for key in ("explained_variance", "mse", "l0", "cosine_similarity", "relative_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key


def test_iter_batches_folds_small_tail():
    x = torch.zeros(21, 2)
    sizes = [b.shape[0] for b in iter_batches(x, 10)]
    assert sizes == [10, 11]
    assert [b.shape[0] for b in iter_batches(x, 8)] == [8, 8, 5]


def test_density_histogram_bins():
    cfg = CoreConfig(density_bin_min_log10=-4.0, density_bin_width=1.0)
    freq = torch.tensor([0.0, 1e-5, 2e-4, 0.05, 0.5, 1.0], dtype=torch.float64)
    h = density_histogram(freq, cfg)
    assert h["log10_bin_edges"] == [-4.0, -3.0, -2.0, -1.0, 0.0]
    # 1e-5 clamps into the first bin; 2e-4 -> [-4,-3); 0.05 -> [-2,-1); 0.5 and 1.0 -> last
    assert h["counts"] == [2, 0, 1, 2]
    assert h["n_dead"] == 1


def test_empty_input_is_a_clear_error():
    from masksae.errors import ConfigError

    with pytest.raises(ConfigError, match="empty"):
        ReconstructionAccumulator(d_sae=2).result()


def test_eval_data_drops_norm_outliers_from_acts_and_keep() -> None:
    from masksae.evaluate.data import _drop_norm_outliers

    keep = torch.tensor([[False, True, True, True], [False, True, True, True]])
    acts = torch.ones(6, 3)
    acts[1] *= 500.0  # sequence 0, position 2: an attention-sink-like outlier
    kept_acts, kept = _drop_norm_outliers(acts, keep, factor=10.0)
    assert kept_acts.shape == (5, 3)
    assert torch.equal(kept_acts, torch.ones(5, 3))
    expected = keep.clone()
    expected[0, 2] = False
    assert torch.equal(kept, expected)
    assert torch.equal(keep[0], torch.tensor([False, True, True, True]))  # input untouched
    same_acts, same_keep = _drop_norm_outliers(acts, keep, factor=0.0)
    assert same_acts.shape == (6, 3) and torch.equal(same_keep, keep)
