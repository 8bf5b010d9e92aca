"""SAE latents of cached probing activations, mean-pooled per text (SAEBench's
get_sae_meaned_activations) or taken per row (OOD's last tokens)."""

from __future__ import annotations

import numpy as np
import torch

from masksae.evaluate.probing.activations import TokenActs


def _sae_device_dtype(sae) -> tuple[torch.device, torch.dtype]:
    param = next(iter(sae.parameters()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


@torch.inference_mode()
def encode_rows(sae, x_ND: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """float32 [N, F]: ``sae.encode`` of each row (the SAE's inference rule)."""
    device, dtype = _sae_device_dtype(sae)
    out = np.zeros((x_ND.shape[0], int(sae.cfg.d_sae)), dtype=np.float32)
    for start in range(0, x_ND.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(x_ND[start : start + batch_size]))
        f = sae.encode(x.to(device=device, dtype=dtype))
        out[start : start + len(x)] = f.float().cpu().numpy()
    return out


@torch.inference_mode()
def pooled_latents(sae, acts: TokenActs, batch_tokens: int = 4096) -> np.ndarray:
    """float32 [N_texts, F]: each text's SAE latents averaged over its real tokens.

    Rows are encoded in batches of ``batch_tokens`` tokens and summed into their text; a text
    without real tokens pools to zeros.
    """
    device, dtype = _sae_device_dtype(sae)
    n_texts, d_sae = acts.n_texts, int(sae.cfg.d_sae)
    sums = torch.zeros(n_texts, d_sae, device=device, dtype=torch.float32)
    text_of_row = torch.from_numpy(acts.text_index()).to(device)
    for start in range(0, acts.acts_ND.shape[0], batch_tokens):
        x = torch.from_numpy(np.ascontiguousarray(acts.acts_ND[start : start + batch_tokens]))
        f = sae.encode(x.to(device=device, dtype=dtype)).float()
        sums.index_add_(0, text_of_row[start : start + len(x)], f)
    counts = torch.from_numpy(acts.lengths).to(device).clamp_min(1).float()
    return (sums / counts[:, None]).cpu().numpy()


def sae_features(sae, acts: TokenActs, pooling: str, batch_tokens: int = 4096) -> np.ndarray:
    """float32 [N_texts, F]: the SAE latents pooled like :meth:`TokenActs.features`."""
    if pooling == "mean":
        return pooled_latents(sae, acts, batch_tokens)
    f = encode_rows(sae, acts.last(), batch_tokens)
    f[acts.lengths == 0] = 0.0
    return f
