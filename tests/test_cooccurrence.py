"""The co-occurrence metric on synthetic codes with known co-activation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from masksae.errors import ConfigError
from masksae.evaluate.cooccurrence import (
    CooccurrenceConfig,
    cooccurrence_metrics,
    pair_statistics,
    sparse_codes,
)


class _CodesAsSAE(torch.nn.Module):
    """encode(x) = x: the 'activations' are the codes themselves."""

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(d_sae=d_sae)

    def encode(self, x_BF: torch.Tensor) -> torch.Tensor:
        return x_BF


def _run(codes_NF: torch.Tensor, absorption=None, **cfg) -> dict:
    sae = _CodesAsSAE(codes_NF.shape[1])
    return cooccurrence_metrics(sae, codes_NF, CooccurrenceConfig(**cfg), absorption)


def _naive_pairs(codes_NF: np.ndarray) -> dict[str, np.ndarray]:
    """Dense reference: every pair i < j of the given columns."""
    B = (codes_NF != 0).astype(np.float64)
    n = B.shape[0]
    C = B.T @ B
    i, j = np.triu_indices(B.shape[1], k=1)
    n_ab, n_a, n_b = C[i, j], C[i, i], C[j, j]
    ratio = n_ab / np.minimum(n_a, n_b)
    with np.errstate(divide="ignore"):
        pmi = np.log(n_ab * n / (n_a * n_b))
        npmi = np.where(n_ab > 0, pmi / -np.log(n_ab / n), -1.0)
    return {
        "ratio": ratio,
        "pmi": pmi[n_ab > 0],
        "npmi": npmi,
        "oe": n_ab.sum() / (n_a * n_b / n).sum(),
    }


def test_independent_latents_have_pmi_near_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3, 0.4])
    codes = (torch.rand(40_000, 6, generator=gen) < rates).float() * 2.0
    out = _run(codes, min_firing_rate=0.05)
    pairs = out["frequent_pairs"]
    assert pairs["n_latents_used"] == 6 and pairs["n_pairs"] == 15
    assert pairs["n_pairs_cooccurring"] == 15
    assert abs(pairs["pmi_cooccurring"]["mean"]) < 0.03
    assert abs(pairs["npmi"]["mean"]) < 0.02
    assert pairs["observed_over_expected"] == pytest.approx(1.0, abs=0.02)
    # exact against the dense reference
    ref = _naive_pairs(codes.numpy())
    assert pairs["pmi_cooccurring"]["mean"] == pytest.approx(ref["pmi"].mean())
    assert pairs["npmi"]["mean"] == pytest.approx(ref["npmi"].mean())
    assert pairs["cooccurrence_ratio"]["mean"] == pytest.approx(ref["ratio"].mean())
    assert pairs["cooccurrence_ratio"]["q50"] == pytest.approx(np.median(ref["ratio"]))
    assert pairs["observed_over_expected"] == pytest.approx(ref["oe"])
    assert out["mean_l0"] == pytest.approx(codes.count_nonzero().item() / 40_000)


def test_nested_parent_child_and_exclusive_latents() -> None:
    """Latent 1 fires only with latent 0 (child of a parent): ratio 1, P(parent | child) 1.
    Latent 2 never fires with latent 0 (absorbed away): npmi -1, P(parent | 2) = 0."""
    gen = torch.Generator().manual_seed(1)
    n = 20_000
    parent = torch.rand(n, generator=gen) < 0.3
    child = parent & (torch.rand(n, generator=gen) < 0.2)
    exclusive = ~parent & (torch.rand(n, generator=gen) < 0.1)
    noise = torch.rand(n, 3, generator=gen) < 0.2
    codes = torch.cat([parent[:, None], child[:, None], exclusive[:, None], noise], 1).float()
    absorption = {
        "per_letter": {
            "s": {"main_latents": [0], "absorbing_latents": [[1, 4], [2, 3]]},
            "t": {"main_latents": [0], "absorbing_latents": [[0, 9]]},  # self pair skipped
        }
    }
    out = _run(codes, absorption, min_firing_rate=0.01)
    pc = out["parent_child"]
    assert pc["n_pairs"] == 2 and pc["n_pairs_observed"] == 2
    nested, apart = pc["pairs"]
    assert (nested["main"], nested["absorber"], nested["n_absorbed_tokens"]) == (0, 1, 4)
    assert nested["p_main_given_absorber"] == 1.0 and nested["cooccurrence_ratio"] == 1.0
    assert nested["n_both"] == nested["n_absorber"] == int(child.sum())
    assert nested["p_absorber_given_main"] == pytest.approx(
        child.sum().item() / parent.sum().item()
    )
    assert nested["npmi"] > 0.3
    assert apart["p_main_given_absorber"] == 0.0 and apart["npmi"] == -1.0
    assert pc["mean_p_main_given_absorber"] == pytest.approx(0.5)
    # the frequent-pair block sees the same structure
    pairs = out["frequent_pairs"]
    assert pairs["n_pairs"] == 15 and pairs["npmi"]["q05"] == -1.0


def test_floor_cap_and_missing_absorption() -> None:
    gen = torch.Generator().manual_seed(2)
    rates = torch.tensor([0.5, 0.3, 0.2, 0.004, 0.0])
    codes = (torch.rand(10_000, 5, generator=gen) < rates).float()
    out = _run(codes, min_firing_rate=0.01, max_latents=2)
    pairs = out["frequent_pairs"]
    assert pairs["n_frequent_latents"] == 3 and pairs["n_latents_used"] == 2
    assert pairs["n_pairs"] == 1  # the two most frequent
    assert out["parent_child"]["n_pairs"] == 0 and "absorption" in out["parent_child"]["note"]
    few = _run(codes, min_firing_rate=0.45)
    assert few["frequent_pairs"]["n_pairs"] == 0 and "npmi" not in few["frequent_pairs"]


def test_sparse_codes_batches_and_pair_statistics_edges() -> None:
    codes = torch.zeros(7, 4)
    codes[0, 1] = codes[3, 2] = codes[6, 1] = -0.5  # any non-zero activation counts
    sc = sparse_codes(_CodesAsSAE(4), codes, batch_size=3)
    assert sc.token_idx.tolist() == [0, 3, 6] and sc.latent_idx.tolist() == [1, 2, 1]
    assert sc.counts().tolist() == [0, 2, 1, 0]
    s = pair_statistics(np.array([0, 5, 10]), np.array([4, 5, 10]), np.array([4, 10, 10]), 10)
    assert s["npmi"].tolist() == [-1.0, pytest.approx(math.log(1.0) / -math.log(0.5)), 1.0]
    assert math.isnan(s["pmi"][0]) and s["cooccurrence_ratio"].tolist() == [0.0, 1.0, 1.0]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="min_firing_rate"):
        CooccurrenceConfig(min_firing_rate=0.0)
    with pytest.raises(ConfigError, match="max_latents"):
        CooccurrenceConfig(max_latents=0)


def _checkpoint(path, model_dir) -> None:
    from masksae.train.checkpoint import write_checkpoint
    from masksae.train.sae import build_sae, sae_config_from_dict

    torch.manual_seed(0)
    sae = build_sae(sae_config_from_dict({"architecture": "topk", "d_in": 32, "d_sae": 64, "k": 4}))
    meta = {
        "format_version": 1,
        "run_name": path.name,
        "sae": sae.cfg.to_dict(),
        "train": {"seed": 0},
        "store": {"model": str(model_dir), "revision": "r0", "layer": 1, "mask_prob": 0.0},
        "store_fingerprint": "fp",
        "step": 10,
        "tokens": 1000,
        "complete": True,
    }
    write_checkpoint(path, sae, meta, None, None)


def test_evaluate_cli_runs_cooccurrence_after_absorption(tmp_path, tiny_model_dir, monkeypatch):
    """`--metrics reconstruction,absorption,cooccurrence`: one result section, the parent-child
    pairs taken from that SAE's absorption result, the clean activations built once."""
    from typer.testing import CliRunner

    from masksae.cli import app
    from masksae.evaluate import absorption, runner
    from masksae.evaluate.schema import load_result

    def fake_absorption(sae, lm, layer, cfg, cache_dir):
        return {"per_letter": {"a": {"main_latents": [0, 1], "absorbing_latents": [[2, 3]]}}}

    builds = []
    real_build = runner.build_eval_data

    def count_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(absorption, "run", fake_absorption)
    monkeypatch.setattr(runner, "build_eval_data", count_build)
    _checkpoint(tmp_path / "run", tiny_model_dir)
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--checkpoints",
            str(tmp_path / "run"),
            "--metrics",
            "reconstruction,absorption,cooccurrence",
            "--eval-tokens",
            "512",
            "--cooccurrence-min-rate",
            "0.02",
            "--cooccurrence-max-latents",
            "16",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = load_result(next(out.glob("*.json")))
    co = doc["metrics"]["cooccurrence"]
    assert co["n_tokens"] == doc["metrics"]["core"]["n_tokens"] and co["d_sae"] == 64
    assert co["mean_l0"] == pytest.approx(doc["metrics"]["core"]["l0"], rel=1e-6)
    assert co["min_firing_rate"] == 0.02 and co["frequent_pairs"]["n_latents_used"] <= 16
    assert [(p["main"], p["absorber"]) for p in co["parent_child"]["pairs"]] == [(0, 2), (1, 2)]
    assert "cooccurrence" in doc["timings_s"]
    assert len(builds) == 1  # reconstruction and cooccurrence share the clean activations
