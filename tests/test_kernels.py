"""Fused sparse path vs the dense reference: primitives, outputs, losses and all gradients."""

from __future__ import annotations

import pytest
import torch

from masksae.train.kernels import make_plan, ops_torch, selected_preacts, sparse_decode
from masksae.train.kernels.prefix import prefix_squared_errors
from masksae.train.sae import ARCHITECTURES, StepContext, build_sae, sae_config_from_dict
from masksae.train.sae.selection import batch_topk_select, topk_select

D, F, B = 32, 128, 64


def make(arch: str, dtype=torch.float32):
    torch.manual_seed(0)
    d = {"architecture": arch, "d_in": D, "d_sae": F}
    if arch in ("topk", "batch_topk", "matryoshka_batch_topk"):
        d["k"] = 6
    sae = build_sae(sae_config_from_dict(d))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
    return sae.to(dtype)


def run(sae, x, fused, dead, autocast=False, want_metrics=True):
    sae.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ctx = StepContext(5, 10, dead, fused, want_metrics=want_metrics)
        out = sae.training_loss(x, ctx)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in sae.named_parameters()}
    return out, grads


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "torch-only"])
def test_fused_matches_dense_fp32(arch, with_dead, native, monkeypatch):
    # "native": the CPU C kernels where a compiler is present; "torch-only": the PyTorch
    # kernels a machine without one runs
    monkeypatch.setenv("MASKSAE_NATIVE_KERNELS", native)
    sae = make(arch)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(3)) * 2
    dead = None
    if with_dead:
        dead = torch.zeros(F, dtype=torch.bool)
        dead[::3] = True
    fo, fg = run(sae, x, True, dead)
    do, dg = run(sae, x, False, dead)
    assert torch.allclose(fo.loss, do.loss, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fo.x_hat_BD, do.x_hat_BD, atol=1e-5)
    assert torch.equal(fo.fired_F, do.fired_F)
    for key in do.metrics:
        assert torch.allclose(fo.metrics[key], do.metrics[key], rtol=1e-5, atol=1e-6), key
    if with_dead and arch in ("topk", "batch_topk", "matryoshka_batch_topk"):
        assert do.metrics["auxk_loss"] > 0
    for name, g in dg.items():
        if name != "threshold":  # JumpReLU's STE gradient is rarely nonzero at bandwidth 1e-3
            assert g.abs().max() > 0, name
        assert torch.allclose(fg[name], g, rtol=1e-5, atol=1e-5), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("fused", [True, False])
def test_a_step_without_metrics_is_the_same_step(arch, fused):
    # between logging steps the trainer asks for no metrics: the loss, the latents that fired
    # and every gradient are those of a step that computes them
    sae = make(arch)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(6)) * 2
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::5] = True
    full, full_grads = run(sae, x, fused, dead)
    lean, lean_grads = run(sae, x, fused, dead, want_metrics=False)
    assert full.metrics and lean.metrics == {}
    assert torch.equal(lean.loss, full.loss) and torch.equal(lean.fired_F, full.fired_F)
    if fused and arch in ("topk", "batch_topk", "matryoshka_batch_topk"):
        assert lean.x_hat_BD is None  # not needed by the fused loss: not computed
    for name, g in full_grads.items():
        assert torch.equal(lean_grads[name], g), name


@pytest.mark.parametrize("arch", ["matryoshka_batch_topk", "batch_topk", "topk"])
def test_fused_under_autocast_selects_in_bf16_and_computes_in_fp32(arch):
    # bf16 autocast lowers the fused path's selection product only; the chosen entries are
    # re-ranked and recomputed in fp32, so the step equals the fp32 reference. The dense path
    # runs everything in bf16 and agrees only within bf16 tolerance.
    sae = make(arch)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(4))
    dead = torch.zeros(F, dtype=torch.bool)
    dead[1::4] = True
    fo, fg = run(sae, x, True, dead, autocast=True)
    ro, rg = run(sae, x, False, dead, autocast=False)
    do, dg = run(sae, x, False, dead, autocast=True)
    assert torch.allclose(fo.loss, ro.loss, rtol=1e-5)
    assert torch.allclose(fo.x_hat_BD, ro.x_hat_BD, atol=1e-5)
    assert torch.equal(fo.fired_F, ro.fired_F)
    assert torch.allclose(do.loss.float(), ro.loss, rtol=2e-2)
    for name, g in rg.items():
        assert torch.allclose(fg[name], g, rtol=1e-4, atol=1e-5), name
        rel = (dg[name].float() - g).norm() / g.norm()
        assert rel < 6e-2, (name, rel.item())


def test_bf16_weights_fused_matches_dense():
    sae = make("batch_topk", dtype=torch.bfloat16)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(5)).bfloat16()
    fo, fg = run(sae, x, True, None)
    do, dg = run(sae, x, False, None)
    assert torch.allclose(fo.loss.float(), do.loss.float(), rtol=2e-2)
    for name, g in dg.items():
        assert fg[name].dtype == torch.bfloat16
        rel = (fg[name].float() - g.float()).norm() / g.float().norm()
        assert rel < 3e-2, (name, rel.item())


