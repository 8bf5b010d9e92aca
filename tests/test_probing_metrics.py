"""The probing metrics on synthetic tasks with known answers, and their building blocks
against hand computation or the references' documented rules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from masksae.evaluate.probing import ProbingConfig, ood, scr, sparse_probing, tpp
from masksae.evaluate.probing.ablation import ablate_pooled, node_effects, top_n_latents
from masksae.evaluate.probing.activations import TokenActs
from masksae.evaluate.probing.config import OodConfig, ScrConfig, SparseProbingConfig, TppConfig
from masksae.evaluate.probing.pooling import pooled_latents
from masksae.evaluate.probing.probes import (
    REFERENCE_CS,
    balanced_one_vs_rest,
    select_and_fit,
    top_k_mean_diff,
    validation_splits,
)
from masksae.evaluate.tasks import TEST, TRAIN, TaskData
from masksae.timing import PhaseTimer


class PairSAE(torch.nn.Module):
    """Latent j = relu(x_j), latent D + j = relu(-x_j); decoder rows +-e_j: exact, affine.
    ``keep`` restricts the dictionary to some input dimensions (the rest is left to the
    reconstruction error)."""

    def __init__(self, d: int, keep: list[int] | None = None) -> None:
        super().__init__()
        dims = list(range(d)) if keep is None else keep
        eye = torch.eye(d)[dims]
        self.W_dec = torch.nn.Parameter(torch.cat([eye, -eye], dim=0))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))

        @dataclass
        class Cfg:
            d_sae: int

        self.cfg = Cfg(2 * len(dims))

    def encode(self, x):
        return torch.relu(x @ self.W_dec.T)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


@dataclass
class FakeContext:
    """Stands in for ProbingContext: serves fixed synthetic tasks, computes every memo."""

    cfg: ProbingConfig
    tasks: dict[str, tuple[TaskData, object]]
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    hits: dict = field(default_factory=dict)

    def classes_task(self, name, *_):
        return self.tasks[name]

    def scr_task(self, name, *_):
        return self.tasks[name]

    def ood_task(self, name):
        return self.tasks[name]

    def memo(self, what, data, settings, compute):
        return compute()

    mode: str = "mean"

    def pooling(self, name):
        return self.mode

    def sae_features(self, sae, data, acts, pooling):
        from masksae.evaluate.probing.pooling import sae_features

        return sae_features(sae, acts, pooling)


def token_task(name, kind, x_per_text: list[np.ndarray], labels, split, label_names):
    """TaskData + TokenActs from per-text token activation arrays [T_i, D]."""
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in x_per_text])]).astype(np.int64)
    acts = TokenActs(np.concatenate(x_per_text).astype(np.float32), offsets)
    data = TaskData(name, kind, [f"t{i}" for i in range(len(labels))], labels, split, label_names)
    return data, acts


def classes_data(rng, n_classes=3, per_class=(30, 12), d=12, scale=3.0, name="synthetic"):
    """Texts of 2-5 tokens whose dimension c carries class c (scale) over unit noise."""
    xs, labels, split = [], [], []
    for s, n in ((TRAIN, per_class[0]), (TEST, per_class[1])):
        for c in range(n_classes):
            for _ in range(n):
                t = rng.integers(2, 6)
                x = rng.normal(0, 0.3, (t, d))
                x[:, c] += scale
                xs.append(x)
                labels.append(c)
                split.append(s)
    return token_task(
        name, "classes", xs, np.array(labels), np.array(split), [f"c{i}" for i in range(n_classes)]
    )


def test_a_latent_equal_to_the_label_gives_accuracy_one_at_k1():
    rng = np.random.default_rng(0)
    data, acts = classes_data(rng)
    cfg = ProbingConfig(sparse_probing=SparseProbingConfig(tasks=("synthetic",), k_values=(1, 2)))
    ctx = FakeContext(cfg, {"synthetic": (data, acts)})
    res = sparse_probing.run(PairSAE(12), ctx)
    task = res["per_task"]["synthetic"]
    assert set(task["per_class"]) == {"c0", "c1", "c2"}
    for per_class in task["per_class"].values():
        assert per_class["sae_top_1_test_accuracy"] == 1.0
        assert per_class["llm_top_1_test_accuracy"] == 1.0
    assert res["sae_top_1_test_accuracy"] == 1.0 and res["sae_test_accuracy"] == 1.0
    # balanced one-vs-rest sets: 30 positives + 30 negatives (15 from each other class)
    assert task["probe_train_size"] == 60 and task["probe_test_size"] == 24


def test_uninformative_latents_give_chance_accuracy():
    rng = np.random.default_rng(1)
    data, acts = classes_data(rng, per_class=(60, 40))
    cfg = ProbingConfig(sparse_probing=SparseProbingConfig(tasks=("synthetic",), k_values=(1,)))
    # the dictionary covers only the noise dimensions 3..11, not the class dimensions
    res = sparse_probing.run(
        PairSAE(12, keep=list(range(3, 12))), FakeContext(cfg, {"synthetic": (data, acts)})
    )
    assert res["llm_top_1_test_accuracy"] == 1.0
    assert 0.3 < res["sae_top_1_test_accuracy"] < 0.7


def scr_data(rng, q=(40, 30), d=10, name="pair", a_scale=1.0, b_scale=3.0):
    """Quadrant texts: dimension 0 carries the target attribute a (+-a_scale), dimension 1
    the spurious b (+-b_scale); the rest is noise. q[0] / q[1] texts per quadrant per split,
    2q in the agreeing quadrants (as sample_quadrants draws)."""
    xs, labels, split = [], [], []
    for s, n in ((TRAIN, q[0]), (TEST, q[1])):
        for a in (0, 1):
            for b in (0, 1):
                for _ in range(2 * n if a == b else n):
                    x = rng.normal(0, 0.2, (3, d))
                    x[:, 0] += a_scale * (2 * a - 1)
                    x[:, 1] += b_scale * (2 * b - 1)
                    xs.append(x)
                    labels.append(2 * a + b)
                    split.append(s)
    names = ["a0 & b0", "a0 & b1", "a1 & b0", "a1 & b1"]
    return token_task(name, "scr", xs, np.array(labels), np.array(split), names)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_scr_planted_spurious_latent_scores_near_one_and_unrelated_near_zero(pooling):
    rng = np.random.default_rng(2)
    data, acts = scr_data(rng)
    cfg = ProbingConfig(scr=ScrConfig(tasks=("pair",), n_values=(2, 4), headline_n=2))
    res = scr.run(PairSAE(10), FakeContext(cfg, {"pair": (data, acts)}, mode=pooling))
    assert res["per_task"]["pair"]["pooling"] == pooling
    task = res["per_task"]["pair"]
    acc = task["llm_accuracy"]
    # the biased probe leans on the stronger spurious dimension: near chance on target data
    assert acc["target_probe_on_target_data"] == 1.0
    assert acc["biased_probe_on_target_data"] < 0.75 < acc["biased_probe_on_spurious_data"]
    assert task["chosen_direction"] == "dir1"
    # ablating the two spurious latents (x1 > 0, x1 < 0) restores the clean probe
    assert res["scr_metric_threshold_2"] == pytest.approx(1.0, abs=0.05)
    # a dictionary without the spurious direction can only ablate unrelated latents
    data, acts = scr_data(np.random.default_rng(2))
    res = scr.run(PairSAE(10, keep=[0, *range(2, 10)]), FakeContext(cfg, {"pair": (data, acts)}))
    assert abs(res["scr_metric_threshold_2"]) < 0.1
    assert abs(res["scr_metric_threshold_4"]) < 0.1


def test_scr_score_rule_and_guard():
    assert scr.scr_score(0.9, 0.6, 1.0, 0.001) == pytest.approx(0.75)
    assert scr.scr_score(0.5, 0.6, 1.0, 0.001) == pytest.approx(-0.25)
    assert scr.scr_score(0.9, 0.6, 0.6005, 0.001) == 0.0  # denominator below the guard
    assert scr.scr_score(0.9, 0.7, 0.6, 0.001) == 0.0  # clean worse than the biased probe


def test_tpp_of_class_specific_latents():
    rng = np.random.default_rng(3)
    data, acts = classes_data(rng, n_classes=4, per_class=(40, 30), scale=2.0)
    cfg = ProbingConfig(tpp=TppConfig(tasks=("synthetic",), n_values=(1, 2), headline_n=1))
    res = tpp.run(PairSAE(12), FakeContext(cfg, {"synthetic": (data, acts)}))
    task = res["per_task"]["synthetic"]
    assert all(a == 1.0 for a in task["llm_clean_accuracy"].values())
    # ablating class c's latent sends its probe to chance on its positives (-> ~0.5 accuracy)
    # and leaves the other probes untouched
    assert res["tpp_threshold_1_intended_diff_only"] == pytest.approx(0.5, abs=0.05)
    assert abs(res["tpp_threshold_1_unintended_diff_only"]) < 0.05
    assert res["tpp_threshold_1_total_metric"] > 0.4


def test_tpp_scores_by_hand():
    clean = np.array([0.9, 0.8, 1.0])
    ablated = np.array([[0.5, 0.8, 0.9], [0.9, 0.6, 1.0], [0.8, 0.8, 0.7]])
    total, intended, unintended = tpp.tpp_scores(clean, ablated)
    assert intended == pytest.approx([0.4, 0.2, 0.3])
    assert unintended == pytest.approx([(0.0 + 0.1) / 2, (0.0 + 0.0) / 2, (0.1 + 0.0) / 2])
    assert total == pytest.approx(intended - unintended)


def test_ood_auc_of_a_perfectly_separable_shifted_set_is_one():
    rng = np.random.default_rng(4)
    d, n_train, n_ood = 8, 200, 60
    y_train = np.array([0, 1] * (n_train // 2))
    y_ood = np.array([1, 0] * (n_ood // 2))
    x_train = rng.normal(0, 0.3, (n_train, d))
    x_train[:, 0] += 2.0 * y_train
    # the OOD set is shifted and stretched along the label direction: still separable
    x_ood = rng.normal(0, 0.3, (n_ood, d))
    x_ood[:, 0] += 1.0 + 3.0 * y_ood
    data = TaskData(
        "shifted",
        "ood",
        [f"t{i}" for i in range(n_train + n_ood)],
        np.concatenate([y_train, y_ood]),
        np.array([TRAIN] * n_train + [TEST] * n_ood),
        ["0", "1"],
    )
    cfg = ProbingConfig(ood=OodConfig(tasks=("shifted",), k=4))
    acts = np.concatenate([x_train, x_ood]).astype(np.float32)
    res = ood.run(PairSAE(d), FakeContext(cfg, {"shifted": (data, acts)}))
    task = res["per_task"]["shifted"]
    assert task["sae_test_auc"] == 1.0 and task["oracle_test_auc"] == 1.0
    assert res["mean_sae_test_auc"] == 1.0 and res["mean_gap"] == 0.0
    assert task["latents"][0] == 0  # latent 0 = relu(x_0) ranks first


def test_mean_pooled_ablation_equals_the_per_token_rule():
    """SAEBench ablates per token (decode(f') + x - decode(f)) then mean-pools; the pooled
    shortcut must give the same activations for an affine decoder."""
    from masksae.train.sae import build_sae, sae_config_from_dict

    torch.manual_seed(0)
    sae = build_sae(sae_config_from_dict({"architecture": "topk", "d_in": 16, "d_sae": 48, "k": 6}))
    with torch.no_grad():
        sae.b_dec.normal_()
    rng = np.random.default_rng(5)
    lengths = [3, 1, 7, 4]
    x_tokens = [rng.normal(0, 1, (n, 16)).astype(np.float32) for n in lengths]
    acts = TokenActs(np.concatenate(x_tokens), np.concatenate([[0], np.cumsum(lengths)]))
    latents = np.array([3, 17, 40])
    f_pooled = pooled_latents(sae, acts)
    W_dec = sae.W_dec.detach().numpy()
    fast = ablate_pooled(acts.pooled(), f_pooled, W_dec, latents)
    with torch.no_grad():
        for i, x in enumerate(x_tokens):
            xt = torch.from_numpy(x)
            f = sae.encode(xt)
            f_abl = f.clone()
            f_abl[:, latents] = 0
            naive = (sae.decode(f_abl) + xt - sae.decode(f)).mean(0).numpy()
            np.testing.assert_allclose(fast[i], naive, rtol=1e-5, atol=1e-5)


def test_node_effects_and_top_n_by_hand():
    f = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    y = np.array([1, 1, 0, 0])
    W_dec = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w = np.array([0.5, 2.0])
    # mean diff: [2, 0, -1]; W_dec @ w: [0.5, 2, 2.5]
    np.testing.assert_allclose(
        node_effects(f, y, w, W_dec, absolute=True, positive_only=False), [1.0, 0.0, 2.5]
    )
    np.testing.assert_allclose(
        node_effects(f, y, w, W_dec, absolute=False, positive_only=True), [1.0, 0.0, 0.0]
    )
    assert top_n_latents(np.array([1.0, 0.0, 2.5]), 5).tolist() == [2, 0]  # zeros never chosen
    assert top_n_latents(np.zeros(3), 2).size == 0


def test_balanced_one_vs_rest_follows_saebench_counts():
    by_class = [np.arange(0, 10), np.arange(10, 17), np.arange(17, 30)]
    idx, y = balanced_one_vs_rest(by_class, 0, np.random.default_rng(0))
    assert (y == 1).sum() == 10 and (y == 0).sum() == 10
    assert set(idx[y == 1]) == set(range(10))
    neg = idx[y == 0]
    # ceil(10 / 2) = 5 drawn from each other class, then 10 of those 10
    assert ((neg >= 10) & (neg < 17)).sum() == 5 and (neg >= 17).sum() == 5
    assert len(set(idx)) == 20


def test_top_k_mean_diff_by_hand():
    X = np.array([[1.0, 5.0, 0.0, 2.0], [3.0, 5.0, 0.0, 2.0], [0.0, 1.0, 4.0, 2.0]])
    y = np.array([1, 1, 0])
    # |mean diff| = [2, 4, 4, 0]: ties keep the lower index first
    assert top_k_mean_diff(X, y, 3).tolist() == [1, 2, 0]


def test_validation_splits_follow_find_best_reg():
    y = np.array([0, 1] * 5)  # 10 examples: leave-2-out, only folds with both classes
    folds = validation_splits(y)
    assert len(folds) == 25 and all(len(va) == 2 for _, va in folds)
    y = np.array([0, 1] * 30)  # 60: stratified 6-fold
    folds = validation_splits(y)
    assert len(folds) == 6 and sorted(np.concatenate([va for _, va in folds])) == list(range(60))
    y = np.array([0, 1] * 300)  # 600: the last min(120, 100) held out
    ((tr, va),) = validation_splits(y)
    assert va.tolist() == list(range(500, 600)) and tr.tolist() == list(range(500))
    y = np.array([0, 1] * 100)  # 200: the last int(0.2 * 200) = 40
    ((tr, va),) = validation_splits(y)
    assert va.tolist() == list(range(160, 200))


def test_select_and_fit_picks_the_best_validated_c():
    rng = np.random.default_rng(6)
    X = rng.normal(0, 1, (300, 5))
    y = (X[:, 0] + 0.5 * rng.normal(0, 1, 300) > 0).astype(np.int64)
    res = select_and_fit(X[:200], y[:200], X[200:], y[200:], l1=True)
    assert len(res.val_auc_by_C) == len(REFERENCE_CS) == 10
    assert res.C == REFERENCE_CS[int(np.argmax(res.val_auc_by_C))]
    assert res.val_auc == max(res.val_auc_by_C)
    assert 0.8 < res.test_auc <= 1.0 and math.isfinite(res.test_f1)
