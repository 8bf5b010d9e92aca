"""LayoutAdam: the same updates and state as torch's Adam, without the layout copies."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from masksae.train.optim import KnownGradNorm, LayoutAdam, clip_grad_norm, make_adam


def _latent_major(F: int, D: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(F, D, generator=g).t()  # [D, F] with strides (1, D), like W_enc


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_layout_adam_equals_adam_bit_for_bit(fused: bool, amsgrad: bool) -> None:
    D, F = 12, 40
    ours = [torch.nn.Parameter(_latent_major(F, D, 0).clone()), torch.nn.Parameter(torch.randn(F))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    assert ours[0].stride() == (1, D) and ref[0].stride() == (1, D)
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "amsgrad": amsgrad, "fused": fused}
    opt, ref_opt = LayoutAdam(ours, **kw), torch.optim.Adam(ref, **kw)
    for step in range(5):
        grads = [_latent_major(F, D, 10 + step), torch.randn(F)]
        for p, q, g in zip(ours, ref, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref, strict=True):
            assert torch.equal(p, q)
            assert p.shape == q.shape and p.stride() == q.stride()  # layout kept
            assert p.grad.shape == p.shape
    for p, q in zip(ours, ref, strict=True):
        for key, value in ref_opt.state[q].items():
            assert opt.state[p][key].shape == value.shape
            assert torch.equal(opt.state[p][key], value)


def test_layout_adam_state_dict_round_trip() -> None:
    D, F = 8, 24
    p = torch.nn.Parameter(_latent_major(F, D, 1).clone())
    opt = make_adam([p], 1e-3, (0.9, 0.999), torch.device("cpu"))
    assert isinstance(opt, LayoutAdam)
    p.grad = _latent_major(F, D, 2)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # state_dict() returns the live tensors
    assert saved["state"][0]["exp_avg"].shape == (D, F)
    q = torch.nn.Parameter(p.detach().clone())
    fresh = make_adam([q], 1e-3, (0.9, 0.999), torch.device("cpu"))
    fresh.load_state_dict(saved)
    g = _latent_major(F, D, 3)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    fresh.step()
    assert torch.equal(p, q)


def test_layout_adam_skips_a_gradient_in_another_layout() -> None:
    D, F = 6, 10
    p = torch.nn.Parameter(_latent_major(F, D, 4).clone())
    q = torch.nn.Parameter(p.detach().clone())
    opt, ref = LayoutAdam([p], lr=1e-2), torch.optim.Adam([q], lr=1e-2)
    g = torch.randn(D, F)  # contiguous, not the parameter's layout
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    assert torch.equal(p, q) and p.stride() == (1, D)


def test_layout_adam_runs_a_closure_on_the_real_shapes() -> None:
    D, F = 5, 9
    p = torch.nn.Parameter(_latent_major(F, D, 5).clone())
    q = torch.nn.Parameter(p.detach().clone())
    x = torch.randn(3, D)
    opt, ref = LayoutAdam([p], lr=1e-2), torch.optim.Adam([q], lr=1e-2)

    def closure_for(param, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = (x @ param).square().sum()  # needs param as [D, F]
            loss.backward()
            return loss

        return closure

    assert torch.equal(opt.step(closure_for(p, opt)), ref.step(closure_for(q, ref)))
    assert torch.equal(p, q) and p.shape == (D, F)


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_clip_grad_norm_is_torchs(scale):
    # below the limit (the rescale skipped) and above it (rescaled), with a gradient stored
    # transposed like W_enc's: torch's results
    g = torch.Generator().manual_seed(4)
    shapes = [(30, 8), (8,), (8, 30)]
    grads = [torch.randn(s, generator=g) * scale for s in shapes]
    grads.append(torch.randn(30, 8, generator=g).t() * scale)  # [8, 30] in [30, 8] storage
    ours = [torch.zeros(gr.shape, requires_grad=True) for gr in grads]
    theirs = [torch.zeros(gr.shape, requires_grad=True) for gr in grads]
    for a, b, gr in zip(ours, theirs, grads, strict=True):
        a.grad, b.grad = gr.clone(memory_format=torch.preserve_format), gr.clone()
    assert not ours[-1].grad.is_contiguous()
    total = clip_grad_norm(iter(ours), 1.0)
    total_ref = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert torch.allclose(total, total_ref, rtol=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
        if scale < 1:
            assert torch.equal(a.grad, b.grad)  # untouched, as torch's x 1.0 leaves them
    assert (float(total) > 1.0) == (scale == 10.0)


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_clip_grad_norm_takes_known_norms_while_current(scale):
    # a known squared norm stands in for reading its gradient; one the gradient has changed
    # since (in place, or replaced) is ignored
    g = torch.Generator().manual_seed(6)
    grads = [torch.randn(s, generator=g) * scale for s in [(40, 8), (8,), (12, 8)]]
    ref = [torch.zeros(gr.shape, requires_grad=True) for gr in grads]
    for p, gr in zip(ref, grads, strict=True):
        p.grad = gr.clone()
    total_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)

    def params():
        ps = [torch.zeros(gr.shape, requires_grad=True) for gr in grads]
        for p, gr in zip(ps, grads, strict=True):
            p.grad = gr.clone()
        return ps

    ours = params()
    known = [KnownGradNorm(ours[0].grad, ours[0].grad.square().sum(), ours[0].grad._version)]
    read = []
    real_norm = torch.nn.utils.get_total_norm
    spy = lambda ts, *a, **k: read.append(len(ts)) or real_norm(ts, *a, **k)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.utils, "get_total_norm", spy)
        total = clip_grad_norm(ours, 1.0, known)
    assert read == [2]  # the other two only
    assert torch.allclose(total, total_ref, rtol=1e-6)
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
    # stale: the gradient doubled in place after its norm was taken
    stale = params()
    known = [KnownGradNorm(stale[0].grad, stale[0].grad.square().sum(), stale[0].grad._version)]
    stale[0].grad.mul_(2)
    twice = params()
    twice[0].grad.mul_(2)
    assert torch.allclose(clip_grad_norm(stale, 1.0, known), clip_grad_norm(twice, 1.0), rtol=1e-6)


def _counted(fn, calls, *args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)


def test_clip_factor_applied_by_the_fused_step_instead_of_a_pass():
    # above the limit: the fused CPU LayoutAdam multiplies the gradients by the clip factor
    # in its kernel; parameters, moments and the gradients left behind match torch's clip
    # followed by its Adam step
    g = torch.Generator().manual_seed(8)
    W = torch.randn(12, 30, generator=g).t()  # stored transposed, like W_enc
    b = torch.randn(12, generator=g)
    grads = [torch.randn(12, 30, generator=g).mul(10).t(), torch.randn(12, generator=g) * 10]

    def setup():
        params = [torch.nn.Parameter(W.clone(memory_format=torch.preserve_format)),
                  torch.nn.Parameter(b.clone())]  # fmt: skip
        opt = make_adam(params, 1e-2, (0.9, 0.999), torch.device("cpu"))
        return params, opt

    ours, opt = setup()
    theirs, ref = setup()
    for step in range(3):
        for p, q, gr in zip(ours, theirs, grads, strict=True):
            p.grad = gr.clone(memory_format=torch.preserve_format) * (step + 1)
            q.grad = gr.clone(memory_format=torch.preserve_format) * (step + 1)
        passes = []
        real = torch.nn.utils.clip_grads_with_norm_
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(
                torch.nn.utils, "clip_grads_with_norm_", functools.partial(_counted, real, passes)
            )
            total = clip_grad_norm(ours, 1.0, optimizer=opt)
        total_ref = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        assert float(total) > 1 and not passes  # no separate rescale pass
        assert torch.allclose(total, total_ref, rtol=1e-6)
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs, strict=True):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
            assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)  # clipped, as torch's
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-9)


def test_a_pending_clip_factor_ends_with_its_gradients():
    p = torch.nn.Parameter(torch.ones(4))
    opt = make_adam([p], 0.1, (0.9, 0.999), torch.device("cpu"))
    other = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 100.0)
    other.grad = torch.full((4,), 100.0)
    # the optimizer does not step `other`: the clip rescales the gradients itself
    clip_grad_norm([p, other], 1.0, optimizer=opt)
    assert opt._grad_factor is None and float(p.grad.norm()) < 1.0 + 1e-5
    p.grad = torch.full((4,), 100.0)
    clip_grad_norm([p], 1.0, optimizer=opt)
    assert opt._grad_factor is not None and float(p.grad[0]) == 100.0  # left to the step
    opt.zero_grad()  # new gradients: the factor is gone
    assert opt._grad_factor is None
    p.grad = torch.full((4,), 1e-3)
    before = p.detach().clone()
    opt.step()  # an unclipped step: Adam's first step moves every entry by ~lr
    assert torch.allclose(before - p.detach(), torch.full((4,), 0.1), rtol=1e-3)


def test_an_amp_grad_scale_is_kept_and_combined_with_the_clip_factor():
    # torch.amp's GradScaler sets grad_scale on a fused optimizer around its step: a pending
    # clip factor combines with it, and the attribute is left as the caller set it
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(3))
    opt = make_adam([p], 0.1, (0.9, 0.999), torch.device("cpu"))
    ref = make_adam([q], 0.1, (0.9, 0.999), torch.device("cpu"))
    p.grad = torch.tensor([400.0, -200.0, 100.0])
    q.grad = p.grad * (0.5 / 4.0)
    opt.grad_scale = torch.tensor(4.0)
    opt.scale_grads(torch.tensor(0.5))
    opt.step()
    ref.step()
    assert float(opt.grad_scale) == 4.0
    assert torch.allclose(p.grad, q.grad) and torch.allclose(p, q)
