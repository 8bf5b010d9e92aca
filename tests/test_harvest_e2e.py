"""End-to-end harvest on the bundled real SmolLM2-135M (slow: real weights, ~30 s)."""

from __future__ import annotations

import numpy as np
import pytest

from masksae.harvest import HarvestConfig, run_harvest
from masksae.storage import ActivationStore


@pytest.mark.slow
def test_bundled_smollm2_harvest(tmp_path):
    out = tmp_path / "store"
    cfg = HarvestConfig(out=str(out), model="bundled:smollm2-135m", layer=3, corpus="bundled",
                        tokens=2048, mask_prob=0.3, batch_size=8, device="cpu", seed=0)
    result = run_harvest(cfg, progress=False)
    assert result.total_tokens == 2048  # 16 sequences of the bundled default context 128
    store = ActivationStore.open(out)
    assert store.is_complete and store.verify() == []
    assert store.n_tokens == 2048 and store.d_model == 576
    prov = store.provenance
    assert prov["model"] == "bundled:smollm2-135m" and prov["architecture"] == "llama"
    assert len(prov["model_revision"]) == 64  # sha256 of the GGUF
    assert prov["layer"] == 3 and prov["hook"] == "resid_post" and prov["context_length"] == 128
    assert prov["mask_string"] == "..." and prov["mask_token_id"] == 2026
    assert prov["corpus"]["kind"] == "bundled" and prov["prepend_bos"] is False
    data = store.read(0, 2048)
    acts = np.asarray(data.activations, dtype=np.float32)
    assert acts.shape == (2048, 576) and np.isfinite(acts).all()
    assert np.array_equal(data.excluded, (data.position == 0) | np.isin(data.token_ids, [0, 1, 2]))
    eligible = ~data.excluded
    n, k = int(eligible.sum()), int(data.masked.sum())
    assert abs(k - 0.3 * n) < 4 * np.sqrt(n * 0.3 * 0.7)
    assert (data.token_ids[data.masked] == 2026).all()
    # position-0 activations are the huge-norm outliers the exclusion exists for
    norms = np.linalg.norm(acts, axis=1)
    assert np.median(norms[data.position == 0]) > 5 * np.median(norms[eligible])
    assert store.count_tokens() == n
