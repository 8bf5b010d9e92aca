"""`masksae evaluate` with the probing metrics end to end on a tiny random model (tiny
preset, real sae-probes texts), the activation cache across checkpoints, and the report's
rows and Figure 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from masksae.errors import ConfigError
from masksae.evaluate.probing import probing_preset
from masksae.evaluate.probing.suite import check_disjoint
from masksae.evaluate.runner import METRICS, EvaluateConfig
from masksae.evaluate.schema import load_result

PROBING = ("sparse_probing", "scr", "tpp", "ood")


def _write_ckpt(path, model_dir, k, mask_prob, seed):
    from masksae.train.checkpoint import write_checkpoint
    from masksae.train.sae import build_sae, sae_config_from_dict

    torch.manual_seed(seed)
    sae = build_sae(sae_config_from_dict({"architecture": "topk", "d_in": 32, "d_sae": 64, "k": k}))
    meta = {
        "format_version": 1,
        "run_name": path.name,
        "sae": sae.cfg.to_dict(),
        "train": {"seed": seed},
        "store": {
            "model": str(model_dir),
            "revision": "r0",
            "layer": 1,
            "mask_prob": mask_prob,
            "seed": 0,
            "corpus": {"source": "bundled", "kind": "bundled"},
        },
        "store_fingerprint": "fp",
        "step": 10,
        "tokens": 1000,
        "complete": True,
    }
    write_checkpoint(path, sae, meta, None, None)


def test_probing_metrics_cli_cache_and_report(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from masksae.cli import app

    root = tmp_path / "sweep"
    _write_ckpt(root / "a-k4-p0", tiny_model_dir, 4, 0.0, 0)
    _write_ckpt(root / "b-k4-p03-s0", tiny_model_dir, 4, 0.3, 0)
    _write_ckpt(root / "c-k4-p03-s1", tiny_model_dir, 4, 0.3, 1)
    out, cache = tmp_path / "eval", tmp_path / "cache"
    args = [
        "evaluate",
        "--checkpoints",
        str(root),
        "--metrics",
        ",".join(PROBING),
        "--probing-preset",
        "tiny",
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--device",
        "cpu",
        "--no-progress",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    docs = [load_result(f) for f in sorted(out.glob("*.json"))]
    assert len(docs) == 3
    first, second = docs[0], docs[1]
    for doc in docs:
        m = doc["metrics"]
        assert set(PROBING) <= set(m)
        assert 0 <= m["sparse_probing"]["sae_top_1_test_accuracy"] <= 1
        assert m["sparse_probing"]["per_task"]["world_country"]["n_classes"] == 5
        assert "scr_metric_threshold_2" in m["scr"] and "scr_dir1_threshold_5" in m["scr"]
        assert "tpp_threshold_5_total_metric" in m["tpp"]
        assert 0 <= m["ood"]["mean_sae_test_auc"] <= 1
        task = m["ood"]["per_task"]["5_hist_fig_ismale"]
        assert task["n_train"] == 128 and task["n_ood"] == 299
        assert m["sparse_probing"]["settings"]["preset"] == "tiny"
    # the first checkpoint captures and caches; the next ones never run the LLM
    assert not any(first["metrics"]["scr"]["cache_hits"].values())
    assert "load_llm" in first["timings_s"]
    for name in PROBING:
        assert all(second["metrics"][name]["cache_hits"].values())
        assert "llm_activations" not in second["metrics"][name]["timings_s"]
        assert "llm_probes" not in second["metrics"][name]["timings_s"]
    assert "load_llm" not in second["timings_s"]
    # SAE-independent numbers agree across checkpoints (same cached activations and probes)
    assert (
        second["metrics"]["ood"]["mean_oracle_test_auc"]
        == first["metrics"]["ood"]["mean_oracle_test_auc"]
    )
    assert (
        second["metrics"]["sparse_probing"]["llm_top_1_test_accuracy"]
        == first["metrics"]["sparse_probing"]["llm_top_1_test_accuracy"]
    )
    assert list((cache / "probing").glob("probing-*.npz"))

    report = tmp_path / "report"
    res = CliRunner().invoke(app, ["report", str(out), "--out", str(report)])
    assert res.exit_code == 0, res.output
    text = (report / "report.md").read_text()
    for label in (
        "Sparse Probing, SAE top-k accuracy %",
        "TPP %",
        "SCR %",
        "OOD probing AUC %, SAE",
    ):
        assert label in text
    assert "Probing rows - sparse_probing: top-1 latents, preset tiny" in text
    figures = list(report.glob("ood_probing_*_k4.png"))
    assert len(figures) == 1 and figures[0].stat().st_size > 5000
    assert f"![OOD probing AUC]({figures[0].name})" in text


def test_metrics_all_expands_and_unknown_is_refused():
    cfg = EvaluateConfig(metrics=("all",))
    assert cfg.metrics == tuple(m for m in METRICS if m != "reconstruction")
    assert set(PROBING) <= set(cfg.metrics)
    with pytest.raises(ConfigError, match="unknown metric"):
        EvaluateConfig(metrics=("sparse",))


def test_probing_texts_must_not_be_training_data(tmp_path):
    cfg = probing_preset("paper")
    store = {"corpus": {"source": "LabHC/bias_in_bios", "kind": "hub"}}
    with pytest.raises(ConfigError, match="probing texts would be SAE training data"):
        check_disjoint(store, cfg, ("scr",))
    check_disjoint(store, cfg, ("ood",))  # the OOD tasks read only the sae-probes files
    from masksae.evaluate.tasks import sae_probes

    local = {"corpus": {"source": str(sae_probes.data_dir() / "cleaned_data"), "kind": "local"}}
    with pytest.raises(ConfigError, match="probing texts would be SAE training data"):
        check_disjoint(local, cfg, ("ood",))
    check_disjoint({"corpus": {"source": "bundled", "kind": "bundled"}}, cfg, PROBING)


def test_probing_config_errors_name_the_value():
    cfg = probing_preset("demo")
    cfg.sparse_probing.headline_k = 3
    with pytest.raises(ConfigError, match="headline_k=3 is not among k_values"):
        cfg.validate()
    with pytest.raises(ConfigError, match="unknown probing preset 'big'"):
        probing_preset("big")


def test_captured_activations_match_single_text_forwards(tiny_model_dir):
    """Batched, padded capture equals each text run alone; BOS is prepended and left out
    (SAEBench's mask), and the OOD capture reads each text's last token."""
    from masksae.evaluate.probing.activations import (
        encode_texts,
        last_token_activations,
        token_activations,
    )
    from masksae.models import capture_resid_post, load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    tok = lm.tokenizer
    texts = ["the cat sat", "a", "green hills and rivers of light under skies", "seven eleven"]
    acts = token_activations(
        lm,
        1,
        texts,
        context_length=6,
        prepend_bos=True,
        batch_size=3,
        dtype="float32",
        progress=False,
    )
    encoded = encode_texts(tok, texts, 6, True, keep="start")
    assert all(ids[0] == tok.bos_token_id and len(ids) <= 6 for ids in encoded)
    assert acts.lengths.tolist() == [len(ids) - 1 for ids in encoded]  # BOS left out
    last = last_token_activations(
        lm, 1, texts, context_length=6, prepend_bos=True, batch_size=3, progress=False
    )
    ends = encode_texts(tok, texts, 6, True, keep="end")
    for i, (ids, end_ids) in enumerate(zip(encoded, ends, strict=True)):
        alone = capture_resid_post(lm, torch.tensor([ids]), None, 1)[0].float().numpy()
        rows = acts.acts_ND[acts.offsets[i] : acts.offsets[i + 1]]
        np.testing.assert_allclose(rows, alone[1:], rtol=1e-4, atol=1e-4)
        alone_end = capture_resid_post(lm, torch.tensor([end_ids]), None, 1)[0, -1].numpy()
        np.testing.assert_allclose(last[i], alone_end, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(acts.pooled()[0], acts.acts_ND[: acts.offsets[1]].mean(0), rtol=1e-6)
    # without BOS the first position (the attention sink) is left out instead
    no_bos = token_activations(
        lm, 1, texts, context_length=6, prepend_bos=False, batch_size=4, progress=False
    )
    plain = encode_texts(tok, texts, 6, False, keep="start")
    assert plain[0][0] != tok.bos_token_id
    assert no_bos.lengths.tolist() == [max(len(ids) - 1, 0) for ids in plain]
