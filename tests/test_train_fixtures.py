"""Helpers for the train tests: small synthetic activation stores written with StoreWriter.

Activations have sparse low-rank structure: x = sum of a few (out of ``n_features``) random
unit directions with positive coefficients, times ``scale``, plus a little noise, so an SAE
with d_sae >= n_features can explain most of the variance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_store(
    path: Path,
    *,
    n_tokens: int = 4096,
    d_model: int = 16,
    chunk_tokens: int = 512,
    seq_len: int = 64,
    n_features: int = 32,
    active: int = 3,
    scale: float = 5.0,
    noise: float = 0.01,
    seed: int = 0,
    nan_at: tuple[int, int] | None = None,
    dtype: str = "float32",
    provenance: dict | None = None,
):
    """Write a complete store at ``path``; ``nan_at=(token, dim)`` plants one NaN."""
    from masksae.storage import ActivationStore, ChunkData, StoreSpec, StoreWriter

    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_features, d_model)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    acts = np.zeros((n_tokens, d_model), dtype=np.float32)
    for i in range(n_tokens):
        idx = rng.choice(n_features, size=active, replace=False)
        acts[i] = (rng.uniform(0.5, 1.5, size=active)[:, None] * dirs[idx]).sum(0)
    acts = acts * scale + noise * rng.normal(size=acts.shape).astype(np.float32)
    if nan_at is not None:
        acts[nan_at] = np.nan
    positions = np.arange(n_tokens) % seq_len
    prov = (
        provenance
        if provenance is not None
        else {
            "model": "synthetic",
            "layer": 3,
            "mask_prob": 0.3,
            "seed": seed,
            "context_length": seq_len,
        }
    )
    spec = StoreSpec(
        d_model=d_model,
        dtype=dtype,
        chunk_tokens=chunk_tokens,
        total_tokens=n_tokens,
        provenance=prov,
    )
    with StoreWriter.open(path, spec) as writer:
        for c in range(spec.n_chunks):
            a, b = spec.chunk_bounds(c)
            writer.write_chunk(
                c,
                ChunkData(
                    activations=acts[a:b],
                    token_ids=(np.arange(a, b) % 97).astype(np.int32),
                    masked=(np.arange(a, b) % 3 == 0),
                    excluded=(positions[a:b] == 0),
                    seq_index=(np.arange(a, b) // seq_len).astype(np.int64),
                    position=positions[a:b].astype(np.int32),
                ),
            )
    return ActivationStore.open(path)
