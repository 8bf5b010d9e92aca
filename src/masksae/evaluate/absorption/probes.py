"""One-vs-rest logistic-regression letter probes (the ground truth and the L1 selector)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import f1_score

from masksae.evaluate.absorption.vocab import LETTERS


@dataclass
class LinearProbe:
    """Per-class logistic regressions: logits_NC = x_ND @ W_CD.T + b_C."""

    W_CD: torch.Tensor
    b_C: torch.Tensor

    def logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        return x_ND.to(self.W_CD) @ self.W_CD.T + self.b_C


def train_one_vs_rest(
    x_ND: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    n_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    end_lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
    l1_decay: float = 0.0,
    desc: str = "absorption probe",
) -> LinearProbe:
    """Train `n_classes` binary probes at once: BCE with logits, each class's positives
    weighted by n_neg / n_pos, Adam with weight decay, learning rate decaying exponentially
    from `lr` to `end_lr` over the epochs, optional L1 penalty (mean over classes of the
    summed |weights|). Both SAEBench probes start from ``torch.nn.Linear``'s default init
    (weights and bias uniform in +-1/sqrt(d)), drawn here from a generator seeded with
    `seed`, which also orders the minibatches. `desc` names its progress bar (epochs)."""
    gen = torch.Generator().manual_seed(seed)
    n, d = x_ND.shape
    x_ND = x_ND.float().to(device)
    y_NC = torch.nn.functional.one_hot(labels_N.long(), n_classes).float().to(device)
    n_pos_C = y_NC.sum(0)
    pos_weight_C = (n - n_pos_C) / n_pos_C.clamp(min=1.0)
    linear = torch.nn.Linear(d, n_classes)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(d)
        linear.weight.copy_(torch.empty(n_classes, d).uniform_(-bound, bound, generator=gen))
        linear.bias.copy_(torch.empty(n_classes).uniform_(-bound, bound, generator=gen))
    linear = linear.to(device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay)
    gamma = math.exp(math.log(end_lr / lr) / max(epochs, 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight_C)
    from masksae.progress import progress_bar

    with torch.enable_grad():
        for _ in progress_bar(None, desc, "epoch", iterable=range(epochs)):
            perm = torch.randperm(n, generator=gen).to(device)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                optimizer.zero_grad()
                loss = loss_fn(linear(x_ND[idx]), y_NC[idx])
                if l1_decay:
                    loss = loss + l1_decay * linear.weight.abs().sum(dim=-1).mean()
                loss.backward()
                optimizer.step()
            scheduler.step()
    return LinearProbe(W_CD=linear.weight.detach().cpu(), b_C=linear.bias.detach().cpu())


def per_class_f1(
    scores_NC: torch.Tensor | np.ndarray, labels_N: torch.Tensor | np.ndarray
) -> list[float]:
    """F1 of each one-vs-rest classifier, predicting positive where the score is > 0."""
    scores = np.asarray(scores_NC)
    labels = np.asarray(labels_N)
    return [
        float(f1_score(labels == c, scores[:, c] > 0, zero_division=0))
        for c in range(scores.shape[1])
    ]


def train_letter_probe(
    x_train_ND: torch.Tensor, y_train_N: torch.Tensor, cfg, device: torch.device
) -> LinearProbe:
    """The 26-way ground-truth first-letter probe on LLM activations."""
    return train_one_vs_rest(
        x_train_ND,
        y_train_N,
        n_classes=len(LETTERS),
        epochs=cfg.probe_epochs,
        batch_size=cfg.probe_batch_size,
        lr=cfg.probe_lr,
        end_lr=cfg.probe_end_lr,
        weight_decay=cfg.probe_weight_decay,
        seed=cfg.seed,
        device=device,
        desc="absorption letter probe (LLM)",
    )
