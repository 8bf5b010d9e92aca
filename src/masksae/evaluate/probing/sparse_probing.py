"""SAEBench sparse probing (``evals/sparse_probing``), one SAE.

Per task and class: a one-vs-rest probe set with balanced negatives (train and test, drawn
once with a seed and shared by every probe of that class); features = the SAE latents
mean-pooled over each text's real tokens (and, for the reference lines, the mean-pooled LLM
activations); for every k, the k features with the largest |mean_pos - mean_neg| on the
training set feed an L2 logistic regression (C = 1, max_iter = 1000) whose test accuracy is
recorded. Accuracies are averaged over classes, then over tasks. With ``full_probes`` a probe
on all SAE latents and one on all LLM dimensions give the reference lines.

Deviations from SAEBench, on purpose: the full-width probes are scikit-learn logistic
regressions like every other probe (SAEBench trains them with Adam and keeps the epoch with
the best *test* accuracy); each class's negatives are drawn once and shared by the LLM and the
SAE probes (SAEBench redraws them per call); a two-class task is probed once (its two
one-vs-rest problems are the same).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import asdict
from typing import Any

import numpy as np

from masksae.evaluate.probing.config import SparseProbingConfig
from masksae.evaluate.probing.probes import balanced_one_vs_rest, fit_accuracy, top_k_mean_diff
from masksae.evaluate.probing.suite import ProbingContext
from masksae.evaluate.tasks import TEST, TRAIN, TaskData

log = logging.getLogger(__name__)


def class_rng(seed: int, task: str, cls: int) -> np.random.Generator:
    """The generator of one class's probe sets: same seed -> same negatives (for the LLM and
    SAE probes, and for sparse probing and TPP on the same task)."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), cls])


def probed_classes(data: TaskData) -> list[int]:
    """Class indices given a one-vs-rest probe (one for a two-class task)."""
    n = len(data.label_names)
    return [1] if n == 2 else list(range(n))


def probe_sets(data: TaskData, seed: int) -> dict[int, dict[str, np.ndarray]]:
    """Per probed class: train/test row indices and 0/1 labels (balanced one-vs-rest)."""
    n = len(data.label_names)
    by_split = {s: [data.indices(s, c) for c in range(n)] for s in (TRAIN, TEST)}
    out = {}
    for c in probed_classes(data):
        rng = class_rng(seed, data.name, c)
        tr, ytr = balanced_one_vs_rest(by_split[TRAIN], c, rng)
        te, yte = balanced_one_vs_rest(by_split[TEST], c, rng)
        out[c] = {"train": tr, "y_train": ytr, "test": te, "y_test": yte}
    return out


def probe_accuracies(
    X: np.ndarray,
    sets: dict[int, dict[str, np.ndarray]],
    k_values: tuple[int, ...],
    full: bool,
    C: float,
    max_iter: int,
) -> dict[int, dict[str, float]]:
    """Per class: ``test_accuracy`` (all features, when ``full``) and
    ``top_{k}_test_accuracy`` for every k."""
    out: dict[int, dict[str, float]] = {}
    for c, s in sets.items():
        Xtr, Xte = X[s["train"]], X[s["test"]]
        res: dict[str, float] = {}
        if full:
            res["test_accuracy"] = fit_accuracy(
                Xtr, s["y_train"], Xte, s["y_test"], C=C, max_iter=max_iter
            )[1]
        for k in k_values:
            cols = top_k_mean_diff(Xtr, s["y_train"], k)
            res[f"top_{k}_test_accuracy"] = fit_accuracy(
                Xtr[:, cols], s["y_train"], Xte[:, cols], s["y_test"], C=C, max_iter=max_iter
            )[1]
        out[c] = res
    return out


def run(sae: Any, ctx: ProbingContext) -> dict[str, Any]:
    """Sparse probing of ``sae`` on ``ctx.cfg.sparse_probing.tasks`` (JSON-able result)."""
    cfg: SparseProbingConfig = ctx.cfg.sparse_probing
    per_task: dict[str, dict[str, Any]] = {}
    from masksae.progress import progress_bar

    for name in progress_bar(None, "sparse probing tasks", "task", iterable=cfg.tasks, leave=False):
        data, acts = ctx.classes_task(
            name, cfg.train_per_class, cfg.test_per_class, cfg.seed, cfg.context_length
        )
        sets = probe_sets(data, cfg.seed)
        pooling = ctx.pooling(name)
        settings = {
            "pooling": pooling,
            "k_values": list(cfg.k_values),
            "full": cfg.full_probes,
            "C": cfg.probe_C,
            "max_iter": cfg.probe_max_iter,
            "seed": cfg.seed,
        }

        def llm_probes(data=data, acts=acts, sets=sets, pooling=pooling) -> tuple[dict, dict]:
            res = probe_accuracies(
                acts.features(pooling),
                sets,
                cfg.k_values,
                cfg.full_probes,
                cfg.probe_C,
                cfg.probe_max_iter,
            )
            return {}, {"per_class": {data.label_names[c]: v for c, v in res.items()}}

        _, llm_meta = ctx.memo("sparse-probing-llm", data, settings, llm_probes)
        f = ctx.sae_features(sae, data, acts, pooling)
        with ctx.timer.phase("sae_probes"):
            sae_res = probe_accuracies(
                f, sets, cfg.k_values, cfg.full_probes, cfg.probe_C, cfg.probe_max_iter
            )
        per_class = {
            data.label_names[c]: {
                **{f"llm_{k}": v for k, v in llm_meta["per_class"][data.label_names[c]].items()},
                **{f"sae_{k}": v for k, v in sae_res[c].items()},
            }
            for c in sae_res
        }
        s0 = next(iter(sets.values()))
        per_task[name] = {
            **{
                key: float(np.mean([pc[key] for pc in per_class.values()]))
                for key in next(iter(per_class.values()))
            },
            "per_class": per_class,
            "n_classes": len(data.label_names),
            "pooling": pooling,
            "probe_train_size": int(len(s0["train"])),
            "probe_test_size": int(len(s0["test"])),
            "data": data.info,
        }
    metric_keys = [k for k in next(iter(per_task.values())) if k.startswith(("llm_", "sae_"))]
    result: dict[str, Any] = {
        "metric": "sparse_probing",
        **{k: float(np.mean([t[k] for t in per_task.values()])) for k in metric_keys},
        "headline_k": cfg.headline_k,
        "per_task": per_task,
        "tasks": list(cfg.tasks),
        "config": asdict(cfg),
    }
    log.info(
        "sparse probing: SAE top-%d accuracy %.4f (LLM top-%d %.4f) over %d task(s)",
        cfg.headline_k,
        result[f"sae_top_{cfg.headline_k}_test_accuracy"],
        cfg.headline_k,
        result[f"llm_top_{cfg.headline_k}_test_accuracy"],
        len(per_task),
    )
    return result
