"""Seeded sampling of task texts: per-class train/test draws, SCR quadrants, OOD training sets.

Pools hold every usable text of a task in source order; the functions here draw the sizes a
metric asks for, reproducibly from a seed, and return :class:`TaskData`. Every pool is
de-duplicated first (a text seen twice keeps its first label; a text carrying two different
labels is dropped, and a test-split text also in the train split is dropped), so the same
text never lands in both a probe's training and test sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from masksae.errors import ConfigError
from masksae.evaluate.tasks.data import TEST, TRAIN, TaskData


def dedupe_labelled(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(text, label)`` pairs without blank texts, repeats and texts seen with two labels
    (first occurrence order kept)."""
    first: dict[str, str] = {}
    conflicted: set[str] = set()
    for text, label in pairs:
        if not text or not text.strip():
            continue
        seen = first.get(text)
        if seen is None:
            first[text] = label
        elif seen != label:
            conflicted.add(text)
    return [(t, lab) for t, lab in first.items() if t not in conflicted]


@dataclass
class ClassPools:
    """Texts of a multi-class task: ``train[c]`` is a list of strata (sub-groups sampled
    equally, e.g. the two genders of a bias_in_bios profession), each a list of texts.
    ``test`` None means the task has no test split: test texts are drawn from ``train``."""

    class_names: list[str]
    train: dict[str, list[list[str]]]
    test: dict[str, list[list[str]]] | None = None

    def counts(self) -> dict[str, int]:
        """Texts per class (train split plus test split)."""
        out = {}
        for c in self.class_names:
            n = sum(len(s) for s in self.train[c])
            if self.test is not None:
                n += sum(len(s) for s in self.test[c])
            out[c] = n
        return out


def _draw(
    rng: np.random.Generator, texts: Sequence[str], n: int, what: str
) -> tuple[list[str], list[str]]:
    """``n`` texts drawn without replacement (in a seeded random order), and the rest."""
    if n > len(texts):
        raise ConfigError(
            f"{what} has {len(texts)} texts, fewer than the {n} asked for: lower the probing "
            "sizes (e.g. --probing-preset demo) or choose another task (`masksae tasks list`)"
        )
    order = rng.permutation(len(texts))
    return [texts[i] for i in order[:n]], [texts[i] for i in order[n:]]


def _test_then_train(
    rng: np.random.Generator, texts: Sequence[str], n_test: int, n_train: int, what: str
) -> tuple[list[str], list[str]]:
    """(train, test) from one pool without a split: the test texts are drawn first."""
    if n_test + n_train > len(texts):
        raise ConfigError(
            f"{what} has {len(texts)} texts, fewer than the {n_train + n_test} needed "
            f"({n_train} train + {n_test} test): lower the probing sizes (e.g. "
            "--probing-preset demo) or choose another task (`masksae tasks list`)"
        )
    test, rest = _draw(rng, texts, n_test, what)
    train, _ = _draw(rng, rest, n_train, what)
    return train, test


