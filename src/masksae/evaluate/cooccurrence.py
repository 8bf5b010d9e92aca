"""Latent co-occurrence on held-out text: does an SAE's code decorrelate its latents?

Masked training (arXiv 2604.06495) is argued to break co-occurrence shortcuts. Absorption
measures one consequence; this metric measures the co-activation itself, on the same clean
held-out activations the core metrics use:

- **frequent-latent pairs**: among the latents firing on at least ``min_firing_rate`` of
  the tokens (the ``max_latents`` most frequent of them), every pair (a, b) with counts
  n_a, n_b, n_ab over N tokens gets
  ``cooccurrence_ratio`` = n_ab / min(n_a, n_b) (= P(both) / min(P(a), P(b)), 1 when one
  latent only fires with the other), ``pmi`` = log(n_ab N / (n_a n_b)) (0 for independent
  latents; defined only when n_ab > 0) and ``npmi`` = pmi / -log(n_ab / N) in [-1, 1]
  (-1 when they never co-fire, 0 independent, 1 always together). Reported: mean and
  quantiles over pairs, and ``observed_over_expected`` = sum n_ab / sum n_a n_b / N (1 for
  independent latents).
- **parent-child pairs** (needs the absorption result): for each letter, each main latent
  m against each latent a that fully absorbed it, P(m | a) on clean text
  (``p_main_given_absorber``), P(a | m), the ratio and npmi. Absorption means a fires
  where m should; a low P(m | a) says the two are split apart on ordinary text as well.

Cheap by construction: codes are encoded batch by batch and kept as (token, latent) index
pairs of the active latents only; pair counts are a sparse product (cost ~ N k^2 for
L0 = k), never a dense [N, F] x [F, N] or [F, N] x [N, F] product.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from masksae.evaluate.config import CooccurrenceConfig

log = logging.getLogger(__name__)


@dataclass
class SparseCodes:
    """Which latents fire on which token: one (token, latent) pair per active latent."""

    n_tokens: int
    d_sae: int
    token_idx: np.ndarray
    """int64 [nnz] row of each active entry."""
    latent_idx: np.ndarray
    """int64 [nnz] latent of each active entry."""

    def matrix(self, latents: np.ndarray | None = None):
        """Binary scipy CSR [n_tokens, F] (or [n_tokens, len(latents)] over `latents`)."""
        from scipy import sparse

        rows, cols = self.token_idx, self.latent_idx
        width = self.d_sae
        if latents is not None:
            position = np.full(self.d_sae, -1, dtype=np.int64)
            position[latents] = np.arange(len(latents))
            keep = position[cols] >= 0
            rows, cols, width = rows[keep], position[cols[keep]], len(latents)
        data = np.ones(len(rows), dtype=np.int64)
        return sparse.csr_matrix((data, (rows, cols)), shape=(self.n_tokens, width))

    def counts(self) -> np.ndarray:
        """int64 [F]: tokens on which each latent fires."""
        return np.bincount(self.latent_idx, minlength=self.d_sae)


@torch.no_grad()
def sparse_codes(
    sae: Any, acts_ND: torch.Tensor, batch_size: int, device: Any = None
) -> SparseCodes:
    """Encode `acts_ND` batch by batch and keep only the active (token, latent) pairs."""
    param = next(iter(sae.parameters()), None)
    device = device or (param.device if param is not None else torch.device("cpu"))
    dtype = param.dtype if param is not None else torch.float32
    rows, cols = [], []
    d_sae = None
    from masksae.progress import progress_bar

    starts = range(0, acts_ND.shape[0], batch_size)
    for start in progress_bar(None, "co-occurrence (SAE encode)", "batch", iterable=starts):
        f_BF = sae.encode(acts_ND[start : start + batch_size].to(device=device, dtype=dtype))
        d_sae = f_BF.shape[1]
        r, c = (f_BF != 0).nonzero(as_tuple=True)
        rows.append((r + start).cpu().numpy())
        cols.append(c.cpu().numpy())
    if d_sae is None:
        d_sae = int(sae.cfg.d_sae)
    return SparseCodes(
        n_tokens=int(acts_ND.shape[0]),
        d_sae=int(d_sae),
        token_idx=np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
        latent_idx=np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64),
    )


def pair_statistics(
    n_ab: np.ndarray, n_a: np.ndarray, n_b: np.ndarray, n_tokens: int
) -> dict[str, np.ndarray]:
    """Element-wise cooccurrence_ratio, pmi (nan where n_ab = 0) and npmi of pairs."""
    n_ab, n_a, n_b = (np.asarray(v, dtype=np.float64) for v in (n_ab, n_a, n_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.minimum(n_a, n_b) > 0, n_ab / np.minimum(n_a, n_b), np.nan)
        pmi = np.where(n_ab > 0, np.log(n_ab * n_tokens / (n_a * n_b)), np.nan)
        p_ab = n_ab / n_tokens
        npmi = np.where(
            n_ab == 0,
            -1.0,
            np.where(p_ab >= 1.0, 1.0, pmi / -np.log(np.where(p_ab > 0, p_ab, 1.0))),
        )
    npmi = np.where((n_a > 0) & (n_b > 0), npmi, np.nan)
    return {"cooccurrence_ratio": ratio, "pmi": pmi, "npmi": npmi}


def _summary(values: np.ndarray, quantiles: Sequence[float]) -> dict[str, Any]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0, "mean": None, **{f"q{round(100 * q):02d}": None for q in quantiles}}
    qs = np.quantile(values, list(quantiles))
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        **{f"q{round(100 * q):02d}": float(v) for q, v in zip(quantiles, qs, strict=True)},
    }


def frequent_pairs(codes: SparseCodes, cfg: CooccurrenceConfig) -> dict[str, Any]:
    """Pair statistics among the frequently firing latents."""
    counts = codes.counts()
    rate = counts / max(codes.n_tokens, 1)
    frequent = np.flatnonzero(rate >= cfg.min_firing_rate)
    frequent = frequent[np.argsort(-counts[frequent], kind="stable")][: cfg.max_latents]
    out: dict[str, Any] = {
        "n_frequent_latents": int((rate >= cfg.min_firing_rate).sum()),
        "n_latents_used": int(len(frequent)),
        "n_pairs": 0,
    }
    if len(frequent) < 2:
        return out
    B = codes.matrix(frequent)
    C = (B.T @ B).toarray()  # [m, m] co-firing counts; the diagonal holds n_a
    i, j = np.triu_indices(len(frequent), k=1)
    n_a = np.diag(C)
    stats = pair_statistics(C[i, j], n_a[i], n_a[j], codes.n_tokens)
    expected = (n_a[i].astype(np.float64) * n_a[j]).sum() / codes.n_tokens
    out.update(
        n_pairs=int(len(i)),
        n_pairs_cooccurring=int((C[i, j] > 0).sum()),
        observed_over_expected=float(C[i, j].sum() / expected) if expected > 0 else None,
        cooccurrence_ratio=_summary(stats["cooccurrence_ratio"], cfg.quantiles),
        npmi=_summary(stats["npmi"], cfg.quantiles),
        pmi_cooccurring=_summary(stats["pmi"], cfg.quantiles),
    )
    return out


def parent_child_pairs(
    codes: SparseCodes, absorption: dict[str, Any] | None, cfg: CooccurrenceConfig
) -> dict[str, Any]:
    """Co-occurrence of each letter's main latents with the latents that absorbed them."""
    per_letter = (absorption or {}).get("per_letter") or {}
    if not per_letter:
        note = (
            "no absorption result with per-letter latents: run --metrics ...,absorption"
            if absorption is None
            else "the absorption result names no eligible letter"
        )
        return {"n_pairs": 0, "note": note, "pairs": []}
    wanted: list[tuple[str, int, int, int]] = []
    for letter, row in sorted(per_letter.items()):
        absorbers = (row.get("absorbing_latents") or [])[: cfg.max_absorbers_per_letter]
        for main in row.get("main_latents") or []:
            for latent, n_absorbed in absorbers:
                if latent != main:
                    wanted.append((letter, int(main), int(latent), int(n_absorbed)))
    out: dict[str, Any] = {"n_pairs": len(wanted), "pairs": []}
    if not wanted:
        out["note"] = "no token was fully absorbed: no parent-child pair"
        return out
    latents = np.unique([w[1] for w in wanted] + [w[2] for w in wanted])
    B = codes.matrix(latents)
    C = (B.T @ B).toarray()
    where = {int(lat): k for k, lat in enumerate(latents)}
    mains = np.array([where[w[1]] for w in wanted])
    absorbers = np.array([where[w[2]] for w in wanted])
    n_m, n_a = np.diag(C)[mains], np.diag(C)[absorbers]
    n_ma = C[mains, absorbers]
    stats = pair_statistics(n_ma, n_m, n_a, codes.n_tokens)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_m_given_a = np.where(n_a > 0, n_ma / np.maximum(n_a, 1), np.nan)
        p_a_given_m = np.where(n_m > 0, n_ma / np.maximum(n_m, 1), np.nan)

    def num(v: float) -> float | None:
        return None if not math.isfinite(v) else float(v)

    for k, (letter, main, latent, n_absorbed) in enumerate(wanted):
        out["pairs"].append(
            {
                "letter": letter,
                "main": main,
                "absorber": latent,
                "n_absorbed_tokens": n_absorbed,
                "n_main": int(n_m[k]),
                "n_absorber": int(n_a[k]),
                "n_both": int(n_ma[k]),
                "p_main_given_absorber": num(p_m_given_a[k]),
                "p_absorber_given_main": num(p_a_given_m[k]),
                "cooccurrence_ratio": num(stats["cooccurrence_ratio"][k]),
                "npmi": num(stats["npmi"][k]),
            }
        )
    for key, values in (
        ("p_main_given_absorber", p_m_given_a),
        ("p_absorber_given_main", p_a_given_m),
        ("cooccurrence_ratio", stats["cooccurrence_ratio"]),
        ("npmi", stats["npmi"]),
    ):
        finite = values[np.isfinite(values)]
        out[f"mean_{key}"] = float(finite.mean()) if finite.size else None
    out["n_pairs_observed"] = int(((n_m > 0) & (n_a > 0)).sum())
    return out


