"""The CPU C kernels (masksae.train.kernels.native) against PyTorch references, and the
fallback when they cannot be built."""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys

import pytest
import torch

from masksae.train.kernels import make_plan, native, ops_torch, sparse_decode
from masksae.train.kernels.prefix import decoded_prefix_errors, prefix_squared_errors
from masksae.train.kernels.sparse_step import sparse_decode_errors, sparse_prefix_errors
from masksae.train.sae.selection import _greater

# skipped only without a compiler: where one exists a library that fails to build (a broken
# native_cpu.c) must fail these tests, not skip them
needs_native = pytest.mark.skipif(
    native._compiler() is None, reason="no C compiler: the native kernels cannot be built"
)


@needs_native
def test_the_library_builds_where_a_compiler_exists():
    assert native.library() is not None, "native_cpu.c did not compile: see the warning above"


def _selection(B: int, F: int, k_max: int, G: int, g: torch.Generator):
    """A random (row, latent)-sorted selection with 0..k_max entries per row (some rows and
    so some bags empty), and its plan with G equal latent groups."""
    rows, lats = [], []
    for b in range(B):
        n = int(torch.randint(0, k_max + 1, (1,), generator=g))
        chosen = torch.randperm(F, generator=g)[:n].sort().values
        rows.append(torch.full((n,), b))
        lats.append(chosen)
    rows_N, lat_N = torch.cat(rows), torch.cat(lats)
    group_of_F = torch.arange(F) * G // F
    plan = make_plan(rows_N, lat_N, n_rows=B, n_latents=F, group_of_F=group_of_F, n_groups=G)
    return plan


def _prefix_case(B, F, D, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    plan = _selection(B, F, 12, G, g)
    vals = torch.rand(plan.lat_N.numel(), generator=g).requires_grad_()
    x = torch.randn(B, D, generator=g).requires_grad_()
    b_dec = torch.randn(D, generator=g).mul(0.1).requires_grad_()
    W_dec = torch.randn(F, D, generator=g).mul(0.2).requires_grad_()
    w_BG = torch.rand(B, G, generator=g)
    return plan, (vals, x, b_dec, W_dec), w_BG


def _run_prefix(plan, leaves, w_BG, G, native_on: bool, monkeypatch):
    monkeypatch.setenv("MASKSAE_NATIVE_KERNELS", "1" if native_on else "0")
    for t in leaves:
        t.grad = None
    vals, x, b_dec, W_dec = leaves
    err, resid = decoded_prefix_errors(vals, x, b_dec, W_dec, plan, G)
    (err * w_BG).sum().backward()
    return err.detach(), resid.clone(), [t.grad.clone() for t in leaves]


@needs_native
@pytest.mark.parametrize(("D", "G"), [(37, 1), (37, 3), (64, 4), (200, 2)])
def test_prefix_decode_matches_the_pytorch_kernels(D, G, monkeypatch):
    # D 37 and 200 exercise the tails after the 16-wide partial sums; empty bags included
    plan, leaves, w_BG = _prefix_case(B=150, F=96, D=D, G=G)
    err_n, resid_n, grads_n = _run_prefix(plan, leaves, w_BG, G, True, monkeypatch)
    err_t, resid_t, grads_t = _run_prefix(plan, leaves, w_BG, G, False, monkeypatch)
    assert torch.allclose(err_n, err_t, rtol=1e-5, atol=1e-5)
    assert torch.allclose(resid_n, resid_t, atol=1e-5)
    for name, a, b in zip(("vals", "x", "b_dec", "W_dec"), grads_n, grads_t, strict=True):
        assert b.abs().max() > 0, name
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), name


