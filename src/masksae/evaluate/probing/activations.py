"""LLM residual-stream activations of probing texts, and their on-disk cache.

Two captures, both of block ``layer``'s output (``masksae.models.capture_resid_post``):

- :func:`token_activations` (sparse probing, SCR, TPP; SAEBench): each text tokenised without
  the tokenizer's own special tokens, the model's BOS prepended (see ``prepend_bos``), cut to
  ``context_length`` tokens (the start is kept, as SAEBench truncates); the activations of its
  real tokens are kept, packed one text after another. "Real" follows SAEBench's
  ``get_bos_pad_eos_mask``: every position holding the BOS, EOS or PAD id is excluded, and
  position 0 is excluded too when no BOS was prepended (it is the attention sink, 100x the
  norm of other positions in SmolLM2 and Gemma; SAEBench's Gemma runs have BOS there).
- :func:`last_token_activations` (OOD probing; Kantamneni et al.): the activation at the last
  token of each text, texts cut from the left to ``context_length`` tokens (their
  ``truncation_side = "left"``), BOS kept in front.

Texts are batched by length (right padding with an attention mask) and a tqdm bar on stderr
shows texts/s and the ETA. :class:`ActivationCache` keeps both per (model, revision, layer,
task texts, capture settings) so every checkpoint after the first reuses them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from masksae.evaluate.keyed_cache import KeyedCache, key_digest

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when the capture rule changes: old entries then stop matching."""
FLOAT16_MAX = 65504.0