def test_primitives_vs_naive():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(20, 7, generator=g)
    offsets = torch.tensor([0, 3, 3, 8, 12])
    cols = torch.randint(0, 20, (12,), generator=g)
    w = torch.randn(12, generator=g)
    out = ops_torch.segment_gather_sum(offsets, cols, w, table)
    for s in range(4):
        ref = sum(
            (w[e] * table[cols[e]] for e in range(offsets[s], offsets[s + 1])), torch.zeros(7)
        )
        assert torch.allclose(out[s], ref, atol=1e-6)
    A = torch.randn(4, 7, generator=g)
    rows = torch.tensor([0, 0, 1, 3, 3, 3])
    cols = torch.tensor([2, 5, 0, 1, 4, 19])
    offs = torch.tensor([0, 2, 3, 3, 6])
    got = ops_torch.pair_dot(A, rows, offs, cols, table)
    assert torch.allclose(got, (A[rows] * table[cols]).sum(-1), atol=1e-6)


def test_autograd_pair_vs_dense():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 8, generator=g)
    W_enc = torch.randn(8, 24, generator=g, requires_grad=True)
    b_enc = torch.randn(24, generator=g, requires_grad=True)
    b_dec = torch.randn(8, generator=g, requires_grad=True)
    W_dec = torch.randn(24, 8, generator=g, requires_grad=True)
    target = torch.randn(10, 8, generator=g)

    def loss_of(fused):
        for p in (W_enc, b_enc, b_dec, W_dec):
            p.grad = None
        post = torch.relu((x - b_dec) @ W_enc + b_enc)
        sel = topk_select(post.detach(), 5)
        if fused:
            plan = make_plan(sel.rows_N, sel.lat_N, n_rows=10, n_latents=24)
            vals = selected_preacts(sel.vals_N, x, W_enc, b_enc, b_dec, plan)
            rec = sparse_decode(vals, W_dec, plan)
        else:
            mask = torch.zeros_like(post, dtype=torch.bool)
            mask[sel.rows_N, sel.lat_N] = True
            rec = (post * mask) @ W_dec
        loss = ((rec - target) ** 2).sum()
        loss.backward()
        return loss, [p.grad.clone() for p in (W_enc, b_enc, b_dec, W_dec)]

    lf, gf = loss_of(True)
    ld, gd = loss_of(False)
    assert torch.allclose(lf, ld, rtol=1e-6)
    for a, b in zip(gf, gd, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batch_topk_select_exact_large():
    # large enough to take the sampled pre-filter path
    g = torch.Generator().manual_seed(2)
    post = torch.relu(torch.randn(256, 2048, generator=g))
    sel = batch_topk_select(post, 20 * 256)
    ref = post.flatten().topk(20 * 256).values.sort().values
    assert torch.equal(sel.vals_N.sort().values, ref)
    key = sel.rows_N * 2048 + sel.lat_N
    assert torch.all(key[1:] > key[:-1])  # (row, latent) order
    small = batch_topk_select(post[:4, :16], 5)
    assert torch.equal(
        small.vals_N.sort().values, post[:4, :16].flatten().topk(5).values.sort().values
    )


@pytest.mark.parametrize("G", [1, 4])
def test_prefix_squared_errors_vs_autograd(G):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 5, generator=g, requires_grad=True)
    b_dec = torch.randn(5, generator=g, requires_grad=True)
    parts = torch.randn(9, G, 5, generator=g, requires_grad=True)
    w = torch.randn(9, G, generator=g)
    err, resid = prefix_squared_errors(x, b_dec, parts)
    (err * w).sum().backward()
    got = [t.grad.clone() for t in (x, b_dec, parts)]
    for t in (x, b_dec, parts):
        t.grad = None
    x_hat = b_dec + parts.cumsum(dim=1)  # [9, G, 5]: every prefix by hand
    ref = (x[:, None, :] - x_hat).pow(2).sum(-1)
    (ref * w).sum().backward()
    assert torch.allclose(err, ref, rtol=1e-5)
    assert torch.allclose(resid, (x - x_hat[:, -1]).detach(), atol=1e-6)
    assert not resid.requires_grad
    for a, t in zip(got, (x, b_dec, parts), strict=True):
        assert torch.allclose(a, t.grad, rtol=1e-5, atol=1e-6)


def test_two_fused_forwards_before_one_backward_are_refused():
    # the fused step keeps its residual in the thread's reused buffer; a second forward
    # overwrites it, and autograd's in-place check refuses the first backward (no silent
    # wrong gradients)
    sae = make("matryoshka_batch_topk")
    g = torch.Generator().manual_seed(8)
    x1, x2 = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    first = sae.training_loss(x1, StepContext(0, 1, None, True))
    second = sae.training_loss(x2, StepContext(0, 1, None, True))
    second.loss.backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.loss.backward()