@needs_native
@pytest.mark.parametrize(("D", "G"), [(37, 1), (37, 3), (200, 2), (64, 4)])
def test_forward_with_suffix_table_matches_forward_then_backward(D, G):
    # given the expected gradient and a suffix table, the forward keeps only the last
    # residual and writes the backward's inputs: bit for bit what the plain forward and
    # prefix_decode_backward compute from all the residuals (rows of 37 floats are copied
    # plainly, of 200 and 64 with 256- / 512-bit non-temporal stores where the CPU has them)
    plan, (vals, x, b_dec, W_dec), w_BG = _prefix_case(B=150, F=96, D=D, G=G)
    vals, x, b_dec, W_dec = (t.detach() for t in (vals, x, b_dec, W_dec))
    B, N = x.shape[0], vals.numel()
    resid, err = torch.empty(B, G, D), torch.empty(B, G)
    native.prefix_decode_forward(x, b_dec, plan.bag_offsets, plan.lat_N, vals, W_dec, resid, err)
    parts, grad_vals = torch.empty(B, G, D), torch.empty(N)
    native.prefix_decode_backward(
        resid, w_BG, plan.bag_offsets, plan.lat_N, W_dec, parts, grad_vals
    )
    last, err2, suffix = torch.empty(B, D), torch.empty(B, G), torch.full((B, G, D), float("nan"))
    known = native.prefix_decode_forward(
        x, b_dec, plan.bag_offsets, plan.lat_N, vals, W_dec, last, err2, w_BG, suffix
    )
    assert torch.equal(err2, err) and torch.equal(last, resid[:, -1])
    assert torch.equal(suffix, parts) and torch.equal(known, grad_vals)
    with pytest.raises(ValueError, match="shapes"):  # a [B, G, D] resid with a suffix table
        native.prefix_decode_forward(
            x, b_dec, plan.bag_offsets, plan.lat_N, vals, W_dec, resid, err2, w_BG, suffix
        )
    with pytest.raises(ValueError, match="expected gradient"):
        native.prefix_decode_forward(
            x, b_dec, plan.bag_offsets, plan.lat_N, vals, W_dec, last, err2, None, suffix
        )


def _run_sparse_step(
    plan, G, params, x, sel_vals, subtract, native_on, monkeypatch, expected=None, scale=1.0
):
    monkeypatch.setenv("MASKSAE_NATIVE_KERNELS", "1" if native_on else "0")
    for p in params:
        p.grad = None
    err, resid = sparse_prefix_errors(
        sel_vals, x, *params, plan, G, subtract_b_dec=subtract, expected_grad_err_BG=expected
    )
    w_BG = torch.linspace(0.5, 1.5, err.numel()).view_as(err)
    ((err * w_BG).sum() * scale).backward()  # d loss / d err = scale * w_BG
    return err.detach(), resid.clone(), [p.grad.clone() for p in params]


def _step_case(B, F, D, G, *, per_token, seed):
    """(plan, [W_enc (latent-major), b_enc, b_dec, W_dec] with grad, x, selected values) of a
    random fused-step selection."""
    g = torch.Generator().manual_seed(seed)
    plan = _selection(B, F, per_token, G, g)
    W_enc = torch.randn(F, D, generator=g).mul(0.1).t().requires_grad_()  # latent-major
    b_enc = torch.randn(F, generator=g).mul(0.1).requires_grad_()
    b_dec = torch.randn(D, generator=g).mul(0.1).requires_grad_()
    W_dec = torch.randn(F, D, generator=g).mul(0.2).requires_grad_()
    x = torch.randn(B, D, generator=g)
    sel_vals = torch.rand(plan.lat_N.numel(), generator=g)
    return plan, [W_enc, b_enc, b_dec, W_dec], x, sel_vals


def _spy_known_grad_vals(monkeypatch) -> list[bool]:
    """Per one-pass backward from now on: whether it was handed the forward's dot products
    (and, with them, its suffix gradients instead of the residuals)."""
    used = []
    backward = native.sparse_backward_by_latent

    def spy(*args):
        known_vals, known_suffix = (a is not None for a in args[-2:])
        assert known_vals == known_suffix and (args[0] is None) == known_suffix
        used.append(known_vals)
        return backward(*args)

    monkeypatch.setattr(native, "sparse_backward_by_latent", spy)
    return used


