"""k-sparse probes on SAE latents: which latents are each letter's "main" latents."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from threadpoolctl import threadpool_limits

from masksae.evaluate.absorption.probes import train_one_vs_rest
from masksae.evaluate.absorption.vocab import LETTERS

logger = logging.getLogger(__name__)


@dataclass
class KSparseResult:
    """k-sparse probing of one letter."""

    latents_by_k: list[list[int]]
    """latents_by_k[k - 1]: the k latents with the largest L1-probe weight for the letter."""
    f1_by_k: list[float]
    """Test F1 of the logistic regression on those k latents."""
    main_latents: list[int]
    """The latents of the largest k reached while F1 kept rising by more than the jump."""


def select_main_latents(
    f1_by_k: Sequence[float], latents_by_k: Sequence[Sequence[int]], f1_jump_threshold: float
) -> list[int]:
    """Walk k = 1, 2, ...: accept k while its F1 exceeds the best so far by more than
    `f1_jump_threshold`, stop at the first k that does not (k = 1 is always accepted)."""
    best = -float("inf")
    chosen: list[int] = []
    for f1, latents in zip(f1_by_k, latents_by_k, strict=True):
        if f1 > best + f1_jump_threshold:
            best = f1
            chosen = list(latents)
        else:
            break
    return chosen


def k_sparse_probe_letters(
    f_train_NF: torch.Tensor,
    y_train_N: torch.Tensor,
    f_test_NF: torch.Tensor,
    y_test_N: torch.Tensor,
    letters: Sequence[int],
    cfg,
    device: torch.device,
) -> dict[int, KSparseResult]:
    """For each letter in `letters`: rank latents by an L1-regularised one-vs-rest probe on
    all latents (by signed weight: latents that predict the letter), fit a balanced logistic
    regression on the top k latents for k = 1..max_k, score F1 on the test split and pick the
    main latents with :func:`select_main_latents`."""
    l1_probe = train_one_vs_rest(
        f_train_NF,
        y_train_N,
        n_classes=len(LETTERS),
        epochs=cfg.k_sparse_epochs,
        batch_size=cfg.k_sparse_batch_size,
        lr=cfg.k_sparse_lr,
        end_lr=cfg.probe_end_lr,
        weight_decay=cfg.k_sparse_l2_decay,
        seed=cfg.seed + 1,
        device=device,
        l1_decay=cfg.k_sparse_l1_decay,
        desc="absorption L1 probe (SAE latents)",
    )
    max_k = min(cfg.max_k, f_train_NF.shape[1])
    f_train = f_train_NF.float().numpy()
    f_test = f_test_NF.float().numpy()
    y_train = y_train_N.numpy()
    y_test = y_test_N.numpy()
    results: dict[int, KSparseResult] = {}
    from masksae.progress import progress_bar

    for letter in progress_bar(None, "absorption k-sparse probes", "letter", iterable=letters):
        ranked = l1_probe.W_CD[letter].topk(max_k).indices.tolist()
        target_train = y_train == letter
        target_test = y_test == letter
        latents_by_k: list[list[int]] = []
        f1_by_k: list[float] = []
        for k in range(1, max_k + 1):
            latents = ranked[:k]
            latents_by_k.append(latents)
            f1_by_k.append(
                _sparse_f1(f_train[:, latents], target_train, f_test[:, latents], target_test)
            )
        results[letter] = KSparseResult(
            latents_by_k=latents_by_k,
            f1_by_k=f1_by_k,
            main_latents=select_main_latents(f1_by_k, latents_by_k, cfg.f1_jump_threshold),
        )
    return results


def _sparse_f1(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    if y_train.all() or not y_train.any():
        return 0.0
    # at most max_k features: BLAS threads only add synchronisation (5x slower on busy cores)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=500, class_weight="balanced").fit(x_train, y_train)
    return float(f1_score(y_test, clf.decision_function(x_test) > 0, zero_division=0))
