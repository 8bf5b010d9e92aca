"""On a CUDA device (skipped elsewhere; `make gpu-check` runs it): the fused step through the
Triton kernels equals the dense reference, the bf16 selection equals the fp32 one, and the
trainer trains with the device defaults (fused Adam, bf16 selection)."""

from __future__ import annotations

import pytest
import torch

from masksae.train.sae import StepContext, build_sae, sae_config_from_dict
from masksae.train.sae.refine import ExactPreacts
from masksae.train.sae.selection import batch_topk_select

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
D, F, B = 64, 2048, 512


def make(arch: str):
    torch.manual_seed(0)
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "k": 8}
    return build_sae(sae_config_from_dict(cfg)).cuda()


def step(sae, x, fused, select, dead):
    sae.zero_grad()
    out = sae.training_loss(x, StepContext(3, 10, dead, fused, select))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("arch", ["matryoshka_batch_topk", "batch_topk", "topk"])
@pytest.mark.parametrize("select", ["float32", "bfloat16"])
def test_fused_triton_step_matches_dense_on_cuda(arch, select):
    sae = make(arch)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)).cuda() * 2
    dead = torch.zeros(F, dtype=torch.bool, device="cuda")
    dead[::7] = True
    fo, fg = step(sae, x, True, select, dead)
    do, dg = step(sae, x, False, "float32", dead)
    assert torch.allclose(fo.loss, do.loss, rtol=1e-4)
    assert torch.equal(fo.fired_F, do.fired_F)
    for name, g in dg.items():
        assert torch.allclose(fg[name], g, rtol=1e-3, atol=1e-5), name


def test_bf16_selection_equals_fp32_on_cuda():
    sae = make("batch_topk")
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        ref = batch_topk_select(sae.pre_activations(x), 8 * B)
        pre16, refine = sae.selection_scores(x, "bfloat16")
        assert isinstance(refine, ExactPreacts) and pre16.dtype == torch.bfloat16
        got = batch_topk_select(pre16, 8 * B, refine)
    assert torch.equal(got.rows_N * F + got.lat_N, ref.rows_N * F + ref.lat_N)
    assert torch.allclose(got.vals_N, ref.vals_N, rtol=1e-4, atol=1e-5)


def test_trainer_on_cuda(tmp_path):
    from masksae.train.config import RunSpec, TrainConfig
    from masksae.train.metrics_log import read_metrics
    from masksae.train.trainer import Trainer
    from test_train_fixtures import make_store

    store = make_store(tmp_path / "store", n_tokens=4096)
    runs = [RunSpec("r", {"architecture": "matryoshka_batch_topk", "d_sae": 256, "k": 4})]
    cfg = TrainConfig(steps=20, batch_size=128, warmup_steps=2, log_every=5, device="cuda")
    Trainer(store, runs, cfg, tmp_path / "out", progress=False).train()
    records = read_metrics(tmp_path / "out" / "r")
    assert all(r["l0"] == 4.0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
