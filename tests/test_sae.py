"""SAE architectures: configs, losses vs hand computation, threshold, AuxK, constraints."""

from __future__ import annotations

import math

import pytest
import torch

from masksae.errors import ConfigError
from masksae.train.kernels import native
from masksae.train.sae import (
    ARCHITECTURES,
    BatchTopKConfig,
    JumpReLUConfig,
    MatryoshkaBatchTopKConfig,
    ReLUConfig,
    StepContext,
    TopKConfig,
    build_sae,
    geometric_median,
    matryoshka_group_sizes,
    sae_config_from_dict,
)
from masksae.train.sae.auxk import normalized_auxk_loss

D, F, B = 16, 64, 32


def make(arch: str, **kw):
    torch.manual_seed(0)
    d = {"architecture": arch, "d_in": D, "d_sae": F}
    if arch in ("topk", "batch_topk", "matryoshka_batch_topk"):
        d["k"] = 4
    if arch == "matryoshka_batch_topk":
        d["group_fractions"] = [0.25, 0.25, 0.5]
    d.update(kw)
    sae = build_sae(sae_config_from_dict(d))
    with torch.no_grad():  # non-trivial biases so every term of the formulas matters
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
    return sae


def data(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g)


# ---- configs --------------------------------------------------------------------------
def test_registry_and_round_trip():
    assert set(ARCHITECTURES) == {"matryoshka_batch_topk", "batch_topk", "topk", "relu", "jumprelu"}
    for arch in ARCHITECTURES:
        sae = make(arch)
        cfg2 = sae_config_from_dict(sae.cfg.to_dict())
        assert cfg2 == sae.cfg
        assert sae.W_enc.shape == (D, F) and sae.W_dec.shape == (F, D)
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(F))
        assert torch.allclose(sae.W_enc, sae.W_dec.t())


def test_configs_live_in_sae_config_and_keep_their_old_import_paths():
    from masksae.train import sae_config
    from masksae.train.sae import (
        base,
        batch_topk,
        jumprelu,
        matryoshka_batch_topk,
        registry,
        relu,
        topk,
        topk_family,
    )

    old_paths = {
        sae_config.SAEConfig: base.SAEConfig,
        sae_config.TopKConfig: (topk.TopKConfig, topk_family.TopKConfig),
        sae_config.BatchTopKConfig: batch_topk.BatchTopKConfig,
        sae_config.MatryoshkaBatchTopKConfig: matryoshka_batch_topk.MatryoshkaBatchTopKConfig,
        sae_config.ReLUConfig: relu.ReLUConfig,
        sae_config.JumpReLUConfig: jumprelu.JumpReLUConfig,
        sae_config.matryoshka_group_sizes: matryoshka_batch_topk.matryoshka_group_sizes,
    }
    for new, old in old_paths.items():
        assert all(o is new for o in (old if isinstance(old, tuple) else (old,)))
    assert sae_config.ARCHITECTURES == ARCHITECTURES
    # each registered SAE class takes exactly the config the torch-free table names
    for arch in ARCHITECTURES:
        assert registry.sae_class(arch).config_class is sae_config.config_class(arch)
    with pytest.raises(ConfigError, match="unknown SAE architecture 'nope'; valid"):
        sae_config.config_class("nope")


def test_group_sizes_4096():
    cfg = MatryoshkaBatchTopKConfig(d_in=8, d_sae=4096, k=20)
    assert cfg.group_sizes == [128, 256, 512, 1024, 2176]
    assert list(torch.tensor(cfg.group_sizes).cumsum(0)) == [128, 384, 896, 1920, 4096]
    assert cfg.group_weights == (0.2,) * 5
    assert matryoshka_group_sizes(100, (0.5, 0.5)) == [50, 50]


