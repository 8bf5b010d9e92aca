"""Scratch buffers the fused step reuses from one step to the next.

A [B, F] float32 temporary is 33.5 MB at B 2048, F 4096: above glibc's largest mmap threshold
(32 MiB), so on the CPU a fresh one is mapped, page-faulted in and unmapped on every step, and
those faults cost as much as the arithmetic. The step's no-grad [B, F] work (the selection
pre-activations, the candidate mask) writes into buffers kept here instead; CUDA's caching
allocator would recycle them anyway, so the same code serves both devices.

One workspace per thread (a sweep steps each device's runs in one thread, one run at a
time), shared by every SAE that thread steps: a sweep holds one set of buffers, sized for its
largest SAE, not one per SAE. Nothing handed out here may outlive the step that asked for it
or reach autograd.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_LOCAL = threading.local()


class Workspace:
    """Named flat buffers, grown on demand and handed out as views of the requested shape."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        """An uninitialised tensor of ``shape`` (contents are whatever the last user left)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        numel = 1
        for size in shape:
            numel *= size
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        # a buffer first made under torch.inference_mode is an inference tensor, which may not
        # be written in place outside that mode (inference code, e.g. an evaluation's encode,
        # and a training step can share a thread): replace it by a normal one
        stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
        if buf is None or stale or buf.numel() < numel:
            self._buffers.pop(key, None)  # free the old one before allocating the larger one
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (the memory returns to the allocator)."""
        self._buffers.clear()


def workspace() -> Workspace:
    """The calling thread's workspace."""
    ws = getattr(_LOCAL, "workspace", None)
    if ws is None:
        ws = _LOCAL.workspace = Workspace()
    return ws


def release_workspace() -> None:
    """Free the calling thread's buffers (the trainer calls this when training ends)."""
    ws = getattr(_LOCAL, "workspace", None)
    if ws is not None:
        ws.clear()
