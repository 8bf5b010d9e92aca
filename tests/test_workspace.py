"""The fused step's reused scratch buffers (masksae.train.kernels.workspace)."""

from __future__ import annotations

import threading

import torch

from masksae.train.kernels.workspace import Workspace, release_workspace, workspace
from masksae.train.sae import BatchTopKConfig, StepContext, build_sae


def test_buffers_are_reused_grown_and_per_thread() -> None:
    ws = Workspace()
    a = ws.get("x", (4, 8), torch.float32, "cpu")
    b = ws.get("x", (2, 8), torch.float32, "cpu")
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 8)  # a view of the same buffer
    c = ws.get("x", (16, 8), torch.float32, "cpu")  # larger: a new buffer
    assert c.numel() == 128 and ws.nbytes() == 128 * 4
    assert ws.get("x", (4, 8), torch.float64, "cpu").dtype == torch.float64  # keyed by dtype
    seen = []
    thread = threading.Thread(target=lambda: seen.append(workspace()))
    thread.start()
    thread.join()
    assert seen[0] is not workspace()


def test_a_buffer_made_in_inference_mode_is_replaced_outside_it() -> None:
    ws = Workspace()
    with torch.inference_mode():
        made = ws.get("mask", (64,), torch.bool, "cpu")
        assert made.is_inference()
        assert ws.get("mask", (64,), torch.bool, "cpu").data_ptr() == made.data_ptr()
    again = ws.get("mask", (64,), torch.bool, "cpu")
    assert not again.is_inference()
    torch.gt(torch.randn(64), 0.0, out=again)  # in place: allowed on the new buffer


def test_inference_encode_then_training_step_on_one_thread() -> None:
    """An evaluation's encode (inference mode, batch top-k before the threshold is learned)
    and then a fused training step share the thread's workspace."""
    release_workspace()
    torch.manual_seed(0)
    sae = build_sae(BatchTopKConfig(d_in=16, d_sae=64, k=4))
    x = torch.randn(512, 16)
    sae.init_from_data(x)
    with torch.inference_mode():
        sae.encode(x)
    out = sae.training_loss(x, StepContext(0, 10, None, True, "bfloat16"))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    release_workspace()
