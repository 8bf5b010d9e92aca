"""The evaluation result file: one JSON document per checkpoint.

```
{
  "schema": "masksae.eval", "schema_version": 1,
  "checkpoint": "<path>",
  "provenance": {model, revision, layer, mask_prob, corruption, corruption_label,
                 architecture, k, d_in, d_sae, seed, store_seed, step, tokens,
                 store_fingerprint},
  "eval_data": {...how the evaluation activations were made (corpus, tokens, cache key)...},
  "metrics": {"core": {...}, "core_masked": {...}, "absorption": {...},
              "cooccurrence": {...},
              "sparse_probing": {...}, "scr": {...}, "tpp": {...}, "ood": {...}},
  "timings_s": {"<phase>": seconds, ..., "total": seconds},
  "package_version": "...", "created": "<UTC ISO time>"
}
```
Metric names inside ``metrics["core"]`` are those of :mod:`masksae.evaluate.core` plus
``masksae.evaluate.downstream`` under ``metrics["core"]["downstream"]``.

The probing sections (:mod:`masksae.evaluate.probing`; each also holds ``per_task`` details,
``tasks``, ``config``, ``settings`` {preset, prepend_bos, cache_dtype, llm_dtype},
``cache_hits`` and ``timings_s``; accuracies, scores and AUCs are fractions, not percent):

- ``sparse_probing``: ``llm_test_accuracy``, ``sae_test_accuracy`` (all-feature probes),
  ``llm_top_{k}_test_accuracy``, ``sae_top_{k}_test_accuracy`` per k, ``headline_k``;
  per task ``per_class`` and the probe set sizes.
- ``scr``: ``scr_metric_threshold_{N}``, ``scr_dir1_threshold_{N}``,
  ``scr_dir2_threshold_{N}`` per N, ``headline_n``, ``n_values``; per task the chosen
  direction and the LLM-probe and ablated accuracies.
- ``tpp``: ``tpp_threshold_{N}_total_metric``, ``..._intended_diff_only``,
  ``..._unintended_diff_only`` per N, ``headline_n``, ``n_values``; per task the per-class
  scores and clean accuracies.
- ``ood``: ``mean_sae_test_auc``, ``mean_oracle_test_auc``, ``mean_gap``, ``k``; per task
  ``sae_test_auc``, ``oracle_test_auc`` and each probe's chosen C, validation AUC,
  accuracy and F1.

Adding these sections kept ``schema_version`` at 1: older files simply lack them.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from masksae.errors import MasksaeError

SCHEMA_NAME = "masksae.eval"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema", "schema_version", "checkpoint", "provenance", "metrics", "timings_s")
PROVENANCE_KEYS = (
    "model",
    "revision",
    "layer",
    "mask_prob",
    "corruption",
    "corruption_label",
    "architecture",
    "k",
    "d_in",
    "d_sae",
    "seed",
    "store_seed",
    "step",
    "tokens",
    "store_fingerprint",
)


class ResultFormatError(MasksaeError):
    """A result file is not a masksae evaluation result of a supported schema version."""


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def provenance_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The grouping keys of a checkpoint, read from ``load_sae``'s meta dict."""
    sae = meta.get("sae") or {}
    train = meta.get("train") or {}
    store = meta.get("store") or {}
    from masksae.storage.provenance import corruption_kind, corruption_label

    mask_prob = _first(store.get("mask_prob"), store.get("p"), 0.0)
    return {
        "model": store.get("model"),
        # harvests record "model_revision"; "revision" is read for older hand-made metas
        "revision": _first(store.get("model_revision"), store.get("revision")),
        "layer": store.get("layer"),
        "mask_prob": float(mask_prob),
        # the store's corruption (masksae.storage.provenance): controls at the same p differ
        "corruption": corruption_kind(store),
        "corruption_label": corruption_label({**store, "mask_prob": mask_prob}),
        "architecture": sae.get("architecture"),
        "k": sae.get("k"),
        "d_in": sae.get("d_in"),
        "d_sae": sae.get("d_sae"),
        "seed": _first(train.get("seed"), sae.get("seed"), store.get("seed")),
        "store_seed": store.get("seed"),
        "step": meta.get("step"),
        "tokens": meta.get("tokens"),
        "store_fingerprint": meta.get("store_fingerprint"),
    }


def make_result(
    checkpoint: str | Path,
    provenance: dict[str, Any],
    eval_data: dict[str, Any],
    metrics: dict[str, Any],
    timings_s: dict[str, float],
) -> dict[str, Any]:
    """Assemble a result document of the current schema version."""
    from masksae import __version__

    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "checkpoint": str(checkpoint),
        "provenance": {key: provenance.get(key) for key in PROVENANCE_KEYS},
        "eval_data": eval_data,
        "metrics": metrics,
        "timings_s": timings_s,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def validate_result(doc: Any, where: str = "result") -> dict[str, Any]:
    """Check the top-level shape of a result document; return it."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
        raise ResultFormatError(
            f"{where} is not a masksae evaluation result (schema "
            f"{SCHEMA_NAME!r} expected): pass the JSON files `masksae "
            "evaluate` wrote"
        )
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ResultFormatError(
            f"{where} has schema_version {doc.get('schema_version')!r}; this masksae reads "
            f"version {SCHEMA_VERSION}: re-run `masksae evaluate` on the checkpoint"
        )
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ResultFormatError(f"{where} lacks key(s) {missing}")
    if not isinstance(doc["metrics"], dict) or not isinstance(doc["provenance"], dict):
        raise ResultFormatError(f"{where}: 'metrics' and 'provenance' must be objects")
    return doc


def load_result(path: str | Path) -> dict[str, Any]:
    """Read and validate one result file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultFormatError(f"cannot read result file {str(path)!r}: {exc}") from exc
    return validate_result(doc, where=str(path))