def sample_classes(
    name: str, pools: ClassPools, n_train: int, n_test: int, seed: int, info: dict
) -> TaskData:
    """``n_train`` / ``n_test`` texts per class, split equally over the class's strata.

    With a test split the two draws come from their own splits; without one, the test texts
    are drawn first and the train texts from what remains (disjoint by construction).
    """
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"task {name}: n_train={n_train}, n_test={n_test}; expected >= 1 each")
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    split: list[int] = []
    for ci, c in enumerate(pools.class_names):
        strata = pools.train[c]
        n_strata = len(strata)
        tr_per, te_per = max(1, n_train // n_strata), max(1, n_test // n_strata)
        for si, stratum in enumerate(strata):
            what = f"task {name} class {c!r}" + (f" stratum {si}" if n_strata > 1 else "")
            if pools.test is None:
                train, test = _test_then_train(rng, stratum, te_per, tr_per, what)
            else:
                train, _ = _draw(rng, stratum, tr_per, what + " train split")
                test, _ = _draw(rng, pools.test[c][si], te_per, what + " test split")
            for part, flag in ((train, TRAIN), (test, TEST)):
                texts += part
                labels += [ci] * len(part)
                split += [flag] * len(part)
    return TaskData(
        name, "classes", texts, np.array(labels), np.array(split), pools.class_names, info
    )


QUADRANTS = ((0, 0), (0, 1), (1, 0), (1, 1))
"""(a, b): a = 1 for the first (target) attribute's positive value, b for the second's."""


def quadrant_need(a: int, b: int, q: int) -> int:
    """Texts a quadrant must supply per split: the biased set uses 2q texts from the two
    'agreeing' quadrants (1, 1) and (0, 0), every other set q from each quadrant."""
    return 2 * q if a == b else q


@dataclass
class QuadrantPools:
    """Texts of an SCR task by quadrant ``(a, b)``; ``test`` None: no test split."""

    attribute_names: tuple[str, str]
    """Names of the target and the spurious attribute (e.g. "profession", "gender")."""
    value_names: tuple[tuple[str, str], tuple[str, str]]
    """Per attribute, the names of its (negative, positive) values."""
    train: dict[tuple[int, int], list[str]]
    test: dict[tuple[int, int], list[str]] | None = None

    def quadrant_label(self, a: int, b: int) -> str:
        return f"{self.value_names[0][a]} & {self.value_names[1][b]}"

    def counts(self) -> dict[str, int]:
        out = {}
        for a, b in QUADRANTS:
            n = len(self.train[(a, b)]) + (len(self.test[(a, b)]) if self.test else 0)
            out[self.quadrant_label(a, b)] = n
        return out


def sample_quadrants(
    name: str, pools: QuadrantPools, q_train: int, q_test: int, seed: int, info: dict
) -> TaskData:
    """SAEBench's SCR data per split: q texts from each quadrant, 2q from the agreeing ones.

    Labels are the quadrant codes ``2 * a + b``; rows of one quadrant and split are in the
    (seeded) order the SCR sets take them from (the first q, or 2q, of each).
    """
    if q_train < 1 or q_test < 1:
        raise ConfigError(
            f"SCR task {name}: train/test per quadrant {q_train}/{q_test}; expected >= 1 each"
        )
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    split: list[int] = []
    for a, b in QUADRANTS:
        pool = pools.train[(a, b)]
        what = f"SCR task {name} quadrant {pools.quadrant_label(a, b)!r}"
        n_tr, n_te = quadrant_need(a, b, q_train), quadrant_need(a, b, q_test)
        if pools.test is None:
            train, test = _test_then_train(rng, pool, n_te, n_tr, what)
        else:
            train, _ = _draw(rng, pool, n_tr, what + " train split")
            test, _ = _draw(rng, pools.test[(a, b)], n_te, what + " test split")
        for part, flag in ((train, TRAIN), (test, TEST)):
            texts += part
            labels += [2 * a + b] * len(part)
            split += [flag] * len(part)
    names = [pools.quadrant_label(a, b) for a, b in QUADRANTS]
    return TaskData(name, "scr", texts, np.array(labels), np.array(split), names, info)


def sample_ood(
    name: str,
    train_rows: Sequence[tuple[str, int]],
    ood_rows: Sequence[tuple[str, int]],
    n_train: int,
    seed: int,
    info: dict,
    label_names: list[str],
) -> TaskData:
    """Kantamneni et al.'s OOD split: ``n_train`` in-distribution texts, half of each class,
    drawn without replacement from ``train_rows`` and shuffled; every OOD row as the test set."""
    if n_train < 2:
        raise ConfigError(f"OOD task {name}: n_train={n_train}; expected >= 2")
    rng = np.random.default_rng(seed)
    per_class = {1: (n_train + 1) // 2, 0: n_train // 2}  # the reference: ceil for class 1
    chosen: list[int] = []
    for label in (1, 0):
        pool = [i for i, (_, y) in enumerate(train_rows) if y == label]
        if per_class[label] > len(pool):
            raise ConfigError(
                f"OOD task {name}: class {label_names[label]!r} has {len(pool)} texts in the "
                f"training pool, fewer than the {per_class[label]} asked for: lower the OOD "
                "n_train or raise its pool size"
            )
        chosen += [pool[i] for i in rng.choice(len(pool), per_class[label], replace=False)]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    texts = [train_rows[i][0] for i in chosen] + [t for t, _ in ood_rows]
    labels = [train_rows[i][1] for i in chosen] + [y for _, y in ood_rows]
    split = [TRAIN] * len(chosen) + [TEST] * len(ood_rows)
    return TaskData(name, "ood", texts, np.array(labels), np.array(split), label_names, info)
