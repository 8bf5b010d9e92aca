"""`masksae evaluate` end to end on a tiny random model and tiny native checkpoints."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from masksae.evaluate.schema import PROVENANCE_KEYS, SCHEMA_NAME, SCHEMA_VERSION, load_result


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
        },
        "store_fingerprint": "fp",
        "step": 10,
        "tokens": 1000,
        "complete": True,
    }
    write_checkpoint(path, sae, meta, None, None)


@pytest.fixture()
def sweep(tmp_path, tiny_model_dir):
    root = tmp_path / "sweep"
    _write_ckpt(root / "run-k4-p0", tiny_model_dir, 4, 0.0, 0)
    _write_ckpt(root / "run-k8-p03", tiny_model_dir, 8, 0.3, 1)
    return root


def test_evaluate_cli_writes_schema_and_reuses_cache(sweep, tmp_path, caplog):
    from typer.testing import CliRunner

    from masksae.cli import app

    out, cache = tmp_path / "eval", tmp_path / "cache"
    args = [
        "evaluate",
        "--checkpoints",
        str(sweep),
        "--metrics",
        "core",
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--eval-tokens",
        "300",
        "--context-length",
        "32",
        "--ce-sequences",
        "4",
        "--device",
        "cpu",
        "--eval-masked",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == ["sweep__run-k4-p0.json", "sweep__run-k8-p03.json"]
    first, second = (load_result(f) for f in files)
    for doc in (first, second):
        assert doc["schema"] == SCHEMA_NAME and doc["schema_version"] == SCHEMA_VERSION
        assert set(doc["provenance"]) == set(PROVENANCE_KEYS)
        core = doc["metrics"]["core"]
        assert core["n_tokens"] == 300
        assert 0 < core["l0"] <= doc["provenance"]["k"] + 1e-6
        for key in (
            "explained_variance",
            "explained_variance_legacy",
            "mse",
            "cosine_similarity",
            "relative_norm",
            "frac_dead",
            "feature_density",
        ):
            assert key in core
        ds = core["downstream"]
        assert 0 < ds["n_tokens"] <= 4 * 30  # source and target kept, position 0 never
        assert ds["ce_loss_zero"] > 0 and "kl_div_sae" in ds
        assert doc["metrics"]["core_masked"]["n_tokens"] == 300
        assert doc["timings_s"]["total"] > 0
    assert first["provenance"]["k"] == 4 and second["provenance"]["mask_prob"] == 0.3
    assert first["provenance"]["architecture"] == "topk" and first["provenance"]["seed"] == 0
    # the first checkpoint builds the activation cache; the second reads it
    assert first["eval_data"]["clean"]["cache_hit"] is False
    assert second["eval_data"]["clean"]["cache_hit"] is True
    # clean + masked at p=0.3 (the p=0 run is scored on masked text at the default p=0.3)
    assert len(list(cache.glob("evaldata-*/meta.json"))) == 2
    assert list(cache.glob("baseline-*.json"))
    assert second["metrics"]["core"]["downstream"]["ce_loss_zero"] == pytest.approx(
        first["metrics"]["core"]["downstream"]["ce_loss_zero"]
    )
    # rerunning the same command skips both checkpoints: their results exist, same settings
    before = [f.read_bytes() for f in files]
    with caplog.at_level(logging.INFO, logger="masksae"):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert [f.read_bytes() for f in files] == before
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 2 and all("--overwrite to redo" in m for m in skipped)
    # --overwrite recomputes; a fresh process re-evaluating reuses the on-disk cache too
    res = CliRunner().invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    again = json.loads(files[0].read_text())
    assert again["created"] >= first["created"] and again["timings_s"] != first["timings_s"]
    assert again["eval_data"]["clean"]["cache_hit"] is True
    assert again["metrics"]["core"]["explained_variance"] == pytest.approx(
        first["metrics"]["core"]["explained_variance"], rel=1e-9
    )
    # other settings (CE on 2 sequences) recompute the results, with a warning saying why
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="masksae"):
        res = CliRunner().invoke(app, [*args[:-4], "2", "--device", "cpu", "--eval-masked"])
    assert res.exit_code == 0, res.output
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recomputing")]
    assert len(warned) == 2 and all("settings differ (downstream)" in m for m in warned)
    assert json.loads(files[0].read_text())["settings"]["downstream"]["n_sequences"] == 2


def test_evaluate_cli_clear_errors(tmp_path):
    from typer.testing import CliRunner

    from masksae.cli import app

    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(
        app, ["evaluate", "--checkpoints", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    assert "no run or checkpoint" in res.output
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--checkpoints",
            str(tmp_path),
            "--metrics",
            "bogus",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "unknown metric" in res.output


def test_absorption_is_dispatched_with_its_cache(sweep, tmp_path, monkeypatch):
    from masksae.evaluate import absorption
    from masksae.evaluate.runner import EvaluateConfig, Evaluator

    calls = []

    def fake_run(sae, lm, layer, cfg, cache_dir):
        calls.append((layer, cache_dir, lm.d_model, sae.cfg.d_sae))
        return {"mean_full_absorption_score": 0.25, "absorption_paper_convention": 75.0}

    monkeypatch.setattr(absorption, "run", fake_run)
    cfg = EvaluateConfig(metrics=("absorption",), cache_dir=tmp_path / "c", device="cpu")
    doc = Evaluator(cfg).evaluate(sweep / "run-k4-p0")
    assert doc["metrics"] == {
        "absorption": {"mean_full_absorption_score": 0.25, "absorption_paper_convention": 75.0}
    }
    assert calls == [(1, tmp_path / "c" / "absorption", 32, 64)]
    assert "absorption" in doc["timings_s"] and "core" not in doc["timings_s"]


def test_unlearned_threshold_is_warned_about(tmp_path, tiny_model_dir, caplog):
    import logging

    from masksae.evaluate.data import EvalDataConfig
    from masksae.evaluate.runner import EvaluateConfig, evaluate_checkpoints
    from masksae.train.checkpoint import write_checkpoint
    from masksae.train.sae import build_sae, sae_config_from_dict

    sae = build_sae(
        sae_config_from_dict({"architecture": "batch_topk", "d_in": 32, "d_sae": 64, "k": 4})
    )
    assert float(sae.threshold) < 0  # never learned: the run stopped before threshold_start_step
    meta = {
        "format_version": 1,
        "run_name": "short",
        "sae": sae.cfg.to_dict(),
        "train": {"seed": 0},
        "store": {"model": str(tiny_model_dir), "revision": "r0", "layer": 1, "mask_prob": 0.0},
        "store_fingerprint": "fp",
        "step": 5,
        "tokens": 500,
        "complete": True,
    }
    write_checkpoint(tmp_path / "short", sae, meta, None, None)
    data = EvalDataConfig(n_tokens=64, context_length=32)
    cfg = EvaluateConfig(metrics=("reconstruction",), data=data, device="cpu")
    with caplog.at_level(logging.WARNING, logger="masksae.evaluate.runner"):
        evaluate_checkpoints([tmp_path / "short"], tmp_path / "out", cfg)
    assert "inference threshold was never learned" in caplog.text


def test_evaluate_shows_progress_bars_and_estimates_the_work(sweep, tmp_path, capsys, caplog):
    """Each LLM pass and metric draws a tqdm bar on stderr (none with progress off), and
    the run starts with one line estimating the work."""
    import logging

    from masksae.evaluate.data import EvalDataConfig
    from masksae.evaluate.downstream import DownstreamConfig
    from masksae.evaluate.runner import EvaluateConfig, evaluate_checkpoints

    def run(progress: bool, out: str) -> str:
        cfg = EvaluateConfig(
            metrics=("core", "cooccurrence"),
            data=EvalDataConfig(n_tokens=200, context_length=32),
            downstream=DownstreamConfig(n_sequences=4),
            device="cpu",
            progress=progress,
        )
        with caplog.at_level(logging.INFO, logger="masksae"):
            evaluate_checkpoints([sweep / "run-k4-p0"], tmp_path / out, cfg)
        return capsys.readouterr().err

    err = run(True, "a")
    for desc in ("eval activations (LLM)", "core (SAE)", "CE/KL (LLM splice)", "co-occurrence"):
        assert desc in err, desc
    assert re.search(r"CE/KL \(LLM splice\): +0%\S* +\S* 0/4 ", err)  # the 4 sequences
    estimate = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate:")]
    assert estimate == [
        "evaluate: 1 checkpoint(s) x 2 metric(s) (core, cooccurrence); eval activations: 200 "
        "LLM tokens per model/layer (1 model/layer(s), 0 cached); CE/KL: 128 tokens x 1 "
        "checkpoint(s), 2 LLM passes each (clean and zero-ablation passes once per evaluation "
        "set, reused after the first)"
    ]
    assert "CE/KL" not in run(False, "b")