@pytest.mark.parametrize(
    "d, match",
    [
        ({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 17}, "k=17"),
        ({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 0}, "k=0"),
        ({"architecture": "topk", "d_in": 0, "d_sae": 16, "k": 2}, "d_in=0"),
        (
            {"architecture": "batch_topk", "d_in": 8, "d_sae": 16, "k": 2, "threshold_beta": 1.5},
            "threshold_beta",
        ),
        (
            {
                "architecture": "matryoshka_batch_topk",
                "d_in": 8,
                "d_sae": 64,
                "k": 2,
                "group_fractions": [0.5, 0.4],
            },
            "sum to 0.9",
        ),
        (
            {
                "architecture": "matryoshka_batch_topk",
                "d_in": 8,
                "d_sae": 16,
                "k": 2,
                "group_fractions": [0.01, 0.99],
            },
            "at least one latent",
        ),
        (
            {
                "architecture": "matryoshka_batch_topk",
                "d_in": 8,
                "d_sae": 64,
                "k": 2,
                "group_fractions": [0.5, 0.5],
                "group_weights": [1.0],
            },
            "one weight per group",
        ),
        ({"architecture": "jumprelu", "d_in": 8, "d_sae": 16, "bandwidth": 0.0}, "bandwidth"),
        (
            {"architecture": "relu", "d_in": 8, "d_sae": 16, "l1_coefficient": -1.0},
            "l1_coefficient",
        ),
        ({"architecture": "gated", "d_in": 8, "d_sae": 16}, "unknown SAE architecture"),
        ({"architecture": "relu", "d_in": 8, "d_sae": 16, "k": 3}, "unknown key"),
        ({"d_in": 8, "d_sae": 16}, "architecture"),
    ],
)
def test_config_errors(d, match):
    with pytest.raises(ConfigError, match=match):
        sae_config_from_dict(d)


def test_wrong_config_class_refused():
    cfg = TopKConfig(d_in=8, d_sae=16, k=2)
    cfg.architecture = "batch_topk"
    with pytest.raises(ConfigError, match="BatchTopKConfig"):
        build_sae(cfg)


# ---- losses vs hand computation ----------------------------------------------------------
def naive_pre(sae, x, subtract=True):
    W, be, bd = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()
    out = torch.zeros(x.shape[0], F)
    for b in range(x.shape[0]):
        xin = x[b] - bd if subtract else x[b]
        for f in range(F):
            out[b, f] = sum(xin[d] * W[d, f] for d in range(D)) + be[f]
    return out


def naive_auxk(residual, aux_recon):
    n = residual.shape[0]
    num = sum(((residual[b] - aux_recon[b]) ** 2).sum() for b in range(n)) / n
    mu = residual.mean(0)
    den = sum(((residual[b] - mu) ** 2).sum() for b in range(n)) / n
    return num / den