@dataclass
class TokenActs:
    """Per-token activations of N texts, packed: text i owns rows offsets[i]:offsets[i+1]."""

    acts_ND: np.ndarray
    """[total real tokens, D] float16 or float32."""
    offsets: np.ndarray
    """int64 [N + 1], non-decreasing, offsets[0] == 0."""

    @property
    def n_texts(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def text_index(self) -> np.ndarray:
        """int64 [total tokens]: the text each row belongs to."""
        return np.repeat(np.arange(self.n_texts), self.lengths)

    def last(self) -> np.ndarray:
        """float32 [N, D]: each text's last kept token (zeros for a text without one)."""
        out = np.zeros((self.n_texts, self.acts_ND.shape[1]), dtype=np.float32)
        has = self.lengths > 0
        out[has] = self.acts_ND[self.offsets[1:][has] - 1]
        return out

    def features(self, pooling: str) -> np.ndarray:
        """float32 [N, D]: "mean" (SAEBench) or "last" (Kantamneni et al.) pooling."""
        return self.pooled() if pooling == "mean" else self.last()

    def pooled(self) -> np.ndarray:
        """float32 [N, D]: the mean activation over each text's real tokens (SAEBench's
        create_meaned_model_activations)."""
        acts = torch.from_numpy(self.acts_ND).float()
        idx = torch.from_numpy(self.text_index())
        sums = torch.zeros(self.n_texts, acts.shape[1]).index_add_(0, idx, acts)
        counts = torch.from_numpy(self.lengths).clamp_min(1).float()
        return (sums / counts[:, None]).numpy()


def _special_ids(tokenizer: Any) -> set[int]:
    return {
        i
        for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        if i is not None
    }


def bos_id(tokenizer: Any, prepend_bos: bool) -> int | None:
    """The id prepended to every text: the tokenizer's BOS when it has one and
    ``prepend_bos``; None otherwise."""
    return tokenizer.bos_token_id if prepend_bos else None


def encode_texts(
    tokenizer: Any, texts: Sequence[str], context_length: int, prepend_bos: bool, *, keep: str
) -> list[list[int]]:
    """Token ids of each text: BOS (when used) + the text's tokens, at most
    ``context_length`` in all; ``keep`` = "start" (SAEBench) or "end" (sae-probes)."""
    bos = bos_id(tokenizer, prepend_bos)
    room = context_length - (1 if bos is not None else 0)
    if room < 1:
        raise ValueError(f"context_length {context_length} leaves no room for text tokens")
    out = []
    ids_all = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for ids in ids_all:
        ids = list(ids[:room]) if keep == "start" else list(ids[-room:])
        out.append(([bos] if bos is not None else []) + ids)
    return out


def _batches(encoded: list[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(
    encoded: list[list[int]], batch: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(encoded[i]) for i in batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        n = len(encoded[i])
        ids[row, :n] = torch.tensor(encoded[i], dtype=torch.long)
        mask[row, :n] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _bar(total: int, desc: str, progress: bool) -> Any:
    from masksae.progress import progress_bar, progress_enabled, show_progress

    with show_progress(progress and progress_enabled()):
        return progress_bar(total, desc, "text")


@torch.inference_mode()
def token_activations(
    lm: Any,
    layer: int,
    texts: Sequence[str],
    *,
    context_length: int,
    prepend_bos: bool,
    batch_size: int,
    dtype: str = "float16",
    outlier_norm_factor: float = 0.0,
    progress: bool = True,
    desc: str = "LLM",
) -> TokenActs:
    """Activations of every real token of every text (see the module docstring); with
    ``outlier_norm_factor`` > 0, tokens whose norm exceeds that factor x the median norm of
    all the texts' real tokens are left out too (:func:`drop_norm_outliers`)."""
    from masksae.models import capture_resid_post

    tokenizer = lm.tokenizer
    encoded = encode_texts(tokenizer, texts, context_length, prepend_bos, keep="start")
    specials = _special_ids(tokenizer)
    drop_first = bos_id(tokenizer, prepend_bos) is None
    keep_masks = []
    for ids in encoded:
        keep = np.array([t not in specials for t in ids], dtype=bool)
        if drop_first and len(keep):
            keep[0] = False
        keep_masks.append(keep)
    lengths = np.array([int(k.sum()) for k in keep_masks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if dtype not in ("float16", "float32"):
        raise ValueError(f"probing cache_dtype {dtype!r}: expected 'float16' or 'float32'")
    out = np.zeros((int(offsets[-1]), int(lm.d_model)), dtype=np.dtype(dtype))
    pad_id = _pad_id(tokenizer)
    with _bar(len(texts), desc, progress) as bar:
        for batch in _batches(encoded, batch_size):
            ids, mask = _pad(encoded, batch, pad_id)
            h_BTD = capture_resid_post(lm, ids, mask, layer).float().cpu().numpy()
            if out.dtype == np.float16 and float(np.abs(h_BTD).max()) >= FLOAT16_MAX:
                log.warning("probing activations exceed the float16 range: caching float32")
                out = out.astype(np.float32)
            for row, i in enumerate(batch):
                keep = keep_masks[i]
                out[offsets[i] : offsets[i + 1]] = h_BTD[row, : len(keep)][keep]
            bar.update(len(batch))
    acts = TokenActs(out, offsets)
    return drop_norm_outliers(acts, outlier_norm_factor) if outlier_norm_factor > 0 else acts


def drop_norm_outliers(acts: TokenActs, factor: float, chunk: int = 65536) -> TokenActs:
    """``acts`` without the norm-outlier tokens: the harvest's rule (a token whose activation
    norm exceeds ``factor`` x the median norm of the other tokens; SmolLM2 has a few at ~100x
    the median, mostly the first real token), so no SAE sees a position it was never trained
    on and no such token dominates a text's mean."""
    from masksae.harvest import flag_norm_outliers

    norms = np.concatenate(
        [
            np.linalg.norm(acts.acts_ND[i : i + chunk].astype(np.float32), axis=1)
            for i in range(0, acts.acts_ND.shape[0], chunk)
        ]
        or [np.zeros(0, np.float32)]
    )
    outlier = flag_norm_outliers(norms, np.zeros(len(norms), dtype=bool), factor)
    if not outlier.any():
        return acts
    log.info(
        "probing: %d of %d token activations are norm outliers (> %g x median); left out",
        int(outlier.sum()),
        len(norms),
        factor,
    )
    kept_per_text = np.bincount(acts.text_index()[~outlier], minlength=acts.n_texts).astype(
        np.int64
    )
    offsets = np.concatenate([[0], np.cumsum(kept_per_text)]).astype(np.int64)
    return TokenActs(acts.acts_ND[~outlier], offsets)


@torch.inference_mode()
def last_token_activations(
    lm: Any,
    layer: int,
    texts: Sequence[str],
    *,
    context_length: int,
    prepend_bos: bool,
    batch_size: int,
    progress: bool = True,
    desc: str = "LLM",
) -> np.ndarray:
    """float32 [N, D]: the activation at each text's last token (texts cut from the left)."""
    from masksae.models import capture_resid_post

    encoded = encode_texts(lm.tokenizer, texts, context_length, prepend_bos, keep="end")
    out = np.zeros((len(texts), int(lm.d_model)), dtype=np.float32)
    pad_id = _pad_id(lm.tokenizer)
    with _bar(len(texts), desc, progress) as bar:
        for batch in _batches(encoded, batch_size):
            ids, mask = _pad(encoded, batch, pad_id)
            h_BTD = capture_resid_post(lm, ids, mask, layer).float().cpu().numpy()
            for row, i in enumerate(batch):
                out[i] = h_BTD[row, max(len(encoded[i]) - 1, 0)]
            bar.update(len(batch))
    return out


class ActivationCache:
    """Per-task LLM activations and SAE-independent probe results, on disk
    (``<cache>/probing-<digest>.{npz,json}``) and, up to ``memory_mb``, in memory for the life
    of the evaluator (least recently used entries are dropped first); ``root`` None keeps
    them in memory only."""

    def __init__(self, root: Any, memory_mb: int = 2048) -> None:
        self._disk = KeyedCache(root, "probing")
        self._memory: OrderedDict[str, tuple[dict[str, np.ndarray], dict]] = OrderedDict()
        self._budget = memory_mb << 20

    def _remember(self, digest: str, entry: tuple[dict[str, np.ndarray], dict]) -> None:
        self._memory[digest] = entry
        self._memory.move_to_end(digest)
        while len(self._memory) > 1 and self._bytes() > self._budget:
            self._memory.popitem(last=False)

    def _bytes(self) -> int:
        return sum(a.nbytes for arrays, _ in self._memory.values() for a in arrays.values())

    def get(self, key: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict] | None:
        """(arrays, meta) cached for ``key``, or None."""
        digest = key_digest(key)
        if digest in self._memory:
            self._memory.move_to_end(digest)
            return self._memory[digest]
        entry = self._disk.load(key)
        if entry is not None:
            self._remember(digest, entry)
        return entry

    def put(self, key: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Keep ``arrays`` and the JSON-able ``meta`` for ``key``."""
        self._remember(key_digest(key), (arrays, meta))
        path = self._disk.save(key, arrays, meta)
        if path is not None:
            log.debug("probing: cached %s in %s", meta.get("what", "arrays"), path)
