"""scikit-learn probes and the sample/feature selection rules the probing metrics share.

- :func:`balanced_one_vs_rest`: SAEBench's ``prepare_probe_data`` (positives = one class;
  negatives drawn evenly from the other classes, as many as positives).
- :func:`top_k_mean_diff`: SAEBench's ``get_top_k_mean_diff_mask`` and Kantamneni et al.'s
  ``get_sorted_indices``: features ranked by |mean over positives - mean over negatives|.
- :func:`fit_accuracy`: SAEBench's ``train_sklearn_probe`` (L2 logistic regression, C = 1,
  max_iter = 1000), test accuracy.
- :func:`select_and_fit`: Kantamneni et al.'s ``find_best_reg``: C over logspace(5, -5, 10)
  chosen by mean validation ROC-AUC, refit on every training example, test metrics.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

REFERENCE_CS = tuple(float(c) for c in np.logspace(5, -5, 10))
"""Kantamneni et al.'s regularisation grid (C from 1e5 down to 1e-5, 10 values)."""


def logistic(C: float = 1.0, *, l1: bool = False, max_iter: int = 1000, seed: int | None = None):
    """A LogisticRegression with an L2 (lbfgs) or L1 (saga) penalty, spelled for the installed
    scikit-learn (``penalty=`` is deprecated from 1.8, where ``l1_ratio`` replaces it)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if not l1:
        return LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    if (major, minor) >= (1, 8):
        return LogisticRegression(
            C=C, l1_ratio=1.0, solver="saga", max_iter=max_iter, random_state=seed
        )
    return LogisticRegression(
        C=C, penalty="l1", solver="saga", max_iter=max_iter, random_state=seed
    )


def quiet_fit(model, X: np.ndarray, y: np.ndarray):
    """``model.fit(X, y)`` with convergence warnings silenced (logged at debug level): the
    references run max_iter = 1000 and accept what it reaches."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("always", category=ConvergenceWarning)
        model.fit(X, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.debug("probe did not converge in %d iterations", model.max_iter)
    return model


def balanced_one_vs_rest(
    by_class: Sequence[np.ndarray], cls: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, 0/1 labels) of a one-vs-rest probe set: every row of class ``cls`` as a
    positive and as many negatives, ceil(n_pos / (C - 1)) drawn from each other class, then
    n_pos of those (SAEBench's prepare_probe_data); shuffled."""
    pos = np.asarray(by_class[cls])
    others = [np.asarray(rows) for c, rows in enumerate(by_class) if c != cls]
    per_class = math.ceil(len(pos) / len(others))
    pool = np.concatenate([rows[rng.permutation(len(rows))[:per_class]] for rows in others])
    neg = pool[rng.permutation(len(pool))[: len(pos)]]
    idx = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    order = rng.permutation(len(idx))
    return idx[order], y[order]


def top_k_mean_diff(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` columns with the largest |mean(X[y == 1]) - mean(X[y == 0])|,
    largest first (ties: lower index first)."""
    diff = np.abs(X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0))
    return np.argsort(-diff, kind="stable")[:k]


def fit_accuracy(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
) -> tuple[object, float]:
    """An L2 logistic probe fitted on the train set; (probe, test accuracy)."""
    probe = quiet_fit(logistic(C, max_iter=max_iter), X_train, y_train)
    return probe, float((probe.predict(X_test) == y_test).mean())


def validation_splits(y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Kantamneni et al.'s get_cv + get_splits: up to 12 examples, leave-2-out; below 128,
    stratified 6-fold (shuffled, random_state 42); else one split holding out the last
    min(int(0.2 n), 100) examples. Cross-validation folds whose validation part lacks a class
    are dropped; the fixed hold-out is kept as it is."""
    from sklearn.model_selection import LeavePOut, StratifiedKFold

    n = len(y)
    if n <= 12:
        folds = list(LeavePOut(2).split(np.zeros(n), y))
    elif n < 128:
        folds = list(
            StratifiedKFold(n_splits=6, shuffle=True, random_state=42).split(np.zeros(n), y)
        )
    else:
        n_val = min(int(0.2 * n), 100)
        return [(np.arange(n - n_val), np.arange(n - n_val, n))]
    return [(tr, va) for tr, va in folds if len(np.unique(y[va])) == 2]


@dataclass
class SelectedProbe:
    """Outcome of :func:`select_and_fit`."""

    C: float | None
    """The chosen C (None: too few examples to validate; scikit-learn's default C = 1 used)."""
    val_auc: float
    """Mean validation ROC-AUC at the chosen C (train AUC when not validated)."""
    test_auc: float
    test_accuracy: float
    test_f1: float
    """Weighted F1 on the test set (the reference's)."""
    val_auc_by_C: list[float]
    """Mean validation ROC-AUC per C of the grid (empty when not validated)."""


def select_and_fit(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    l1: bool,
    Cs: Sequence[float] = REFERENCE_CS,
    seed: int = 1,
    max_iter: int = 1000,
) -> SelectedProbe:
    """C chosen by mean validation ROC-AUC (first best on ties), then the probe refitted on
    every training example (shuffled with ``seed``) and scored on the test set."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    scores: list[float] = []
    best_C: float | None = None
    if len(y_train) > 3:
        splits = validation_splits(y_train)
        for C in Cs:
            fold_scores = []
            for tr, va in splits:
                if len(np.unique(y_train[tr])) < 2:
                    fold_scores.append(0.5)
                    continue
                model = quiet_fit(
                    logistic(C, l1=l1, max_iter=max_iter, seed=seed), X_train[tr], y_train[tr]
                )
                fold_scores.append(
                    roc_auc_score(y_train[va], model.predict_proba(X_train[va])[:, 1])
                )
            scores.append(float(np.mean(fold_scores)) if fold_scores else 0.5)
        best_C = float(Cs[int(np.argmax(scores))])
    order = np.random.RandomState(seed).permutation(len(y_train))
    final = quiet_fit(
        logistic(1.0 if best_C is None else best_C, l1=l1, max_iter=max_iter, seed=seed),
        X_train[order],
        y_train[order],
    )
    proba = final.predict_proba(X_test)[:, 1]
    pred = final.predict(X_test)
    if best_C is None:
        val_auc = float(roc_auc_score(y_train, final.predict_proba(X_train)[:, 1]))
    else:
        val_auc = float(max(scores))
    return SelectedProbe(
        C=best_C,
        val_auc=val_auc,
        test_auc=float(roc_auc_score(y_test, proba)),
        test_accuracy=float(accuracy_score(y_test, pred)),
        test_f1=float(f1_score(y_test, pred, average="weighted")),
        val_auc_by_C=scores,
    )