def naive_dead_recon(sae, post, dead, d_in):
    k_aux = min(d_in // 2, int(dead.sum()))
    Wd = sae.W_dec.detach()
    rec = torch.zeros(post.shape[0], D)
    for b in range(post.shape[0]):
        cands = sorted(((post[b, f].item(), f) for f in range(F) if dead[f]), reverse=True)[:k_aux]
        for v, f in cands:
            rec[b] += v * Wd[f]
    return rec


@pytest.mark.parametrize("fused", [True, False])
def test_matryoshka_loss_by_hand(fused):
    sae = make("matryoshka_batch_topk", group_weights=[0.5, 0.3, 0.2])
    x = data()[:8]
    dead = torch.zeros(F, dtype=torch.bool)
    dead[40:] = True
    out = sae.training_loss(x, StepContext(0, 10, dead, fused))
    post = naive_pre(sae, x).clamp_min(0)
    # global top-(k*B) over the flattened batch
    vals = sorted(((post[b, f].item(), b, f) for b in range(8) for f in range(F)), reverse=True)[
        : 4 * 8
    ]
    f_sel = torch.zeros(8, F)
    for v, b, f in vals:
        f_sel[b, f] = v
    bounds = [0, 16, 32, 64]
    weights = [0.5, 0.3, 0.2]
    Wd, bd = sae.W_dec.detach(), sae.b_dec.detach()
    losses = []
    for i in range(3):
        x_hat_i = bd + f_sel[:, : bounds[i + 1]] @ Wd[: bounds[i + 1]]
        losses.append(weights[i] * ((x - x_hat_i) ** 2).sum(-1).mean())
    recon = sum(losses) / 3
    x_hat = bd + f_sel @ Wd
    # the reference masks after resetting the latents that fired in this batch
    dead_after = dead & ~(f_sel != 0).any(0)
    aux = naive_auxk(x - x_hat, naive_dead_recon(sae, post, dead_after, D))
    expected = recon + aux / 32
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["auxk_loss"].item() == pytest.approx(aux.item(), rel=1e-5)
    assert torch.allclose(out.x_hat_BD, x_hat, atol=1e-5)
    assert out.metrics["l0"].item() == pytest.approx(4.0)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert out.metrics["fvu"].item() == pytest.approx(fvu.item(), rel=1e-5)
    assert torch.equal(out.fired_F, (f_sel != 0).any(0))
    # per-prefix reconstructions with the batch top-k rule (threshold unset)
    prefixes = sae.prefix_reconstructions(x)
    assert prefixes.shape == (3, 8, D)
    assert torch.allclose(prefixes[1], bd + f_sel[:, :32] @ Wd[:32], atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_topk_loss_by_hand(fused):
    sae = make("topk")
    x = data()[:6]
    out = sae.training_loss(x, StepContext(0, 10, None, fused))
    post = naive_pre(sae, x).clamp_min(0)
    f_sel = torch.zeros_like(post)
    for b in range(6):
        for f in post[b].argsort(descending=True)[:4]:
            f_sel[b, f] = post[b, f]
    x_hat = sae.b_dec.detach() + f_sel @ sae.W_dec.detach()
    expected = ((x - x_hat) ** 2).sum(-1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["auxk_loss"].item() == 0.0
    assert torch.allclose(sae.encode(x), f_sel, atol=1e-6)


def test_batch_topk_loss_by_hand():
    sae = make("batch_topk")
    x = data()[:6]
    out = sae.training_loss(x, StepContext(0, 10, None, True))
    post = naive_pre(sae, x).clamp_min(0)
    kth = post.flatten().sort(descending=True).values[4 * 6 - 1]
    f_sel = post * (post >= kth)
    x_hat = sae.b_dec.detach() + f_sel @ sae.W_dec.detach()
    assert out.loss.item() == pytest.approx(((x - x_hat) ** 2).sum(-1).mean().item(), rel=1e-5)


def test_relu_loss_by_hand_with_warmup():
    sae = make("relu", l1_coefficient=0.3, l1_warmup_frac=0.5)
    x = data()[:6]
    f = naive_pre(sae, x).clamp_min(0)
    x_hat = sae.b_dec.detach() + f @ sae.W_dec.detach()
    recon = ((x - x_hat) ** 2).sum(-1).mean()
    l1 = f.abs().sum(-1).mean()
    for step, scale in [(0, 0.0), (25, 0.5), (50, 1.0), (90, 1.0)]:
        out = sae.training_loss(x, StepContext(step, 100, None, True))
        assert out.loss.item() == pytest.approx((recon + scale * 0.3 * l1).item(), rel=1e-5)


def test_jumprelu_loss_and_threshold_grad_by_hand():
    sae = make(
        "jumprelu",
        bandwidth=0.5,
        target_l0=5.0,
        sparsity_coefficient=2.0,
        init_threshold=0.2,
        sparsity_warmup_steps=10,
    )
    x = data()[:6]
    z = naive_pre(sae, x, subtract=False)
    theta = 0.2
    f = z * (z > theta)
    x_hat = sae.b_dec.detach() + f @ sae.W_dec.detach()
    recon = ((x - x_hat) ** 2).sum(-1).mean()
    l0 = (f > theta).float().sum(-1).mean()
    expected = recon + 2.0 * (l0 / 5.0 - 1) ** 2 * 0.5
    out = sae.training_loss(x, StepContext(5, 100, None, True))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # threshold gradient of the sparsity term alone (zero the recon part via autograd.grad)
    sparsity = out.metrics["sparsity_loss"]
    assert sparsity.item() == pytest.approx((2.0 * (l0 / 5.0 - 1) ** 2 * 0.5).item(), rel=1e-5)
    out.loss.backward()
    # d/dtheta of the L0 STE term: sum_b -(1/bw) rect((f - theta)/bw) / B, times chain factor,
    # plus the JumpReLU STE term through recon: -(theta/bw) rect((z - theta)/bw) * dL/df
    rect = lambda u: ((u > -0.5) & (u < 0.5)).float()  # noqa: E731
    dL_dl0 = 2.0 * 0.5 * 2 * (l0 / 5.0 - 1) / 5.0
    g_l0 = (-(1 / 0.5) * rect((f - theta) / 0.5)).sum(0) / 6 * dL_dl0
    dL_df = (-2 * (x - x_hat) @ sae.W_dec.detach().t()) / 6
    g_jump = (-(theta / 0.5) * rect((z - theta) / 0.5) * dL_df).sum(0)
    assert torch.allclose(sae.threshold.grad, g_l0 + g_jump, atol=1e-5)


# ---- threshold -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["batch_topk", "matryoshka_batch_topk"])
def test_threshold_schedule(arch):
    sae = make(arch, threshold_start_step=3, threshold_beta=0.9)
    x = data()
    for step in range(3):
        sae.training_loss(x, StepContext(step, 10, None, True))
        assert sae.threshold.item() == -1.0  # not before the start step
    with torch.no_grad():
        post = torch.relu(sae.pre_activations(x))
        kth = post.flatten().sort(descending=True).values[4 * B - 1]
    sae.training_loss(x, StepContext(3, 10, None, True))
    assert sae.threshold.item() == pytest.approx(kth.item(), rel=1e-6)  # first update = min
    x2 = data(seed=7)
    with torch.no_grad():
        post2 = torch.relu(sae.pre_activations(x2))
        m2 = post2.flatten().sort(descending=True).values[4 * B - 1]
    sae.training_loss(x2, StepContext(4, 10, None, False))
    assert sae.threshold.item() == pytest.approx(0.9 * kth.item() + 0.1 * m2.item(), rel=1e-6)
    # inference: f * (f > theta), independent of the batch
    f = sae.encode(x2)
    theta = sae.threshold.item()
    assert torch.equal(f, post2 * (post2 > theta))
    assert torch.allclose(sae.encode(x2[:3]), f[:3], atol=1e-6)
    assert "threshold" in sae.state_dict()


# ---- AuxK -------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_auxk_zero_without_dead(fused):
    sae = make("batch_topk")
    x = data()
    for dead in (None, torch.zeros(F, dtype=torch.bool)):
        out = sae.training_loss(x, StepContext(0, 10, dead, fused))
        assert out.metrics["auxk_loss"].item() == 0.0


def test_auxk_kaux_is_capped_by_half_d_in():
    sae = make("topk")
    x = data()[:5]
    dead = torch.ones(F, dtype=torch.bool)  # 64 dead but k_aux = D // 2 = 8
    out = sae.training_loss(x, StepContext(0, 10, dead, True))
    post = naive_pre(sae, x).clamp_min(0)
    f_sel = torch.zeros_like(post)
    for b in range(5):
        for f in post[b].argsort(descending=True)[:4]:
            f_sel[b, f] = post[b, f]
    x_hat = sae.b_dec.detach() + f_sel @ sae.W_dec.detach()
    dead_after = dead & ~(f_sel != 0).any(0)  # latents that fired are not dead
    assert int(dead_after.sum()) > D // 2
    aux = naive_auxk(x - x_hat, naive_dead_recon(sae, post, dead_after, D))
    assert out.metrics["auxk_loss"].item() == pytest.approx(aux.item(), rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_auxk_drops_latents_that_fire_in_the_batch(fused):
    """dictionary_learning counts the batch and resets the latents that fired *before* it
    builds the dead mask: a latent given as a dead candidate that fires now is not dead."""
    sae = make("batch_topk")
    x = data()[:8]
    candidates = torch.ones(F, dtype=torch.bool)  # every latent would be dead after this batch
    out = sae.training_loss(x, StepContext(0, 10, candidates, fused))
    post = naive_pre(sae, x).clamp_min(0)
    dead_after = candidates & ~out.fired_F
    assert 0 < int(out.fired_F.sum()) < F
    x_hat = out.x_hat_BD.detach()
    expected = naive_auxk(x - x_hat, naive_dead_recon(sae, post, dead_after, D))
    stale = naive_auxk(x - x_hat, naive_dead_recon(sae, post, candidates, D))
    assert out.metrics["auxk_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(stale.item() - expected.item()) > 1e-3 * expected.item()  # the order matters


def test_auxk_nan_to_num():
    r = torch.ones(4, 3)  # zero batch variance -> 0/0
    assert normalized_auxk_loss(r, torch.ones(4, 3)).item() == 0.0


# ---- constraints, init, scale folding ----------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoder_unit_norm_invariant(arch):
    sae = make(arch)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = data()
    for step in range(5):
        out = sae.training_loss(x, StepContext(step, 5, None, True))
        out.loss.backward()
        unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
        parallel_before = (sae.W_dec.grad * unit).sum(-1).abs()
        sae.remove_parallel_decoder_grad()
        # the reference's direction row / (||row|| + 1e-6) leaves ~2e-6 of the component
        parallel_after = (sae.W_dec.grad * unit).sum(-1).abs()
        assert (parallel_after <= 3e-6 * parallel_before + 1e-7).all()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(F), atol=1e-6)


def test_geometric_median():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(50, 3, generator=g)
    pts[:5] += 100.0  # outliers: median stays near the bulk, the mean does not
    med = geometric_median(pts)

    def cost(p):
        return (pts - p).norm(dim=1).sum()

    for _ in range(20):
        delta = torch.randn(3, generator=g) * 1e-2
        assert cost(med) <= cost(med + delta) + 1e-4
    assert med.norm() < 1.0 < pts.mean(0).norm()
    sae = make("relu")
    sae.init_from_data(pts.repeat(1, 6)[:, :D])
    assert torch.allclose(sae.b_dec, geometric_median(pts.repeat(1, 6)[:, :D]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_input_scale(arch):
    sae = make(arch)
    if hasattr(sae, "threshold"):
        with torch.no_grad():
            sae.threshold.fill_(0.05) if arch == "jumprelu" else sae.threshold.fill_(0.3)
    x = data()
    s = 3.7
    scaled_out = sae(s * x) / s
    f_scaled = sae.encode(s * x)
    sae.fold_input_scale(s)
    assert torch.allclose(sae(x), scaled_out, atol=1e-5)
    assert torch.allclose(sae.encode(x), f_scaled / s, atol=1e-5)
    with pytest.raises(ConfigError):
        sae.fold_input_scale(0.0)


def test_fold_keeps_unset_threshold():
    sae = make("batch_topk")
    sae.fold_input_scale(2.0)
    assert sae.threshold.item() == -1.0


def test_configs_construct_directly():
    assert BatchTopKConfig(d_in=4, d_sae=8, k=2).architecture == "batch_topk"
    assert ReLUConfig(d_in=4, d_sae=8).architecture == "relu"
    assert JumpReLUConfig(d_in=4, d_sae=8).architecture == "jumprelu"
    assert math.isclose(TopKConfig(d_in=4, d_sae=8, k=2).auxk_alpha, 1 / 32)


def test_remove_parallel_decoder_grad_matches_the_reference_rule():
    # dictionary_learning: g <- g - (g . u) u with u = row / (|row| + 1e-6) (rows not unit here)
    sae = make("batch_topk")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(F, 1, generator=g) + 0.5)
    grad = torch.randn(sae.W_dec.shape, generator=g)
    sae.W_dec.grad = grad.clone()
    known = sae.remove_parallel_decoder_grad()
    unit = sae.W_dec.detach() / (sae.W_dec.detach().norm(dim=-1, keepdim=True) + 1e-6)
    expected = grad - (grad * unit).sum(-1, keepdim=True) * unit
    assert torch.allclose(sae.W_dec.grad, expected, atol=1e-6)
    # the C pass hands the new gradient's squared norm on (for the clip); torch's pass none
    for norm in known:
        assert norm.holds_for(sae.W_dec.grad)
        assert torch.allclose(norm.sq_norm, expected.square().sum(), rtol=1e-5)
    assert len(known) == (1 if native.enabled_for(sae.W_dec) else 0)
