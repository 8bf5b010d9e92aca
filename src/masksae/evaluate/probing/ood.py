"""Kantamneni et al.'s OOD probing (JoshEngels/SAE-Probes ``run_datasets_OOD``), one SAE.

Per dataset: ``n_train`` balanced in-distribution texts (from the dataset's first ``pool``
rows) train a probe that is tested on the dataset's whole OOD file; features are the
residual-stream activations at each text's last token.

- Oracle: an L2 logistic regression on the raw activations.
- SAE probe: the SAE latents of those activations, the ``k`` latents with the largest
  |mean_pos - mean_neg| on the training set kept, an L1 logistic regression (saga).

Both choose C over logspace(5, -5, 10) by mean validation ROC-AUC (their ``find_best_reg``:
the last min(20%, 100) training texts held out, stratified 6-fold below 128 texts), refit on
all training texts and report the test ROC-AUC. The result holds each dataset's AUCs and
their means over the datasets (the masking paper's Figure 1).

Deviation: the oracle and the SAE probe train on the same balanced draw (the reference draws
the oracle's texts at random and takes the SAE probe's as the first 512 of each class).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np

from masksae.evaluate.probing.config import OodConfig
from masksae.evaluate.probing.pooling import encode_rows
from masksae.evaluate.probing.probes import SelectedProbe, select_and_fit, top_k_mean_diff
from masksae.evaluate.probing.suite import ProbingContext
from masksae.evaluate.tasks import TEST, TRAIN

log = logging.getLogger(__name__)


def rank_latents(f_train: np.ndarray, y_train: np.ndarray, k: int, rule: str) -> np.ndarray:
    """The ``k`` latents kept for the SAE probe (see OodConfig.latent_ranking)."""
    if rule == "normalized_mean_diff":
        nonzero = (f_train != 0).sum(axis=0)
        scale = f_train.sum(axis=0) / (nonzero + 1e-6)
        f_train = f_train / (scale + 1e-6)
    return top_k_mean_diff(f_train, y_train, k)


def _probe_summary(p: SelectedProbe) -> dict[str, Any]:
    return {
        "test_auc": p.test_auc,
        "val_auc": p.val_auc,
        "test_accuracy": p.test_accuracy,
        "test_f1": p.test_f1,
        "C": p.C,
    }


def run(sae: Any, ctx: ProbingContext) -> dict[str, Any]:
    """OOD probing of ``sae`` on ``ctx.cfg.ood.tasks`` (JSON-able result)."""
    cfg: OodConfig = ctx.cfg.ood
    d_sae = int(sae.cfg.d_sae)
    k = min(cfg.k, d_sae)
    if k < cfg.k:
        log.warning("OOD probing: k=%d exceeds d_sae=%d; keeping all %d latents", cfg.k, d_sae, k)
    per_task: dict[str, dict[str, Any]] = {}
    from masksae.progress import progress_bar

    for name in progress_bar(None, "ood tasks", "task", iterable=cfg.tasks, leave=False):
        data, acts = ctx.ood_task(name)
        tr, te = data.indices(TRAIN), data.indices(TEST)
        y_tr, y_te = data.labels[tr], data.labels[te]
        settings = {
            "Cs": list(cfg.Cs),
            "max_iter": cfg.probe_max_iter,
            "probe_seed": cfg.probe_seed,
        }

        def oracle(acts=acts, tr=tr, te=te, y_tr=y_tr, y_te=y_te) -> tuple[dict, dict]:
            p = select_and_fit(
                acts[tr],
                y_tr,
                acts[te],
                y_te,
                l1=False,
                Cs=cfg.Cs,
                seed=cfg.probe_seed,
                max_iter=cfg.probe_max_iter,
            )
            return {}, _probe_summary(p)

        _, oracle_res = ctx.memo("ood-oracle", data, settings, oracle)
        with ctx.timer.phase("sae_encode"):
            f = encode_rows(sae, acts, ctx.cfg.sae_batch_tokens)
        with ctx.timer.phase("sae_probes"):
            cols = rank_latents(f[tr], y_tr, k, cfg.latent_ranking)
            sae_probe = select_and_fit(
                f[tr][:, cols],
                y_tr,
                f[te][:, cols],
                y_te,
                l1=True,
                Cs=cfg.Cs,
                seed=cfg.probe_seed,
                max_iter=cfg.probe_max_iter,
            )
        per_task[name] = {
            "sae": _probe_summary(sae_probe),
            "oracle": oracle_res,
            "sae_test_auc": sae_probe.test_auc,
            "oracle_test_auc": float(oracle_res["test_auc"]),
            "n_train": int(len(tr)),
            "n_ood": int(len(te)),
            "latents": [int(c) for c in cols[: min(16, len(cols))]],
            "data": data.info,
        }
    sae_mean = float(np.mean([t["sae_test_auc"] for t in per_task.values()]))
    oracle_mean = float(np.mean([t["oracle_test_auc"] for t in per_task.values()]))
    result: dict[str, Any] = {
        "metric": "ood",
        "mean_sae_test_auc": sae_mean,
        "mean_oracle_test_auc": oracle_mean,
        "mean_gap": oracle_mean - sae_mean,
        "k": k,
        "per_task": per_task,
        "tasks": list(cfg.tasks),
        "config": {**asdict(cfg), "Cs": list(cfg.Cs)},
    }
    log.info(
        "OOD probing: mean test AUC SAE %.4f, oracle %.4f over %d dataset(s)",
        sae_mean,
        oracle_mean,
        len(per_task),
    )
    return result
