"""`--eval-store`: reconstruction activations taken from an activation store.

Clean metrics must use the non-masked, non-excluded tokens; masked metrics all non-excluded
tokens. A bias-only SAE (nothing fires, x_hat = b_dec) gives closed-form answers.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from masksae.errors import ConfigError, StoreError
from masksae.evaluate.data import store_activations

D, N, CHUNK, SEQ = 32, 600, 256, 50  # 3 chunks (the last 88 tokens)


def _data(seed: int = 0):
    """Activations: clean rows ~ N(0, 1); masked rows = 5 everywhere; excluded rows = 1000."""
    from masksae.storage import ChunkData

    rng = np.random.default_rng(seed)
    position = (np.arange(N) % SEQ).astype(np.int32)
    excluded = position == 0
    excluded[[77, 300]] = True  # special tokens mid-sequence
    masked = (rng.random(N) < 0.3) & ~excluded
    acts = rng.standard_normal((N, D)).astype(np.float32)
    acts[:, 0] = np.arange(N)  # row identity, exact in float32
    acts[masked, 1:] = 5.0
    acts[excluded, 1:] = 1000.0
    return ChunkData(
        activations=acts,
        token_ids=np.zeros(N, np.int32),
        masked=masked,
        excluded=excluded,
        seq_index=(np.arange(N) // SEQ).astype(np.int64),
        position=position,
    )


def _write_store(path, data, dtype="float32", **prov):
    from masksae.storage import ChunkData, StoreSpec, StoreWriter

    spec = StoreSpec(
        d_model=D,
        dtype=dtype,
        chunk_tokens=CHUNK,
        total_tokens=N,
        provenance={"model": "tiny", "layer": 1, "mask_prob": 0.3, **prov},
        compression="none",
    )
    with StoreWriter.open(path, spec) as writer:
        for index in range(writer.n_chunks):
            a, b = spec.chunk_bounds(index)
            writer.write_chunk(
                index,
                ChunkData(
                    activations=data.activations[a:b],
                    token_ids=data.token_ids[a:b],
                    masked=data.masked[a:b],
                    excluded=data.excluded[a:b],
                    seq_index=data.seq_index[a:b],
                    position=data.position[a:b],
                ),
            )
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    data = _data()
    return _write_store(tmp_path_factory.mktemp("store") / "s", data), data


def test_store_activations_selects_rows(store):
    path, data = store
    clean_rows = np.flatnonzero(~data.excluded & ~data.masked)
    all_rows = np.flatnonzero(~data.excluded)
    acts, info = store_activations(path, 10_000, include_masked=False)
    assert acts.shape == (len(clean_rows), D) and acts.dtype == torch.float32
    np.testing.assert_array_equal(acts[:, 0].numpy(), clean_rows)  # store order
    assert info["n_tokens"] == len(clean_rows) and info["d_model"] == D
    assert info["provenance"]["model"] == "tiny"
    acts, _ = store_activations(path, 10_000, include_masked=True)
    np.testing.assert_array_equal(acts[:, 0].numpy(), all_rows)
    # a smaller request takes the *last* usable rows (the part training reads least)
    acts, _ = store_activations(path, 40, include_masked=False)
    np.testing.assert_array_equal(acts[:, 0].numpy(), clean_rows[-40:])


def test_store_activations_bfloat16_and_errors(tmp_path, caplog):
    data = _data(1)
    path = _write_store(tmp_path / "bf", data, dtype="bfloat16")
    acts, _ = store_activations(path, 10_000, include_masked=True)
    want = torch.from_numpy(data.activations[~data.excluded]).to(torch.bfloat16).float()
    torch.testing.assert_close(acts, want, rtol=0, atol=0)
    with caplog.at_level(logging.WARNING, logger="masksae.evaluate.data"):
        store_activations(path, 10_000, include_masked=False)
    assert "fewer than the 10000" in caplog.text
    with pytest.raises(ConfigError):
        store_activations(path, 0, include_masked=True)
    with pytest.raises(StoreError):
        store_activations(tmp_path / "missing", 10, include_masked=True)


def _bias_only_ckpt(path, b_dec: torch.Tensor, model="tiny"):
    from masksae.train.checkpoint import write_checkpoint
    from masksae.train.sae import build_sae, sae_config_from_dict

    sae = build_sae(sae_config_from_dict({"architecture": "topk", "d_in": D, "d_sae": 16, "k": 2}))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)  # nothing ever fires: x_hat = b_dec
        sae.b_dec.copy_(b_dec)
    meta = {
        "format_version": 1,
        "run_name": path.name,
        "sae": sae.cfg.to_dict(),
        "train": {"seed": 0},
        "store": {"model": model, "revision": "r0", "layer": 1, "mask_prob": 0.3, "seed": 0},
        "store_fingerprint": "fp",
        "step": 10,
        "tokens": 1000,
        "complete": True,
    }
    write_checkpoint(path, sae, meta, None, None)
    return path


def _expected(x: np.ndarray, b: np.ndarray) -> dict[str, float]:
    x = x.astype(np.float64)
    sq = ((x - b) ** 2).sum(1)
    return {
        "n_tokens": len(x),
        "mse": sq.mean() / D,
        "explained_variance": 1.0 - sq.mean() / x.var(0).sum(),
        "l0": 0.0,
    }


def test_evaluate_from_store_known_answers(store, tmp_path):
    from masksae.evaluate.runner import EvaluateConfig, Evaluator

    path, data = store
    b = np.full(D, 0.5, np.float32)
    b[0] = 300.0  # near the row-id mean, so the id column does not dominate
    ckpt = _bias_only_ckpt(tmp_path / "ck", torch.from_numpy(b))
    # model "tiny" does not exist: nothing may touch the LLM on this path
    cfg = EvaluateConfig(
        metrics=("reconstruction",), eval_store=path, eval_masked=True, device="cpu"
    )
    cfg.data.n_tokens = 10_000
    doc = Evaluator(cfg).evaluate(ckpt)
    clean = data.activations[~data.excluded & ~data.masked]
    masked = data.activations[~data.excluded]
    for key, want_doc in (("core", _expected(clean, b)), ("core_masked", _expected(masked, b))):
        got = doc["metrics"][key]
        assert got["n_tokens"] == want_doc["n_tokens"]
        assert got["l0"] == 0.0
        assert got["mse"] == pytest.approx(want_doc["mse"], rel=1e-5)
        assert got["explained_variance"] == pytest.approx(
            want_doc["explained_variance"], rel=1e-5, abs=1e-6
        )
    # masked rows (all 5.0) sit far from b: the masked set scores clearly worse, and an
    # excluded row (1000.0) anywhere would have blown the MSE up by orders of magnitude
    assert doc["metrics"]["core_masked"]["mse"] > doc["metrics"]["core"]["mse"]
    assert doc["metrics"]["core"]["mse"] < 1e4
    assert doc["eval_data"]["store"]["n_tokens"] == len(clean)
    assert doc["eval_data"]["store_masked"]["n_tokens"] == len(masked)
    assert "clean" not in doc["eval_data"]  # no corpus activations were built


def test_eval_store_width_mismatch_is_clear(tmp_path):
    from masksae.evaluate.runner import EvaluateConfig, Evaluator
    from masksae.storage import ChunkData, StoreSpec, StoreWriter

    spec = StoreSpec(
        d_model=8,
        dtype="float32",
        chunk_tokens=64,
        total_tokens=64,
        provenance={"model": "tiny", "layer": 1},
        compression="none",
    )
    with StoreWriter.open(tmp_path / "s8", spec) as w:
        w.write_chunk(
            0,
            ChunkData(
                activations=np.ones((64, 8), np.float32),
                token_ids=np.zeros(64, np.int32),
                masked=np.zeros(64, bool),
                excluded=np.zeros(64, bool),
                seq_index=np.zeros(64, np.int64),
                position=np.arange(64, dtype=np.int32),
            ),
        )
    ckpt = _bias_only_ckpt(tmp_path / "ck", torch.zeros(D))
    cfg = EvaluateConfig(metrics=("reconstruction",), eval_store=tmp_path / "s8", device="cpu")
    with pytest.raises(ConfigError, match="8-dim activations but the SAE reads 32"):
        Evaluator(cfg).evaluate(ckpt)