def cooccurrence_metrics(
    sae: Any,
    acts_ND: torch.Tensor,
    cfg: CooccurrenceConfig | None = None,
    absorption: dict[str, Any] | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """The ``cooccurrence`` result section of `sae` on the activations `acts_ND`
    (`absorption`: that SAE's absorption result, for the parent-child pairs)."""
    cfg = cfg or CooccurrenceConfig()
    codes = sparse_codes(sae, acts_ND, cfg.batch_size, device)
    counts = codes.counts()
    result = {
        "n_tokens": codes.n_tokens,
        "d_sae": codes.d_sae,
        "mean_l0": float(counts.sum() / max(codes.n_tokens, 1)),
        "min_firing_rate": cfg.min_firing_rate,
        "frequent_pairs": frequent_pairs(codes, cfg),
        "parent_child": parent_child_pairs(codes, absorption, cfg),
        "definitions": {
            "cooccurrence_ratio": "n_ab / min(n_a, n_b) = P(a and b) / min(P(a), P(b))",
            "pmi": "log(n_ab N / (n_a n_b)); pairs with n_ab = 0 left out (pmi_cooccurring)",
            "npmi": "pmi / -log(n_ab / N); -1 when n_ab = 0",
            "observed_over_expected": "sum of n_ab / sum of n_a n_b / N over the pairs",
        },
    }
    pairs = result["frequent_pairs"]
    log.info(
        "cooccurrence: %d frequent latents, npmi mean %s, observed/expected %s; %d "
        "parent-child pairs, mean P(main | absorber) %s",
        pairs["n_latents_used"],
        (pairs.get("npmi") or {}).get("mean"),
        pairs.get("observed_over_expected"),
        result["parent_child"]["n_pairs"],
        result["parent_child"].get("mean_p_main_given_absorber"),
    )
    return result
