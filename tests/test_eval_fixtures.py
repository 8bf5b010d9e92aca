"""Helpers for the evaluation tests: SAE stand-ins with a known answer."""

from __future__ import annotations

import torch


class IdentitySAE(torch.nn.Module):
    """d_sae = 2 d, W_enc = [I, -I], relu, W_dec = [I; -I]: reconstructs x exactly."""

    def __init__(self, d: int) -> None:
        super().__init__()
        eye = torch.eye(d)
        self.W_enc = torch.cat([eye, -eye], dim=1)
        self.W_dec = torch.cat([eye, -eye], dim=0)

    def encode(self, x):
        return torch.relu(x @ self.W_enc)

    def decode(self, f):
        return f @ self.W_dec
