"""On-disk cache of the SAE-independent stage: LLM activations and the ground-truth probe.

Everything before the SAE (vocabulary, prompts, LLM activations, the letter probe and the
absorption prompts' activations) depends only on the model, its revision, the layer, the
tokenizer and part of the config, so a second SAE on the same model/layer reuses it. One
entry = `<key hash>.npz` (arrays) + `<key hash>.json` (the key and word lists), written
atomically; an entry whose key does not match exactly is ignored.

The key names the BOS token actually prepended and the prompt layout (``PROMPT_FORMAT``), so
an entry made under another BOS policy or prompt layout (e.g. by earlier masksae versions, whose probe
prompts lacked the leading separator and which added BOS for Gemma only) is never reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from masksae.atomic import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
PROMPT_FORMAT = {
    # every prompt = [BOS] separator, examples joined by the separator, separator, query
    "probe_prompts_start_with_separator": True,
    "absorption_prompts_start_with_separator": True,
    "activation_at": "last token of the query word; later tokens not run",
}
# config fields that change the cached stage (everything else only affects later stages)
KEY_FIELDS = (
    "seed",
    "prepend_bos",
    "max_words_per_letter",
    "train_fraction",
    "n_icl_examples",
    "prompt_template",
    "answer_template",
    "example_separator",
    "probe_epochs",
    "probe_batch_size",
    "probe_lr",
    "probe_end_lr",
    "probe_weight_decay",
)


@dataclass
class LLMStage:
    """The SAE-independent intermediate results."""

    train_words: list[str]
    test_words: list[str]
    x_train_ND: torch.Tensor
    y_train_N: torch.Tensor
    x_test_ND: torch.Tensor
    y_test_N: torch.Tensor
    probe_W_CD: torch.Tensor
    probe_b_C: torch.Tensor
    abs_words: list[str]
    """Probe-true-positive test words, re-prompted with examples from the whole vocabulary."""
    x_abs_ND: torch.Tensor
    y_abs_N: torch.Tensor


def cache_key(lm, layer: int, cfg, bos) -> dict:
    """JSON-able description of everything the cached stage depends on (`bos`: the
    :class:`~masksae.evaluate.absorption.prompts.BosPolicy` in force)."""
    tok = lm.tokenizer
    return {
        "version": CACHE_VERSION,
        "model_id": str(getattr(lm, "model_id", type(lm.model).__name__)),
        "revision": str(getattr(lm, "revision", "unknown")),
        "layer": int(layer),
        "bos": bos.to_dict(),
        "prompt_format": PROMPT_FORMAT,
        "tokenizer": {
            "class": type(tok).__name__,
            "name_or_path": str(getattr(tok, "name_or_path", "")),
            "size": len(tok),
        },
        "config": {name: getattr(cfg, name) for name in KEY_FIELDS},
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def load(cache_dir: Path, key: dict) -> LLMStage | None:
    """The cached stage for `key`, or None when absent or made with another key."""
    stem = Path(cache_dir) / f"absorption-{_digest(key)}"
    meta_path, arrays_path = stem.with_suffix(".json"), stem.with_suffix(".npz")
    if not (meta_path.exists() and arrays_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            logger.warning("absorption cache %s has a different key; recomputing", meta_path)
            return None
        with np.load(arrays_path) as z:
            arrays = {name: torch.from_numpy(z[name].copy()) for name in z.files}
    except (OSError, ValueError, KeyError) as err:
        logger.warning("absorption cache %s unreadable (%s); recomputing", stem, err)
        return None
    return LLMStage(
        train_words=meta["train_words"],
        test_words=meta["test_words"],
        abs_words=meta["abs_words"],
        **arrays,
    )


def save(cache_dir: Path, key: dict, stage: LLMStage) -> Path:
    """Write `stage` under `cache_dir` (arrays first, then the json that makes it valid)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / f"absorption-{_digest(key)}"
    buf = io.BytesIO()
    arrays = {
        name: getattr(stage, name).numpy()
        for name in (
            "x_train_ND",
            "y_train_N",
            "x_test_ND",
            "y_test_N",
            "probe_W_CD",
            "probe_b_C",
            "x_abs_ND",
            "y_abs_N",
        )
    }
    np.savez(buf, **arrays)
    atomic_write_bytes(stem.with_suffix(".npz"), buf.getvalue())
    atomic_write_json(
        stem.with_suffix(".json"),
        {
            "key": key,
            "train_words": stage.train_words,
            "test_words": stage.test_words,
            "abs_words": stage.abs_words,
        },
    )
    return stem.with_suffix(".npz")
