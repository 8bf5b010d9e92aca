"""SAEBench targeted probe perturbation (``evals/scr_and_tpp`` without perform_scr), one SAE.

Per task (at least 3 classes), one L2 logistic probe per class on the mean-pooled LLM
activations (one-vs-rest, balanced negatives: the same sets as sparse probing). For class c,
the SAE latents are ranked by max(mean latent over c's positives - over its negatives, 0) x
(probe_c . decoder row) (SAEBench's TPP effects: no absolute value); ablating the top N
(mean-pooled ablation, see :mod:`masksae.evaluate.probing.ablation`) should hurt probe c and
spare the others:

    TPP(c, N) = (A_clean(c) - A_abl(c)) - mean over j != c of (A_clean(j) - A_abl(j))

each accuracy measured on that probe's own test set. Averaged over classes, then tasks; the
intended and unintended parts are reported too.

Deviation: scikit-learn probes fitted to convergence (SAEBench: Adam with an L1 penalty,
keeping the epoch with the best test accuracy); test negatives drawn once with a seed
(SAEBench redraws them at every accuracy measurement).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np

from masksae.evaluate.probing.ablation import (
    ablate_pooled,
    decoder_matrix,
    linear_accuracy,
    node_effects,
    top_n_latents,
)
from masksae.evaluate.probing.config import TppConfig
from masksae.evaluate.probing.probes import balanced_one_vs_rest, logistic, quiet_fit
from masksae.evaluate.probing.sparse_probing import class_rng
from masksae.evaluate.probing.suite import ProbingContext
from masksae.evaluate.tasks import TEST, TRAIN, TaskData

log = logging.getLogger(__name__)


def tpp_sets(data: TaskData, seed: int) -> list[dict[str, np.ndarray]]:
    """Per class: one-vs-rest train/test indices and labels (sparse probing's draws)."""
    n = len(data.label_names)
    by_split = {s: [data.indices(s, c) for c in range(n)] for s in (TRAIN, TEST)}
    out = []
    for c in range(n):
        rng = class_rng(seed, data.name, c)
        tr, ytr = balanced_one_vs_rest(by_split[TRAIN], c, rng)
        te, yte = balanced_one_vs_rest(by_split[TEST], c, rng)
        out.append({"train": tr, "y_train": ytr, "test": te, "y_test": yte})
    return out


def tpp_scores(clean: np.ndarray, ablated: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(total, intended, unintended) per ablated class from the clean accuracies [C] and the
    accuracies after ablating each class's latents [C ablated, C measured]."""
    drop = clean[None, :] - ablated
    intended = np.diag(drop).copy()
    n = len(clean)
    unintended = (drop.sum(axis=1) - intended) / max(n - 1, 1)
    return intended - unintended, intended, unintended


def _llm_probes(x: np.ndarray, sets: list[dict], C: float, max_iter: int):
    W, b, acc = [], [], []
    for s in sets:
        probe = quiet_fit(logistic(C, max_iter=max_iter), x[s["train"]], s["y_train"])
        W.append(probe.coef_[0].astype(np.float32))
        b.append(float(probe.intercept_[0]))
        acc.append(linear_accuracy(x[s["test"]], s["y_test"], W[-1], b[-1]))
    return {"W": np.stack(W), "b": np.array(b, np.float32)}, {"clean_accuracy": acc}


def run(sae: Any, ctx: ProbingContext) -> dict[str, Any]:
    """TPP of ``sae`` on ``ctx.cfg.tpp.tasks`` (JSON-able result)."""
    cfg: TppConfig = ctx.cfg.tpp
    W_dec = decoder_matrix(sae)
    n_values = [n for n in cfg.n_values if n <= W_dec.shape[0]]
    per_task: dict[str, dict[str, Any]] = {}
    from masksae.progress import progress_bar

    for name in progress_bar(None, "tpp tasks", "task", iterable=cfg.tasks, leave=False):
        data, acts = ctx.classes_task(
            name, cfg.train_per_class, cfg.test_per_class, cfg.seed, cfg.context_length
        )
        if len(data.label_names) < 3:
            log.warning(
                "TPP task %s has %d classes: with 2 the probes mirror each other and TPP "
                "is near 0 by construction; use tasks with 3 or more classes",
                name,
                len(data.label_names),
            )
        pooling = ctx.pooling(name)
        x = acts.features(pooling)
        sets = tpp_sets(data, cfg.seed)
        arrays, meta = ctx.memo(
            "tpp-llm-probes",
            data,
            {
                "C": cfg.probe_C,
                "max_iter": cfg.probe_max_iter,
                "seed": cfg.seed,
                "pooling": pooling,
            },
            lambda x=x, sets=sets: _llm_probes(x, sets, cfg.probe_C, cfg.probe_max_iter),
        )
        W, b = arrays["W"], arrays["b"]
        clean = np.array(meta["clean_accuracy"])
        f = ctx.sae_features(sae, data, acts, pooling)
        n_classes = len(sets)
        res: dict[str, Any] = {}
        with ctx.timer.phase("sae_ablation"):
            effects = [
                node_effects(
                    f[s["train"]], s["y_train"], W[c], W_dec, absolute=False, positive_only=True
                )
                for c, s in enumerate(sets)
            ]
            for n in n_values:
                ablated = np.zeros((n_classes, n_classes))
                for c in range(n_classes):
                    x_abl = ablate_pooled(x, f, W_dec, top_n_latents(effects[c], n))
                    for j, s in enumerate(sets):
                        ablated[c, j] = linear_accuracy(x_abl[s["test"]], s["y_test"], W[j], b[j])
                total, intended, unintended = tpp_scores(clean, ablated)
                res[f"tpp_threshold_{n}_total_metric"] = float(total.mean())
                res[f"tpp_threshold_{n}_intended_diff_only"] = float(intended.mean())
                res[f"tpp_threshold_{n}_unintended_diff_only"] = float(unintended.mean())
                res.setdefault("per_class", {})[str(n)] = {
                    data.label_names[c]: float(total[c]) for c in range(n_classes)
                }
        per_task[name] = {
            **res,
            "pooling": pooling,
            "llm_clean_accuracy": {data.label_names[c]: float(a) for c, a in enumerate(clean)},
            "data": data.info,
        }
    keys = [k for k in next(iter(per_task.values())) if k.startswith("tpp_")]
    result: dict[str, Any] = {
        "metric": "tpp",
        **{k: float(np.mean([t[k] for t in per_task.values()])) for k in keys},
        "headline_n": cfg.headline_n,
        "n_values": n_values,
        "per_task": per_task,
        "tasks": list(cfg.tasks),
        "config": asdict(cfg),
    }
    if f"tpp_threshold_{cfg.headline_n}_total_metric" in result:
        log.info(
            "TPP: top-%d score %.4f over %d task(s)",
            cfg.headline_n,
            result[f"tpp_threshold_{cfg.headline_n}_total_metric"],
            len(per_task),
        )
    return result
