"""Known-answer tests of the absorption rule, main-latent selection and score conventions."""

from __future__ import annotations

import math

import pytest
import torch

from masksae.evaluate.absorption import (
    AbsorptionConfig,
    AbsorptionThresholds,
    paper_convention,
    score_letter,
    select_main_latents,
)
from masksae.evaluate.absorption.k_sparse import k_sparse_probe_letters

D, F = 16, 8
MAIN, SHORT = 0, 1  # latent 0: "starts with S"; latent 1: "short" (absorbs S on some tokens)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _decoder(cos_short: float) -> torch.Tensor:
    """W_dec with the main latent along the probe (e0) and the short latent at `cos_short`."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(F, D, generator=gen)
    W[:, 0] = 0.0  # other latents orthogonal to the probe
    W[MAIN] = torch.eye(D)[0]
    W[SHORT] = cos_short * torch.eye(D)[0] + math.sqrt(1 - cos_short**2) * torch.eye(D)[1]
    return W / W.norm(dim=1, keepdim=True)


def _tokens(n: int, along_probe: float, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, D, generator=gen)
    x[:, 0] = along_probe  # x . p_hat exactly `along_probe`
    return x


PROBE = 3.0 * torch.eye(D)[0]  # not unit norm on purpose: score_letter normalises it


def test_short_latent_absorbs_s_and_clean_tokens_are_not_absorbed() -> None:
    W = _decoder(cos_short=0.5)
    x = _tokens(6, along_probe=2.0)
    f = torch.zeros(6, F)
    f[:3, SHORT] = 2.0  # absorbed: main silent, short carries 2.0 * 0.5 / 2.0 = 50 %
    f[:3, 5] = 0.7  # an unrelated latent (cos 0) also fires
    f[3:, MAIN] = 2.0  # clean: main fires
    out = score_letter(x, f, W, PROBE, [MAIN])
    assert out.is_full_N.tolist() == [True, True, True, False, False, False]
    assert out.top_latent_N[:3].tolist() == [SHORT] * 3
    assert out.full_absorption_rate == pytest.approx(0.5)
    # fractional: absorbed tokens have no main projection -> 1; clean ones 0
    assert out.fraction_N.tolist() == pytest.approx([1, 1, 1, 0, 0, 0])


def test_tiny_main_activation_counts_as_inactive_only_below_eps() -> None:
    W = _decoder(cos_short=0.5)
    x = _tokens(2, along_probe=2.0)
    f = torch.zeros(2, F)
    f[:, SHORT] = 2.0
    f[0, MAIN] = 0.5e-8
    f[1, MAIN] = 2e-8
    assert score_letter(x, f, W, PROBE, [MAIN]).is_full_N.tolist() == [True, False]


@pytest.mark.parametrize(("cos_short", "expected"), [(0.0249, False), (0.0251, True)])
def test_cosine_threshold_boundary(cos_short: float, expected: bool) -> None:
    W = _decoder(cos_short)
    x = _tokens(1, along_probe=2.0)
    f = torch.zeros(1, F)
    f[0, SHORT] = 100.0  # projection ratio ~1.25, well above 0.4: only the cosine decides
    assert score_letter(x, f, W, PROBE, [MAIN]).is_full_N.item() is expected


@pytest.mark.parametrize(("ratio", "expected"), [(0.399, False), (0.401, True)])
def test_projection_ratio_threshold_boundary(ratio: float, expected: bool) -> None:
    W = _decoder(cos_short=0.5)
    x = _tokens(1, along_probe=2.0)
    f = torch.zeros(1, F)
    f[0, SHORT] = ratio * 2.0 / 0.5  # act * cos / (x . p_hat) == ratio
    assert score_letter(x, f, W, PROBE, [MAIN]).is_full_N.item() is expected


def test_negative_probe_projection_is_not_absorption() -> None:
    W = _decoder(cos_short=0.5)
    x = _tokens(1, along_probe=-2.0)
    f = torch.zeros(1, F)
    f[0, SHORT] = 2.0
    assert not score_letter(x, f, W, PROBE, [MAIN]).is_full_N.item()


def test_any_active_main_latent_blocks_full_absorption() -> None:
    W = _decoder(cos_short=0.5)
    x = _tokens(1, along_probe=2.0)
    f = torch.zeros(1, F)
    f[0, SHORT] = 2.0
    f[0, 3] = 0.1  # second main latent fires weakly
    assert not score_letter(x, f, W, PROBE, [MAIN, 3]).is_full_N.item()


def test_partial_absorption_fraction() -> None:
    W = _decoder(cos_short=0.5)
    x = _tokens(1, along_probe=2.5)
    f = torch.zeros(1, F)
    f[0, MAIN] = 1.0  # main projection 1.0 (cos 1)
    f[0, SHORT] = 2.0  # absorber projection 1.0 (cos 0.5), ratio 0.4 of 2.5
    out = score_letter(x, f, W, PROBE, [MAIN])
    assert not out.is_full_N.item()  # main is active
    # a = min(1.0, 2.5 - 1.0) = 1.0 -> 1 / (1 + 1)
    assert out.fraction_N.item() == pytest.approx(0.5)
    # absorber below fraction_cos (0.1) does not count
    W_low = _decoder(cos_short=0.09)
    f[0, SHORT] = 1.0 / 0.09
    assert score_letter(x, f, W_low, PROBE, [MAIN]).fraction_N.item() == 0.0


def test_thresholds_come_from_config() -> None:
    th = AbsorptionThresholds.from_config(AbsorptionConfig())
    assert (th.full_cos, th.fraction_cos, th.projection_ratio) == (0.025, 0.1, 0.4)
    assert (th.max_absorbing_latents, th.inactive_eps) == (3, 1e-8)


def test_paper_convention_direction() -> None:
    assert paper_convention(0.0) == 100.0  # no absorption: best
    assert paper_convention(1.0) == 0.0
    assert paper_convention(0.25) == pytest.approx(75.0)
    assert paper_convention(None) is None


def test_select_main_latents_stops_at_small_f1_gain() -> None:
    latents = [[4], [4, 9], [4, 9, 2], [4, 9, 2, 7]]
    assert select_main_latents([0.5, 0.6, 0.62, 0.95], latents, 0.03) == [4, 9]
    assert select_main_latents([0.9, 0.92, 0.99, 1.0], latents, 0.03) == [4]
    assert select_main_latents([0.5, 0.531, 0.6, 0.7], latents, 0.03) == latents[3]


def test_k_sparse_probing_picks_planted_latents() -> None:
    """Letter c is carried by latent c; letter 'a' is split over latents 30 and 31."""
    # SAEBench starts the L1 probe from nn.Linear's init (+-1/sqrt(F)); with one full batch per
    # epoch Adam moves every weight whose gradient keeps its sign by ~lr per step, so the
    # ranking is only reliable when chance correlations of noise latents are rare (sparse
    # noise here; with denser noise and F = 1024 at 24 words per letter most letters fail)
    n_per_letter, n_latents = 40, 256

    def make(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(26).repeat_interleave(n)
        f = torch.relu(torch.randn(len(y), n_latents, generator=g) - 2.5) * 0.3  # noise
        f[torch.arange(len(y)), y] += 1.0 + 0.2 * torch.rand(len(y), generator=g)
        a_rows = (y == 0).nonzero().flatten()
        f[a_rows, 0] = 0.0
        f[a_rows[0::2], 30] = 1.0
        f[a_rows[1::2], 31] = 1.0
        return f, y

    f_train, y_train = make(n_per_letter, 1)
    f_test, y_test = make(n_per_letter // 4, 2)
    res = k_sparse_probe_letters(
        f_train, y_train, f_test, y_test, list(range(26)), AbsorptionConfig(), torch.device("cpu")
    )
    assert sorted(res[0].main_latents) == [30, 31]
    for c in range(1, 26):
        assert res[c].main_latents == [c], (c, res[c].main_latents, res[c].f1_by_k)
        assert res[c].f1_by_k[0] > 0.85


def test_probes_start_from_seeded_nn_linear_init() -> None:
    """SAEBench's probes (ground truth and L1 selector) start from torch.nn.Linear's default
    init: weights and bias uniform in +-1/sqrt(d), not zeros."""
    from masksae.evaluate.absorption.probes import train_one_vs_rest

    x = torch.zeros(8, 400)
    y = torch.arange(8) % 4

    def init(seed: int):
        return train_one_vs_rest(
            x,
            y,
            n_classes=4,
            epochs=0,
            batch_size=8,
            lr=1e-2,
            end_lr=1e-5,
            weight_decay=0.0,
            seed=seed,
            device=torch.device("cpu"),
            l1_decay=0.01,
        )

    a, b, c = init(0), init(0), init(1)
    assert torch.equal(a.W_CD, b.W_CD) and torch.equal(a.b_C, b.b_C)  # seeded
    assert not torch.equal(a.W_CD, c.W_CD)
    bound = 1 / math.sqrt(400)
    assert a.W_CD.abs().max() <= bound and a.W_CD.abs().max() > 0.99 * bound
    assert a.b_C.abs().max() <= bound and a.b_C.abs().min() > 0
    # the uniform's variance bound^2 / 3 (nn.Linear's kaiming_uniform(a=sqrt(5)))
    assert a.W_CD.var().item() == pytest.approx(bound**2 / 3, rel=0.1)
