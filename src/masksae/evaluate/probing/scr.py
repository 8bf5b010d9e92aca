"""SAEBench spurious correlation removal (``evals/scr_and_tpp``, perform_scr), one SAE.

A task gives texts with a target attribute a (e.g. profession) and a spurious one b (e.g.
gender), in quadrants (a, b). Per split, three probe sets (SAEBench's dataset_creation):
the a-set (positives: a = 1, q from each b), the b-set (positives: b = 1, q from each a) and
the biased set (a = b = 1 against a = b = 0, 2q each: a and b perfectly correlated). Three
L2 logistic probes are fitted on the mean-pooled LLM activations of the training texts.

The biased probe relies partly on b. Direction 1 ablates the SAE latents that most affect
the b-probe (|mean latent difference on the b-set x probe . decoder row|, the top N) and
measures the biased probe on the a-set's test texts; direction 2 swaps the roles. With
A_orig the biased probe's accuracy before ablation, A_abl after, and A_clean the matching
clean probe's accuracy on the same texts,

    SCR = (A_abl - A_orig) / (A_clean - A_orig),   0 when A_clean - A_orig < 0.001

(SAEBench's guard). The reported score per N takes the direction in which the biased probe
is worse (it leans on the other attribute): direction 1 when A_orig(a-data) < A_orig(b-data),
direction 2 when greater; on a tie (SAEBench leaves the score undefined) the mean of both.
Scores are averaged over tasks.

Deviation: the probes are scikit-learn L2 logistic regressions fitted to convergence
(SAEBench: an Adam-trained probe with an L1 penalty, batch 16, 20 epochs, keeping the epoch
with the best test accuracy).
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
from masksae.evaluate.probing.config import ScrConfig
from masksae.evaluate.probing.probes import logistic, quiet_fit
from masksae.evaluate.probing.suite import ProbingContext
from masksae.evaluate.tasks import TEST, TRAIN, TaskData

log = logging.getLogger(__name__)

PROBES = ("target", "spurious", "biased")


def scr_sets(data: TaskData, split: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(row indices, 0/1 labels) of the target, spurious and biased probe sets of a split."""
    quad = {(a, b): data.indices(split, 2 * a + b) for a in (0, 1) for b in (0, 1)}
    q = min(len(quad[(0, 1)]), len(quad[(1, 0)]))

    def pair(pos: list[np.ndarray], neg: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        p, n = np.concatenate(pos), np.concatenate(neg)
        y = np.concatenate([np.ones(len(p), np.int64), np.zeros(len(n), np.int64)])
        return np.concatenate([p, n]), y

    return {
        "target": pair([quad[(1, 1)][:q], quad[(1, 0)][:q]], [quad[(0, 1)][:q], quad[(0, 0)][:q]]),
        "spurious": pair(
            [quad[(1, 1)][:q], quad[(0, 1)][:q]], [quad[(1, 0)][:q], quad[(0, 0)][:q]]
        ),
        "biased": pair([quad[(1, 1)][: 2 * q]], [quad[(0, 0)][: 2 * q]]),
    }


def scr_score(changed: float, original: float, clean: float, min_denominator: float) -> float:
    """SAEBench's normalised SCR: (A_abl - A_orig) / (A_clean - A_orig), or 0 when the
    denominator is below ``min_denominator``."""
    if clean - original < min_denominator:
        return 0.0
    return (changed - original) / (clean - original)


def _llm_probes(x: np.ndarray, train: dict, test: dict, C: float, max_iter: int):
    W, b, acc = [], [], {}
    for name in PROBES:
        idx, y = train[name]
        probe = quiet_fit(logistic(C, max_iter=max_iter), x[idx], y)
        W.append(probe.coef_[0].astype(np.float32))
        b.append(float(probe.intercept_[0]))
    W_arr, b_arr = np.stack(W), np.array(b, dtype=np.float32)
    for i, name in enumerate(PROBES):
        idx, y = test[name]
        acc[f"{name}_probe_on_{name}_data"] = linear_accuracy(x[idx], y, W_arr[i], b_arr[i])
    for data_name in ("target", "spurious"):
        idx, y = test[data_name]
        acc[f"biased_probe_on_{data_name}_data"] = linear_accuracy(x[idx], y, W_arr[2], b_arr[2])
    return {"W": W_arr, "b": b_arr}, {"accuracy": acc}


def run(sae: Any, ctx: ProbingContext) -> dict[str, Any]:
    """SCR of ``sae`` on ``ctx.cfg.scr.tasks`` (JSON-able result)."""
    cfg: ScrConfig = ctx.cfg.scr
    W_dec = decoder_matrix(sae)
    n_values = [n for n in cfg.n_values if n <= W_dec.shape[0]]
    if len(n_values) < len(cfg.n_values):
        log.warning(
            "SCR: N above d_sae=%d skipped: %s",
            W_dec.shape[0],
            [n for n in cfg.n_values if n > W_dec.shape[0]],
        )
    per_task: dict[str, dict[str, Any]] = {}
    from masksae.progress import progress_bar

    for name in progress_bar(None, "scr tasks", "task", iterable=cfg.tasks, leave=False):
        data, acts = ctx.scr_task(
            name, cfg.train_per_quadrant, cfg.test_per_quadrant, cfg.seed, cfg.context_length
        )
        pooling = ctx.pooling(name)
        x = acts.features(pooling)
        train, test = scr_sets(data, TRAIN), scr_sets(data, TEST)
        settings = {"C": cfg.probe_C, "max_iter": cfg.probe_max_iter, "pooling": pooling}
        arrays, meta = ctx.memo(
            "scr-llm-probes",
            data,
            settings,
            lambda x=x, train=train, test=test: _llm_probes(
                x, train, test, cfg.probe_C, cfg.probe_max_iter
            ),
        )
        W, b, acc = arrays["W"], arrays["b"], meta["accuracy"]
        f = ctx.sae_features(sae, data, acts, pooling)
        with ctx.timer.phase("sae_ablation"):
            # direction 1: ablate the spurious attribute's latents, evaluate on target data
            directions = {
                1: ("spurious", "target", 1),  # (ablated probe, evaluation data, probe index)
                2: ("target", "spurious", 0),
            }
            res: dict[str, float] = {}
            for d, (ablated, evaluated, probe_i) in directions.items():
                idx_tr, y_tr = train[ablated]
                effects = node_effects(
                    f[idx_tr], y_tr, W[probe_i], W_dec, absolute=True, positive_only=False
                )
                idx_te, y_te = test[evaluated]
                original = acc[f"biased_probe_on_{evaluated}_data"]
                clean = acc[f"{evaluated}_probe_on_{evaluated}_data"]
                for n in n_values:
                    latents = top_n_latents(effects, n)
                    x_abl = ablate_pooled(x[idx_te], f[idx_te], W_dec, latents)
                    changed = linear_accuracy(x_abl, y_te, W[2], b[2])
                    res[f"scr_dir{d}_threshold_{n}"] = scr_score(
                        changed, original, clean, cfg.min_denominator
                    )
                    res[f"dir{d}_ablated_accuracy_{n}"] = changed
            a_orig = acc["biased_probe_on_target_data"]
            b_orig = acc["biased_probe_on_spurious_data"]
            chosen = "dir1" if a_orig < b_orig else "dir2" if a_orig > b_orig else "mean"
            for n in n_values:
                d1, d2 = res[f"scr_dir1_threshold_{n}"], res[f"scr_dir2_threshold_{n}"]
                res[f"scr_metric_threshold_{n}"] = (
                    d1 if chosen == "dir1" else d2 if chosen == "dir2" else (d1 + d2) / 2
                )
        per_task[name] = {
            **{k: v for k, v in res.items() if k.startswith("scr_")},
            "chosen_direction": chosen,
            "pooling": pooling,
            "llm_accuracy": acc,
            "ablated_accuracy": {k: v for k, v in res.items() if k.startswith("dir")},
            "attributes": data.info.get("attributes"),
            "data": data.info,
        }
    keys = [k for k in next(iter(per_task.values())) if k.startswith("scr_")]
    result: dict[str, Any] = {
        "metric": "scr",
        **{k: float(np.mean([t[k] for t in per_task.values()])) for k in keys},
        "headline_n": cfg.headline_n,
        "n_values": n_values,
        "per_task": per_task,
        "tasks": list(cfg.tasks),
        "config": asdict(cfg),
    }
    if f"scr_metric_threshold_{cfg.headline_n}" in result:
        log.info(
            "SCR: top-%d score %.4f over %d task(s)",
            cfg.headline_n,
            result[f"scr_metric_threshold_{cfg.headline_n}"],
            len(per_task),
        )
    return result
