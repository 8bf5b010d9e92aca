"""On-disk cache of the SAE-independent stage: LLM activations and the ground-truth probe.

Everything before the SAE (vocabulary, prompts, LLM activations, the letter probe and the
absorption prompts' activations) depends only on the model, its revision, the layer, the
tokenizer and part of the config, so a second SAE on the same model/layer reuses it. One
entry = `<key hash>.npz` (arrays) + `<key hash>.json` (the key and word lists), written
atomically (``masksae.evaluate.keyed_cache``, shared with the probing metrics); an entry whose key does not match exactly is ignored.

The key names the BOS token actually prepended and the prompt layout (``PROMPT_FORMAT``), so
an entry made under another BOS policy or prompt layout (e.g. by earlier masksae versions, whose probe
prompts lacked the leading separator and which added BOS for Gemma only) is never reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from masksae.evaluate.keyed_cache import KeyedCache

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


def _entries(cache_dir: Path) -> KeyedCache:
    return KeyedCache(cache_dir, "absorption")


def load(cache_dir: Path, key: dict) -> LLMStage | None:
    """The cached stage for `key`, or None when absent or made with another key."""
    entry = _entries(cache_dir).load(key)
    if entry is None:
        return None
    arrays, meta = entry
    try:
        return LLMStage(
            train_words=meta["train_words"],
            test_words=meta["test_words"],
            abs_words=meta["abs_words"],
            **{name: torch.from_numpy(a.copy()) for name, a in arrays.items()},
        )
    except (KeyError, TypeError) as err:
        logger.warning("absorption cache in %s is incomplete (%s); recomputing", cache_dir, err)
        return None


def save(cache_dir: Path, key: dict, stage: LLMStage) -> Path:
    """Write `stage` under `cache_dir` (arrays first, then the json that makes it valid)."""
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
    meta = {
        "train_words": stage.train_words,
        "test_words": stage.test_words,
        "abs_words": stage.abs_words,
    }
    path = _entries(cache_dir).save(key, arrays, meta)
    assert path is not None
    return path
