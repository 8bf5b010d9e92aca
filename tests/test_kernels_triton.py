"""Triton kernels vs the PyTorch path, on CPU under TRITON_INTERPRET=1 (in a subprocess, so the
interpreter flag is set before triton is first imported), and natively on CUDA when present."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton not installed"
)

CHECK = textwrap.dedent(
    """
    import os, torch
    from masksae.train.kernels import ops_torch, ops_triton
    from masksae.train.sae import StepContext, build_sae, sae_config_from_dict
    dev = os.environ.get("CHECK_DEVICE", "cpu")
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        table = torch.randn(40, 200, generator=g).to(dev, dtype)
        offsets = torch.tensor([0, 3, 3, 9, 20, 20], device=dev)
        cols = torch.randint(0, 40, (20,), generator=g).to(dev)
        w = torch.randn(20, generator=g).to(dev, dtype)
        a = ops_triton.segment_gather_sum(offsets, cols, w, table)
        b = ops_torch.segment_gather_sum(offsets.cpu(), cols.cpu(), w.cpu(), table.cpu())
        assert a.dtype == torch.float32 and torch.allclose(a.cpu(), b, atol=tol), (a.cpu() - b).abs().max()
        A = torch.randn(6, 200, generator=g).to(dev, dtype)
        rows = torch.tensor([0, 0, 1, 4, 4, 5, 5, 5], device=dev)
        pc = torch.tensor([1, 7, 0, 3, 39, 2, 8, 30], device=dev)
        offs = torch.tensor([0, 2, 3, 3, 3, 5, 8], device=dev)
        a = ops_triton.pair_dot(A, rows, table, pc)
        b = ops_torch.pair_dot(A.cpu(), rows.cpu(), offs.cpu(), pc.cpu(), table.cpu())
        assert torch.allclose(a.cpu(), b, atol=tol * 10), (a.cpu() - b).abs().max()
    # whole fused Matryoshka step through the Triton kernels vs the dense reference
    torch.manual_seed(0)
    sae = build_sae(sae_config_from_dict(
        {"architecture": "matryoshka_batch_topk", "d_in": 16, "d_sae": 64, "k": 4})).to(dev)
    x = torch.randn(32, 16, generator=g).to(dev)
    dead = torch.zeros(64, dtype=torch.bool, device=dev)
    dead[::5] = True
    res = []
    for fused in (True, False):
        sae.zero_grad()
        out = sae.training_loss(x, StepContext(0, 1, dead, fused))
        out.loss.backward()
        res.append((out.loss.detach(), [p.grad.clone() for p in sae.parameters()]))
    assert torch.allclose(res[0][0], res[1][0], rtol=1e-5)
    for ga, gb in zip(res[0][1], res[1][1]):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-5), (ga - gb).abs().max()
    print("TRITON_OK")
    """
)


def test_triton_kernels_interpreted_on_cpu():
    env = dict(
        os.environ, TRITON_INTERPRET="1", MASKSAE_KERNEL_BACKEND="triton", CHECK_DEVICE="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TRITON_OK" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_triton_kernels_on_cuda():
    env = dict(os.environ, CHECK_DEVICE="cuda")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
