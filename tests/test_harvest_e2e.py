"""End-to-end harvest on the bundled real SmolLM2-135M, layer 15 (slow: real weights, ~30 s)."""

from __future__ import annotations

import numpy as np
import pytest

from masksae.harvest import HarvestConfig, run_harvest
from masksae.storage import ActivationStore


@pytest.mark.slow
def test_bundled_smollm2_harvest(tmp_path):
    out = tmp_path / "store"
    cfg = HarvestConfig(
        out=str(out),
        model="bundled:smollm2-135m",
        layer=15,
        corpus="bundled",
        tokens=4096,
        mask_prob=0.3,
        batch_size=8,
        device="cpu",
        seed=0,
    )
    result = run_harvest(cfg, progress=False)
    assert result.total_tokens == 4096  # 32 sequences of the bundled default context 128
    store = ActivationStore.open(out)
    assert store.is_complete and store.verify() == []
    assert store.n_tokens == 4096 and store.d_model == 576
    prov = store.provenance
    assert prov["model"] == "bundled:smollm2-135m" and prov["architecture"] == "llama"
    assert len(prov["model_revision"]) == 64  # sha256 of the GGUF
    assert prov["layer"] == 15 and prov["hook"] == "resid_post" and prov["context_length"] == 128
    assert prov["mask_string"] == "..." and prov["mask_token_id"] == 2026
    assert prov["corpus"]["kind"] == "bundled" and prov["prepend_bos"] is False
    assert prov["tokenizer"] == "bundled:smollm2-135m"  # portable, not the local cache path
    assert prov["outlier_norm_factor"] == 10.0
    data = store.read(0, 4096)
    acts = np.asarray(data.activations, dtype=np.float32)
    assert acts.shape == (4096, 576) and np.isfinite(acts).all()
    base = (data.position == 0) | np.isin(data.token_ids, [0, 1, 2])
    norms = np.linalg.norm(acts, axis=1)
    # norm outliers: the attention-sink-like tokens (~25,000 vs a median of ~170)
    outliers = data.excluded & ~base
    assert np.array_equal(data.excluded & base, base)
    assert np.array_equal(outliers, ~base & (norms > 10 * np.median(norms[~base])))
    assert result.norm_outliers == int(outliers.sum()) >= 1
    assert (norms[outliers] > 50 * np.median(norms[~base])).all()
    assert set(data.position[outliers].tolist()) <= {1, 2, 3, 4}
    stats = store.stats
    rms_over_mean = np.sqrt(stats.mean_sq_norm) / stats.mean_norm
    assert rms_over_mean < 1.1, rms_over_mean  # sane: outliers made it ~3 before
    with_outliers = norms[~base]
    assert np.sqrt(np.mean(with_outliers.astype(np.float64) ** 2)) / with_outliers.mean() > 1.5
    eligible = ~data.excluded
    n, k = int(eligible.sum()), int(data.masked.sum())
    assert abs(k - 0.3 * n) < 4 * np.sqrt(n * 0.3 * 0.7)
    assert (data.token_ids[data.masked] == 2026).all()
    # position-0 activations are the huge-norm outliers the exclusion exists for
    assert np.median(norms[data.position == 0]) > 5 * np.median(norms[eligible])
    assert store.count_tokens() == n