@needs_native
@pytest.mark.parametrize("G", [1, 3])
def test_backward_dot_products_precomputed_in_the_forward(G, monkeypatch):
    # told the gradient its loss will send back, the forward computes the backward's dot
    # products; the backward uses them when that gradient arrives (same gradients as
    # without them) and computes them itself for any other (a scaled loss here)
    B = 250
    plan, params, x, sel_vals = _step_case(B, 180, 36, G, per_token=14, seed=19)
    expected = torch.linspace(0.5, 1.5, B * G).view(B, G)  # the loss's own gradient
    used = _spy_known_grad_vals(monkeypatch)
    run = functools.partial(_run_sparse_step, plan, G, params, x, sel_vals, True, True)
    plain = run(monkeypatch)
    spec = run(monkeypatch, expected=expected)
    scaled = run(monkeypatch, expected=expected, scale=2.0)
    assert used == [False, True, False]
    assert torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1])
    for a, b, c in zip(plain[2], spec[2], scaled[2], strict=True):
        assert torch.allclose(b, a, rtol=1e-6, atol=1e-6)
        assert torch.allclose(c, 2 * a, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("subtract", [True, False])
@pytest.mark.parametrize("G", [1, 3])
def test_one_pass_sparse_backward_matches_the_two_pass_one(subtract, G, monkeypatch):
    # the whole step's sparse backward split by latent (sparse_step.py) against
    # selected_preacts + decoded_prefix_errors on the PyTorch kernels: all four gradients
    plan, params, x, sel_vals = _step_case(300, 200, 40, G, per_token=15, seed=13)
    W_enc = params[0]
    sel_vals[::4] = 0.0  # selected at zero: no gradient into the encoder through the ReLU
    on = _run_sparse_step(plan, G, params, x, sel_vals, subtract, True, monkeypatch)
    off = _run_sparse_step(plan, G, params, x, sel_vals, subtract, False, monkeypatch)
    assert torch.allclose(on[0], off[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(on[1], off[1]) or torch.allclose(on[1], off[1], atol=1e-5)
    for name, a, b in zip(("W_enc", "b_enc", "b_dec", "W_dec"), on[2], off[2], strict=True):
        assert b.abs().max() > 0, name
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name
    assert on[2][0].stride() == W_enc.stride()  # the gradient keeps W_enc's layout


@needs_native
@pytest.mark.parametrize("subtract", [True, False])
def test_auxk_decode_errors_match_the_pytorch_path(subtract, monkeypatch):
    # AuxK's reconstruction of a detached target from its own selection: the sparse step's
    # kernels against selected_preacts + sparse_decode; b_dec only through the encoder
    g = torch.Generator().manual_seed(17)
    B, F, D = 200, 300, 24
    plan = _selection(B, F, 30, 1, g)
    W_enc = torch.randn(F, D, generator=g).mul(0.1).t().requires_grad_()
    b_enc = torch.randn(F, generator=g).mul(0.1).requires_grad_()
    b_dec = torch.randn(D, generator=g).mul(0.1).requires_grad_()
    W_dec = torch.randn(F, D, generator=g).mul(0.2).requires_grad_()
    params = [W_enc, b_enc, b_dec, W_dec]
    x, target = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    sel_vals = torch.rand(plan.lat_N.numel(), generator=g)
    runs = []
    for native_on in ("1", "0"):
        monkeypatch.setenv("MASKSAE_NATIVE_KERNELS", native_on)
        for p in params:
            p.grad = None
        err = sparse_decode_errors(sel_vals, x, *params, plan, target, subtract_b_dec=subtract)
        (err * torch.linspace(0.5, 1.5, B)).sum().backward()
        runs.append(
            (err.detach(), [torch.zeros_like(p) if p.grad is None else p.grad for p in params])
        )
    (err_n, grads_n), (err_t, grads_t) = runs
    assert (b_dec.grad is None) != subtract  # b_dec unused without the subtraction
    assert torch.allclose(err_n, err_t, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("W_enc", "b_enc", "b_dec", "W_dec"), grads_n, grads_t, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name
    assert bool(grads_n[2].abs().max() > 0) == subtract  # encoder side only


@needs_native
def test_prefix_decode_matches_a_float64_hand_computation(monkeypatch):
    G, D, F = 3, 19, 30
    plan, leaves, w_BG = _prefix_case(B=40, F=F, D=D, G=G, seed=3)
    err, resid, grads = _run_prefix(plan, leaves, w_BG, G, True, monkeypatch)
    vals, x, b_dec, W_dec = (t.detach().double().requires_grad_() for t in leaves)
    # every prefix by hand: dense [B, F] codes, groups as latent ranges
    f_BF = torch.zeros(40, F, dtype=torch.float64)
    f_BF = f_BF.index_put((plan.rows_N, plan.lat_N), vals)
    group_of_F = torch.arange(F) * G // F
    ref = []
    for i in range(G):
        keep_F = (group_of_F <= i).double()
        ref.append((x - b_dec - (f_BF * keep_F) @ W_dec).pow(2).sum(-1))
    ref_BG = torch.stack(ref, dim=1)
    (ref_BG * w_BG.double()).sum().backward()
    assert torch.allclose(err.double(), ref_BG, rtol=1e-5)
    assert torch.allclose(resid.double(), (x - b_dec - f_BF @ W_dec).detach(), atol=1e-5)
    for a, t in zip(grads, (vals, x, b_dec, W_dec), strict=True):
        assert torch.allclose(a.double(), t.grad, rtol=1e-4, atol=1e-4)


@needs_native
def test_split_across_threads_gives_the_same_bits(monkeypatch):
    # each token is computed by one thread whatever the split: results are bit-identical
    plan, leaves, w_BG = _prefix_case(B=300, F=64, D=48, G=2, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_prefix(plan, leaves, w_BG, 2, True, monkeypatch)
        torch.set_num_threads(3)
        three = _run_prefix(plan, leaves, w_BG, 2, True, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    for a, b in zip(one[2], three[2], strict=True):
        assert torch.equal(a, b)


@needs_native
def test_bad_indices_are_refused_not_read():
    B, G, D, F = 4, 1, 8, 10
    resid, err = torch.empty(B, G, D), torch.empty(B, G)
    x, b_dec, W = torch.zeros(B, D), torch.zeros(D), torch.zeros(F, D)
    offsets = torch.tensor([0, 1, 2, 3, 4])
    vals = torch.ones(4)
    with pytest.raises(ValueError, match="latent indices outside"):
        native.prefix_decode_forward(
            x, b_dec, offsets, torch.tensor([0, 1, 2, F]), vals, W, resid, err
        )
    with pytest.raises(ValueError, match="bag_offsets"):
        native.prefix_decode_forward(
            x, b_dec, offsets[:-1], torch.tensor([0, 1, 2]), vals[:3], W, resid, err
        )
    with pytest.raises(ValueError, match="float32"):
        native.prefix_decode_forward(
            x.double(), b_dec, offsets, torch.tensor([0, 1, 2, 3]), vals, W, resid, err
        )


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 63, 64, 4099, 1 << 17])
def test_greater_scan_matches_compare_and_nonzero(dtype, n):
    g = torch.Generator().manual_seed(n)
    flat = torch.randn(n, generator=g).to(dtype)
    flat[:: max(1, n // 7)] = 0.0
    for t in (0.0, 1.5, 3.0):
        cut = torch.tensor(t, dtype=dtype)
        want = (flat > cut).nonzero().squeeze(1)
        got, vals = _greater(flat, cut, None)
        assert torch.equal(got, want), (t, got.numel(), want.numel())
        assert torch.equal(vals, flat[want])  # the values the scan read, bit for bit
    as_int = flat.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
    # more hits than the capacity: None, so the caller counts another way
    assert native.greater(as_int, 0, capacity=1) is None or int((flat > 0).sum()) <= 1


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return set()


@needs_native
@pytest.mark.parametrize(
    "march, cpu_flag", [("-march=native", None), ("-march=haswell", "avx2"), ("", None)]
)
def test_each_instruction_set_variant_of_the_scan(tmp_path, march, cpu_flag):
    # the scan has AVX-512BW, AVX2 and portable forms chosen at compile time; this machine's
    # build tests one of them, so build the others here and check each one directly
    if cpu_flag and cpu_flag not in _cpu_flags():
        pytest.skip(f"this CPU has no {cpu_flag}")
    lib_path = tmp_path / "scan.so"
    cmd = [*native._compiler(), *native._FLAGS, *([march] if march else []), "-o", str(lib_path)]
    proc = subprocess.run([*cmd, str(native.SOURCE), "-lm"], capture_output=True, text=True)
    if proc.returncode != 0 and march == "-march=haswell":
        pytest.skip(f"the compiler does not take {march}")
    assert proc.returncode == 0, proc.stderr
    lib = ctypes.CDLL(str(lib_path))
    g = torch.Generator().manual_seed(0)
    for name, dtype, int_dtype, ctype in (
        ("greater_i16", torch.bfloat16, torch.int16, ctypes.c_int16),
        ("greater_i32", torch.float32, torch.int32, ctypes.c_int32),
    ):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int64
        ptr = ctypes.c_void_p
        fn.argtypes = [ctypes.c_int64] * 2 + [ptr, ctype, ptr, ptr, ctypes.c_int64]
        flat = torch.randn(5000, generator=g).to(dtype)
        flat[::5] = -flat[::5].abs()  # negative scores: negative integers, never above t >= 0
        as_int = flat.view(int_dtype)
        out, vals = torch.empty(5000, dtype=torch.int64), torch.empty(5000, dtype=int_dtype)
        args = (as_int.data_ptr(), None, out.data_ptr(), vals.data_ptr())
        for t in (0.0, 0.7, 2.5):
            t_int = int(torch.tensor(t, dtype=dtype).view(int_dtype))
            for i0, i1 in ((0, 5000), (3, 4999), (130, 197), (64, 128), (7, 7)):
                want = (flat[i0:i1] > t).nonzero().squeeze(1) + i0
                call = (i0, i1, args[0], t_int, *args[2:])
                n = fn(*call, 5000)
                assert torch.equal(out[:n], want), (name, t, i0, i1)
                assert torch.equal(vals[:n], as_int[want])
                if want.numel() > 1:  # one slot fewer than the hits: -1
                    assert fn(*call, want.numel() - 1) == -1


@needs_native
@pytest.mark.parametrize("D", [7, 64, 83])
def test_gradient_gathers_and_sampled_product_match_pytorch(D):
    g = torch.Generator().manual_seed(D)
    plan = _selection(B=90, F=400, k_max=9, G=1, g=g)
    n = plan.lat_N.numel()
    weights = torch.randn(n, generator=g)
    table = torch.randn(90, D, generator=g)
    perm = plan.lat_perm_N
    want = ops_torch.segment_gather_sum(plan.lat_offsets, plan.rows_N[perm], weights[perm], table)
    got = native.segment_gather_perm(plan.lat_offsets, perm, plan.rows_N, weights, table)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    unused = plan.lat_offsets.diff() == 0
    assert unused.any() and not got[unused].any()  # latents without entries: zero rows
    B_FD = torch.randn(400, D, generator=g)
    want = ops_torch.pair_dot(table, plan.rows_N, plan.row_offsets, plan.lat_N, B_FD)
    got = native.pair_dot_rows(table, plan.row_offsets, plan.lat_N, B_FD)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    bias = torch.randn(400, generator=g)  # added in the pass: the same as adding after
    with_bias = native.pair_dot_rows(table, plan.row_offsets, plan.lat_N, B_FD, bias)
    assert torch.equal(with_bias, got + bias[plan.lat_N])
    with pytest.raises(ValueError, match="bias"):
        native.pair_dot_rows(table, plan.row_offsets, plan.lat_N, B_FD, bias[:-1])
    with pytest.raises(ValueError, match="without decreasing"):
        bad = plan.row_offsets.clone()
        bad[1] = int(bad[2]) + 1  # a row pointer that goes back
        native.pair_dot_rows(table, bad, plan.lat_N, B_FD)


@needs_native
@pytest.mark.parametrize("case", ["random", "ties", "sorted", "reversed", "all equal", "nan"])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 60000])
def test_top_positions_is_the_top_k(case, n):
    g = torch.Generator().manual_seed(n)
    vals = {
        "random": torch.randn(n, generator=g),
        "ties": torch.randint(0, 5, (n,), generator=g).float(),  # many equal at the cut
        "sorted": torch.arange(n).float(),
        "reversed": torch.arange(n).float().flip(0),
        "all equal": torch.full((n,), 2.5),
        "nan": torch.randn(n, generator=g).index_fill_(0, torch.arange(0, n, 3), float("nan")),
    }[case]
    ranked = torch.nan_to_num(vals, nan=-float("inf"))  # NaN ranks last
    for k in sorted({1, max(1, n // 3), n}):
        t, pos = native.top_positions(vals, k)
        want_t = ranked.topk(k).values[-1]
        assert t.item() == want_t.item() or (torch.isinf(t) and torch.isinf(want_t))
        assert pos.numel() == k and torch.equal(pos, pos.sort().values)  # increasing
        assert pos.unique().numel() == k and int(pos.max()) < n
        chosen = ranked[pos]
        assert torch.equal(chosen.sort(descending=True).values, ranked.topk(k).values)
        # ties at t are taken in position order: the tied ones chosen are the first ones
        tied = (ranked == t).nonzero().squeeze(1)
        assert torch.equal(pos[ranked[pos] == t], tied[: int((ranked[pos] == t).sum())])
    with pytest.raises(ValueError, match="outside"):
        native.top_positions(vals, n + 1)


@needs_native
@pytest.mark.parametrize(("n", "n_keys"), [(0, 5), (1, 1), (1000, 50), (40960, 4096)])
def test_counting_sort_is_the_stable_sort(n, n_keys):
    keys = torch.randint(0, n_keys, (n,), generator=torch.Generator().manual_seed(n))
    offsets = torch.zeros(n_keys + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(keys, minlength=n_keys).cumsum(0)
    assert torch.equal(native.csr_offsets(keys, n_keys), offsets)  # one pass instead
    perm = native.counting_sort_perm(keys, offsets)
    assert torch.equal(perm, torch.sort(keys, stable=True).indices)
    for bad in (n_keys, -1):
        with pytest.raises(ValueError, match="keys outside"):
            native.csr_offsets(torch.cat([keys, torch.tensor([bad])]), n_keys)
    with pytest.raises(ValueError, match="keys outside"):
        native.counting_sort_perm(
            torch.full((n + 1,), n_keys),
            offsets.clone().add_(1).index_fill_(0, torch.tensor([0]), 0),
        )


@needs_native
def test_parallel_gradient_removal_matches_the_reference_arithmetic():
    g = torch.Generator().manual_seed(11)
    W = torch.randn(70, 37, generator=g) * torch.rand(70, 1, generator=g)
    grad = torch.randn(70, 37, generator=g)
    denom = (W.norm(dim=-1, keepdim=True) + 1e-6) ** 2
    want = grad - (grad * W).sum(-1, keepdim=True) / denom * W
    got = grad.clone()
    sq = native.remove_parallel_rows(W, got)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sq, want.pow(2).sum(-1), rtol=1e-5)
    # with unit rows (as in training) nothing is left along them but the 1e-6's share
    unit = W / W.norm(dim=-1, keepdim=True)
    got = grad.clone()
    native.remove_parallel_rows(unit, got)
    assert (got * unit).sum(-1).abs().max() < 1e-5


def test_without_a_compiler_the_step_runs_the_pytorch_kernels(tmp_path):
    # a fresh process: no cached library, CC naming a compiler that fails
    fake_cc = tmp_path / "broken-cc"
    fake_cc.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    fake_cc.chmod(0o755)
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from masksae.train.kernels import native\n"
        "from masksae.train.sae import StepContext, build_sae, sae_config_from_dict\n"
        "assert native.library() is None and not native.enabled_for(torch.zeros(1))\n"
        "sae = build_sae(sae_config_from_dict({'architecture': 'matryoshka_batch_topk',\n"
        "    'd_in': 16, 'd_sae': 64, 'k': 4}))\n"
        "out = sae.training_loss(torch.randn(32, 16), StepContext(0, 1, None, True))\n"
        "out.loss.backward()\n"
        "print('step ok', float(out.loss))\n"
    )
    env = dict(os.environ, CC=str(fake_cc), MASKSAE_CACHE=str(tmp_path / "cache"))
    env.pop("MASKSAE_NATIVE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "step ok" in proc.stdout
    assert "could not build the CPU kernels" in proc.stderr
    assert "MASKSAE_NATIVE_KERNELS=0" in proc.stderr  # the warning says how to silence it
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-written library left


@needs_native
def test_library_is_built_once_into_the_cache(tmp_path):
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from masksae.train.kernels import native\n"
        "assert native.library() is not None\n"
    )
    env = dict(os.environ, MASKSAE_CACHE=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "built the CPU kernels" in first.stderr
    assert "built the CPU kernels" not in second.stderr
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and not built[0].name.endswith(".tmp")


def test_switches_turn_the_native_kernels_off(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.setenv("MASKSAE_NATIVE_KERNELS", "0")
    assert not native.enabled_for(t)
    monkeypatch.setenv("MASKSAE_NATIVE_KERNELS", "1")
    monkeypatch.setenv("MASKSAE_KERNEL_BACKEND", "torch")
    assert not native.enabled_for(t)
    monkeypatch.delenv("MASKSAE_KERNEL_BACKEND")
    assert native.enabled_for(t) == (native.library() is not None)


def test_pytorch_path_is_sparse_decode_then_prefix_errors(monkeypatch):
    # the fallback composes the two fused PyTorch steps exactly
    monkeypatch.setenv("MASKSAE_NATIVE_KERNELS", "0")
    plan, (vals, x, b_dec, W_dec), _ = _prefix_case(B=20, F=32, D=8, G=2, seed=9)
    err, resid = decoded_prefix_errors(vals, x, b_dec, W_dec, plan, 2)
    parts = sparse_decode(vals, W_dec, plan).view(20, 2, 8)
    err_ref, resid_ref = prefix_squared_errors(x, b_dec, parts)
    assert torch.equal(err, err_ref) and torch.equal(resid, resid_ref)


@needs_native
def test_bookkeeping_kernels_match_pytorch():
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, 37 * 1000, (5000,), generator=g)
    rows, cols = native.split_flat(idx, 37)
    assert torch.equal(rows, idx // 37) and torch.equal(cols, idx % 37)
    group_of = torch.randint(0, 5, (37,), generator=g)
    assert torch.equal(native.bag_ids(rows, cols, group_of, 5), rows * 5 + group_of[cols])
    with pytest.raises(ValueError, match="outside"):
        native.bag_ids(rows, cols, group_of[:30], 5)

    lat = torch.randint(0, 300, (2000,), generator=g)
    vals = torch.rand(2000, generator=g).masked_fill_(torch.rand(2000, generator=g) < 0.3, 0.0)
    want = torch.zeros(300, dtype=torch.bool)
    want[lat[vals != 0]] = True
    assert torch.equal(native.fired(lat, vals, 300), want)
    with pytest.raises(ValueError, match="outside"):
        native.fired(lat, vals, 299)

    exact = torch.randn(3001, generator=g) * 4
    for dtype in (torch.bfloat16, torch.float32):
        approx = (exact + torch.randn(3001, generator=g) * 1e-3).to(dtype)
        approx[::7] = float("inf")
        approx[1::7] = -float("inf")
        approx[2::7] = float("nan")
        finite = torch.isfinite(approx)
        want = torch.where(finite, (exact - approx.float()).abs(), 0.0).amax()
        assert native.max_abs_diff_finite(exact, approx).item() == want.item()
    assert native.max_abs_diff_finite(exact[:3], torch.full((3,), float("nan"))).item() == 0.0

    W = torch.randn(70, 33, generator=g)
    eps = torch.finfo(torch.float32).eps
    want = W / (W.norm(dim=-1, keepdim=True) + eps)
    native.normalize_rows(W, eps)
    assert torch.allclose(W, want, rtol=1e-6, atol=1e-7)


@needs_native
@pytest.mark.parametrize("arch", ["matryoshka_batch_topk", "batch_topk", "topk"])
def test_the_training_step_uses_the_forwards_dot_products(arch, monkeypatch):
    # the TopK family states its loss's gradient up front: the step's backward must find it
    # (a mismatch would silently cost the dot products again)
    from masksae.train.sae import StepContext, build_sae, sae_config_from_dict

    torch.manual_seed(0)
    sae = build_sae(sae_config_from_dict({"architecture": arch, "d_in": 24, "d_sae": 96, "k": 4}))
    used = _spy_known_grad_vals(monkeypatch)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::4] = True  # AuxK on: its errors' backward uses the forward's dot products too
    out = sae.training_loss(torch.randn(64, 24), StepContext(3, 10, dead, True))
    out.loss.backward()
    assert used == [True, True]  # AuxK's backward and the main one
    used.clear()
    # a scaled loss: other gradients than stated, so each backward computes its own
    out = sae.training_loss(torch.randn(64, 24), StepContext(3, 10, dead, True))
    (out.loss * 0.5).backward()
    assert used == [False, False]


def _same_bf16(a, b) -> bool:
    """Bit for bit (signed zeros too), any NaN matching any NaN."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(
        a.view(torch.int16)[~nan], b.view(torch.int16)[~nan]
    )


@needs_native
def test_bf16_operands_round_like_torch():
    # every rounding case: ties to even both ways (finite halfway bit patterns), carries,
    # overflow to inf, subnormals, signed zeros, inf and NaN (any NaN: torch's own scalar
    # and vector conversions give different ones); then the extra column and the zeros
    g = torch.Generator().manual_seed(5)
    special = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), 3.0e38, -3.4e38, 1e-40, -1e-42, 1.0, -1.5]
    )
    ties = (torch.randint(0, 0x7F00, (64,), generator=g, dtype=torch.int32) << 16) | 0x8000
    src = torch.cat([special, ties.view(torch.float32), torch.randn(4 * 37 - 74, generator=g)])
    src = src.view(4, 37)
    sub = torch.randn(37, generator=g)
    extra = torch.tensor([0.1, -2.0, float("nan"), 7.0])
    out, f32 = torch.empty(4, 48, dtype=torch.bfloat16), torch.empty(4, 37)
    native.rows_to_bf16_padded(src, out, sub_D=sub, f32_out_RD=f32, extra_R=extra)
    assert torch.equal(f32, src - sub)
    assert _same_bf16(out[:, :37], (src - sub).to(torch.bfloat16))
    assert _same_bf16(out[:, 37], extra.to(torch.bfloat16))
    assert not out[:, 38:].any()
    native.rows_to_bf16_padded(src, out, extra=1.0)
    assert _same_bf16(out[:, :37], src.to(torch.bfloat16))
    assert (out[:, 37] == 1).all()
    with pytest.raises(ValueError, match="bf16"):
        native.rows_to_bf16_padded(src, torch.empty(4, 48))
    with pytest.raises(ValueError, match="shapes"):
        native.rows_to_bf16_padded(src, torch.empty(4, 37, dtype=torch.bfloat16))


@needs_native
@pytest.mark.parametrize("arch", ["batch_topk", "topk"])
def test_bf16_selection_scores_are_the_same_with_the_c_operands(arch, monkeypatch):
    from masksae.train.sae import BatchTopKConfig, TopKConfig, build_sae

    cfg = (BatchTopKConfig if arch == "batch_topk" else TopKConfig)(d_in=40, d_sae=96, k=6)
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(70, 40)
    got = []
    for on in ("1", "0"):
        monkeypatch.setenv("MASKSAE_NATIVE_KERNELS", on)
        pre, refine = sae.selection_scores(x, "bfloat16")
        got.append((pre.clone(), refine.xin_BD.clone()))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


@needs_native
@pytest.mark.parametrize(("n", "stride", "block"), [(1000, 1, 1), (5000, 7, 3), (70_001, 129, 64)])
def test_sample_kth_largest_matches_a_sort_of_the_blocks(n, stride, block):
    # positive and negative values, many repeats (bf16 of small integers), the last block
    # clipped at n; every rank from the largest to the smallest
    g = torch.Generator().manual_seed(n)
    flat = torch.randint(-40, 40, (n,), generator=g).float().div(8).to(torch.bfloat16)
    flat[::11] = torch.randn(flat[::11].shape, generator=g).to(torch.bfloat16)
    starts = range(0, n, stride)
    idx = torch.cat([torch.arange(s, min(s + block, n)) for s in starts])
    assert native.sample_size(n, stride, block) == idx.numel()
    ranked = flat[idx].float().sort(descending=True).values
    for m in sorted({1, 2, 17, idx.numel() // 3, idx.numel() - 1, idx.numel()}):
        got = native.sample_kth_largest_bf16(flat, stride, block, m)
        assert got.dtype == torch.bfloat16 and got.float() == ranked[m - 1], m
    with pytest.raises(ValueError, match="outside the sample"):
        native.sample_kth_largest_bf16(flat, stride, block, idx.numel() + 1)
