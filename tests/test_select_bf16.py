"""Select in bf16, compute in fp32: the re-ranked selections equal the fp32 ones, the fallbacks
(widening, dense rows, dense batch) keep them exact, and training follows the fp32 path."""

from __future__ import annotations

import math

import pytest
import torch

from masksae.errors import ConfigError
from masksae.train.config import TrainConfig, resolve_select_dtype
from masksae.train.sae import StepContext, build_sae, sae_config_from_dict
from masksae.train.sae import selection as selection_mod
from masksae.train.sae.auxk import auxk_select, auxk_size
from masksae.train.sae.refine import ExactPreacts, row_candidates
from masksae.train.sae.selection import batch_topk_select, candidates, sample_stride, topk_select

pytestmark = pytest.mark.usefixtures("one_thread")

# n = B * F = 524288 > 4 * 65536: the sampled pre-filter path
D, F, B = 48, 2048, 256


def encoder(seed: int = 0):
    """Activation-like inputs (sparse codes over a dictionary) and a unit-column encoder."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4 * D, D, generator=g) / D**0.5 * 3
    codes = torch.where(torch.rand(B, 4 * D, generator=g) > 0.95, 1.0, 0.0)
    x = codes @ atoms + 0.1 * torch.randn(B, D, generator=g)
    W = torch.randn(D, F, generator=g)
    W /= W.norm(dim=0, keepdim=True)
    b = 0.1 * torch.randn(F, generator=g)
    return x, W, b


def bf16_scores(x, W, b):
    pre32 = torch.addmm(b, x, W)
    pre16 = torch.addmm(b.bfloat16(), x.bfloat16(), W.bfloat16())
    return pre32, pre16, ExactPreacts(x, W, b)


def keys(sel):
    return (sel.rows_N * F + sel.lat_N).tolist()


def test_sample_stride_is_coprime_and_covers_every_latent():
    n = 2048 * 4096
    s = sample_stride(n, 4096)
    assert s >= n // 65536 and math.gcd(s, 4096) == 1
    cols = torch.arange(0, n, s) % 4096
    assert cols.unique().numel() == 4096  # the plain stride 128 saw 32 of them
    assert sample_stride(10, 7) == 1
    # blocks of 64 (the C sample): about as many values, spread over every latent and row
    for F in (4096, 16384, 1000):
        n = 2048 * F
        s = sample_stride(n, F, 64)
        starts = torch.arange(0, n, s)
        assert math.gcd(s, F) == 1 and 0.6 < 64 * starts.numel() / 65_536 < 1.7
        cols = (starts[:, None] + torch.arange(64)).reshape(-1) % F
        assert cols.unique().numel() == F  # a remainder of 1 covered a quarter of them
        assert (starts // F).unique().numel() == starts.numel()  # one block per row at most


def test_batch_selection_in_bf16_equals_fp32():
    x, W, b = encoder()
    pre32, pre16, refine = bf16_scores(x, W, b)
    k_total = 16 * B
    ref = batch_topk_select(pre32, k_total)
    got = batch_topk_select(pre16, k_total, refine)
    # a plain bf16 selection differs near the threshold; the re-ranked one does not
    plain = batch_topk_select(pre16, k_total)
    assert keys(plain) != keys(ref)
    assert keys(got) == keys(ref)
    assert got.vals_N.dtype == torch.float32
    assert torch.allclose(got.vals_N, ref.vals_N, rtol=1e-5, atol=1e-6)
    # only the candidates were recomputed in fp32 (about 1.5 k_total of the B * F entries)
    assert k_total <= refine.stats.entries < 3 * k_total
    assert refine.stats.dense_rows == 0


@pytest.mark.parametrize("k", [1, 12, 40])
def test_row_selection_in_bf16_equals_fp32(k):
    x, W, b = encoder(1)
    pre32, pre16, refine = bf16_scores(x, W, b)
    ref = topk_select(torch.relu(pre32), k)
    got = topk_select(pre16, k, refine=refine)
    nonzero = ref.vals_N > 0
    assert torch.equal(got.rows_N, ref.rows_N)
    assert torch.equal(got.lat_N[nonzero], ref.lat_N[nonzero])
    assert torch.allclose(got.vals_N, ref.vals_N, rtol=1e-5, atol=1e-6)
    assert refine.stats.entries == B * row_candidates(k, F)


def test_auxk_selection_among_dead_columns_in_bf16_equals_fp32():
    x, W, b = encoder(2)
    pre32, pre16, refine = bf16_scores(x, W, b)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=torch.Generator().manual_seed(0))[:300]] = True
    ref = auxk_select(torch.relu(pre32), dead, D)
    scores_before = pre16.clone()
    got = auxk_select(pre16, dead, D, refine=refine)
    assert torch.equal(pre16, scores_before)  # the scores are only read
    assert bool(dead[got.lat_N].all())
    assert (got.lat_N.view(B, -1).diff(dim=1) > 0).all()  # increasing within each row
    # the reference's way: live latents masked to -inf, top k over every column
    masked = torch.where(dead[None, :], torch.relu(pre32), -math.inf)
    ref_idx = masked.topk(auxk_size(D, 300), dim=-1).indices.sort(dim=-1).values
    pos = ref.vals_N.view(B, -1) > 0
    assert torch.equal(got.lat_N.view(B, -1)[pos], ref_idx[pos])
    nonzero = ref.vals_N > 0
    assert torch.equal(got.lat_N[nonzero], ref.lat_N[nonzero])
    assert torch.allclose(got.vals_N, ref.vals_N, rtol=1e-5, atol=1e-6)
    # fewer dead latents than candidates per row: the masked entries stay out
    few = torch.zeros(F, dtype=torch.bool)
    few[:5] = True
    _, pre16, refine = bf16_scores(x, W, b)
    sel = auxk_select(pre16, few, D, refine=refine)
    assert sel.lat_N.reshape(B, 5).eq(torch.arange(5)).all()


def test_failed_checks_fall_back_and_stay_exact():
    # an absurd safety factor makes every check fail: BatchTopK widens twice then computes
    # every score in fp32, per-row selections recompute every row densely; both stay exact
    x, W, b = encoder(3)
    pre32, pre16, _ = bf16_scores(x, W, b)
    k_total = 16 * B
    paranoid = ExactPreacts(x, W, b, safety=1e6)
    got = batch_topk_select(pre16, k_total, paranoid)
    assert keys(got) == keys(batch_topk_select(pre32, k_total))
    assert paranoid.stats.widened >= 1 and paranoid.stats.dense_rows == B
    paranoid = ExactPreacts(x, W, b, safety=1e6)
    got = topk_select(pre16, 12, refine=paranoid)
    ref = topk_select(pre32, 12)
    assert torch.equal(got.lat_N, ref.lat_N)
    assert paranoid.stats.dense_rows == B
    with pytest.raises(ValueError, match="safety"):
        ExactPreacts(x, W, b, safety=0.5)


def test_small_inputs_widen_instead_of_sampling():
    # below the sampling size the candidates are exactly the k_total largest bf16 values: no
    # margin, so the check widens the cut once and then verifies
    x, W, b = encoder(4)
    x, W, b = x[:32], W[:, :256], b[:256]
    pre32 = torch.addmm(b, x, W)
    pre16 = torch.addmm(b.bfloat16(), x.bfloat16(), W.bfloat16())
    refine = ExactPreacts(x, W, b)
    got = batch_topk_select(pre16, 8 * 32, refine)
    ref = batch_topk_select(pre32, 8 * 32)
    assert sorted(keys(got)) == sorted(keys(ref))
    assert refine.stats.widened >= 1 and refine.stats.dense_rows == 0


def test_candidate_prefilter_retries_cheaply(monkeypatch):
    flat = torch.randn(B * F, generator=torch.Generator().manual_seed(5))
    calls = []
    greater = selection_mod._greater

    def spy(*args):
        out = greater(*args)
        calls.append(out[0].numel())
        return out

    monkeypatch.setattr(selection_mod, "_greater", spy)
    monkeypatch.setattr(selection_mod, "_MARGIN", 0.5)  # the first cut leaves too few
    cand, vals, cut = candidates(flat, 4096, F)
    assert len(calls) == 2 and calls[0] < 4096 <= calls[1]  # no full topk / kthvalue
    assert torch.equal(cand, (flat > cut).nonzero().squeeze(1))
    assert torch.equal(vals, flat[cand])
    top = flat.topk(4096).indices
    assert torch.isin(top, cand).all()


def _train(select_dtype: str, arch: str, steps: int = 24):
    torch.manual_seed(0)
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "k": 8, "dead_tokens_threshold": 2 * B}
    sae = build_sae(sae_config_from_dict(cfg))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    losses, fired = [], []
    dead = None
    for step in range(steps):
        x, _, _ = encoder(100 + step)
        if step == 0:
            sae.init_from_data(x)
        out = sae.training_loss(x, StepContext(step, steps, dead, True, select_dtype))
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        sae.normalize_decoder()
        losses.append(out.loss.item())
        fired.append(out.fired_F)
        if step == steps // 2:  # exercise AuxK: call the latents that did not fire dead
            dead = ~torch.stack(fired).any(0)
    return losses, sae


@pytest.mark.parametrize("arch", ["matryoshka_batch_topk", "topk"])
def test_training_with_bf16_selection_follows_fp32(arch):
    l16, sae16 = _train("bfloat16", arch)
    l32, sae32 = _train("float32", arch)
    for a, b in zip(l16, l32, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    torch.manual_seed(0)
    init = build_sae(sae16.cfg)
    for (name, p16), p32, p0 in zip(
        sae16.named_parameters(), sae32.parameters(), init.parameters(), strict=True
    ):
        # Adam's steps are ~lr * sign(grad): ulp-level gradient differences flip the sign of
        # near-zero gradients, so compare the distance to the distance travelled
        rel = (p16 - p32).norm() / (p32 - p0).norm()
        assert rel < 5e-3, (name, rel.item())


def test_select_dtype_config():
    assert TrainConfig().select_dtype == "auto"
    assert resolve_select_dtype("float32", torch.device("cpu")) == "float32"
    assert resolve_select_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    assert resolve_select_dtype("auto", torch.device("cpu")) in ("float32", "bfloat16")
    with pytest.raises(ConfigError, match="select_dtype"):
        TrainConfig(select_dtype="fp8")
