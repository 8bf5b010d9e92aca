"""Evaluation activations: held-out token sequences, their residual-stream activations at
the SAE's layer, and an on-disk cache so the N-th checkpoint of a sweep reuses them.

The cache key covers everything that changes the data: model, revision, layer, corpus,
token count, context length, seed, masking and storage dtype. An entry is a directory
``<cache>/evaldata-<key hash>/`` with ``data.safetensors`` and ``meta.json``; it is written
atomically, so an interrupted run never leaves a half entry that reads as valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from masksae.atomic import atomic_write, atomic_write_json
from masksae.errors import ConfigError, StoreError
from masksae.evaluate.config import EvalDataConfig

log = logging.getLogger(__name__)

CACHE_FORMAT = 3
"""3: norm outliers excluded; 2: text read with masksae.harvest.Corpus; 1: own gensim reader."""


@dataclass
class EvalData:
    """Held-out sequences and their activations at the non-excluded positions."""

    input_ids_ST: Tensor
    """[S, T] int64 token ids (after masking, when masked)."""
    attention_mask_ST: Tensor
    """[S, T] int64 attention mask (all ones: sequences are packed)."""
    keep_ST: Tensor
    """[S, T] bool: positions whose activation is evaluated (not position 0, not special)."""
    acts_ND: Tensor
    """[N, D] activations at the kept positions in row-major order, N <= kept count."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The cache key fields plus n_sequences / n_tokens / d_model."""


def cache_key(fields: dict[str, Any]) -> str:
    """Stable short hash of the JSON-able key fields."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def key_fields(model: str, revision: str | None, layer: int, cfg: EvalDataConfig) -> dict[str, Any]:
    """Everything that determines the evaluation data."""
    out: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "model": model,
        "revision": revision,
        "layer": layer,
        "corpus": cfg.corpus,
        "corpus_field": cfg.corpus_field,
        "corpus_filter": list(cfg.corpus_filter),
        "corpus_split": cfg.corpus_split,
        "skip_tokens": cfg.skip_tokens,
        "n_tokens": cfg.n_tokens,
        "context_length": cfg.context_length,
        "cache_dtype": cfg.cache_dtype,
        "masked": cfg.masked,
        "outlier_norm_factor": cfg.outlier_norm_factor,
    }
    if cfg.masked:
        out.update(
            seed=cfg.seed,
            mask_prob=cfg.mask_prob,
            mask_token_id=cfg.mask_token_id,
            mask_string=cfg.mask_string,
        )
    return out


def eval_documents(cfg: EvalDataConfig, tokenizer: Any) -> Iterator[str]:
    """The held-out documents of ``cfg.corpus`` (see :mod:`masksae.evaluate.texts`)."""
    from masksae.evaluate.texts import held_out_documents, make_corpus

    corpus = make_corpus(cfg.corpus, cfg.corpus_field, cfg.corpus_filter, cfg.corpus_split)
    # tokens wanted: the evaluated positions plus one position 0 per sequence
    want = cfg.n_tokens + math.ceil(cfg.n_tokens / (cfg.context_length - 1)) + 1
    return held_out_documents(corpus, tokenizer, want, cfg.skip_tokens)


def pack_sequences(lm: Any, texts: Iterable[str], n_kept: int, cfg: EvalDataConfig) -> Tensor:
    """[S, T] token ids: documents joined by EOS and cut into windows, BOS first if needed.

    Enough sequences are produced for ``n_kept`` evaluated positions (T - 1 per sequence).
    """
    tok = lm.tokenizer
    bos = tok.bos_token_id if lm.prepend_bos else None
    body = cfg.context_length - (1 if bos is not None else 0)
    n_seq = math.ceil(n_kept / (cfg.context_length - 1))
    need = n_seq * body
    stream: list[int] = []
    sep = tok.eos_token_id
    for text in texts:
        stream.extend(tok(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        if len(stream) >= need:
            break
    n_avail = len(stream) // body
    if n_avail == 0:
        raise ConfigError(
            f"evaluation corpus {cfg.corpus!r} has fewer than one sequence of {body} tokens"
        )
    if n_avail < n_seq:
        log.warning(
            "evaluation corpus %r yields %d sequences of %d tokens, fewer than the %d "
            "wanted for %d evaluation tokens; using them all",
            cfg.corpus,
            n_avail,
            cfg.context_length,
            n_seq,
            n_kept,
        )
        n_seq = n_avail
    ids = torch.tensor(stream[: n_seq * body], dtype=torch.int64).view(n_seq, body)
    if bos is not None:
        ids = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.int64), ids], dim=1)
    return ids


def apply_mask(ids_ST: Tensor, keep_ST: Tensor, prob: float, token_id: int, seed: int) -> Tensor:
    """Replace each kept position by ``token_id`` with probability ``prob`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    draw = torch.rand(ids_ST.shape, generator=g) < prob
    return torch.where(draw & keep_ST, torch.full_like(ids_ST, token_id), ids_ST)


def build_eval_data(
    lm: Any, layer: int, texts: Iterable[str] | None, cfg: EvalDataConfig
) -> EvalData:
    """Tokenise, pack, optionally mask, and capture activations of block ``layer``.

    ``texts`` None reads the held-out documents of ``cfg`` (:func:`eval_documents`)."""
    from masksae.devices import resolve_dtype
    from masksae.evaluate.downstream import keep_positions
    from masksae.models import capture_resid_post

    specials = list(getattr(lm.tokenizer, "all_special_ids", []) or [])
    if texts is None:
        texts = eval_documents(cfg, lm.tokenizer)
    ids = pack_sequences(lm, texts, cfg.n_tokens, cfg)
    attn = torch.ones_like(ids)
    keep = keep_positions(ids, attn, specials)
    if cfg.masked:
        mask_id = cfg.mask_token_id
        if mask_id is None:
            enc = lm.tokenizer(cfg.mask_string, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ConfigError(
                    f"mask string {cfg.mask_string!r} is {len(enc)} tokens for this "
                    "tokenizer; give the mask token id of the harvest"
                )
            mask_id = enc[0]
        ids = apply_mask(ids, keep, cfg.mask_prob, mask_id, cfg.seed)
    store_dtype = resolve_dtype(cfg.cache_dtype)
    rows: list[Tensor] = []
    n_rows = 0
    n_captured_seqs = 0
    from masksae.progress import progress_bar

    with progress_bar(cfg.n_tokens, "eval activations (LLM)", "tok", unit_scale=True) as bar:
        for start in range(0, ids.shape[0], cfg.llm_batch_size):
            if n_rows >= cfg.n_tokens:
                break
            sl = slice(start, start + cfg.llm_batch_size)
            h = capture_resid_post(lm, ids[sl], attn[sl], layer)
            chunk = h[keep[sl].to(h.device)].to("cpu", torch.float32)
            rows.append(chunk)
            n_rows += chunk.shape[0]
            bar.update(min(chunk.shape[0], cfg.n_tokens - bar.n))
            n_captured_seqs = min(start + cfg.llm_batch_size, ids.shape[0])
    acts = torch.cat(rows)
    keep[n_captured_seqs:] = False
    acts, keep = _drop_norm_outliers(acts, keep, cfg.outlier_norm_factor)
    return EvalData(ids, attn, keep, acts[: cfg.n_tokens].to(store_dtype).contiguous())


def _drop_norm_outliers(acts_ND: Tensor, keep_ST: Tensor, factor: float) -> tuple[Tensor, Tensor]:
    """Remove norm-outlier rows (the harvest's rule) from ``acts_ND`` and from ``keep_ST``.

    ``acts_ND`` holds the kept positions of ``keep_ST`` in row-major order."""
    from masksae.harvest import flag_norm_outliers

    norms = torch.linalg.vector_norm(acts_ND, dim=-1)
    outlier = torch.from_numpy(
        flag_norm_outliers(norms, torch.zeros(len(norms), dtype=torch.bool).numpy(), factor)
    )
    if outlier.any():
        log.info(
            "evaluation: %d of %d positions are norm outliers (> %g x median norm); not evaluated",
            int(outlier.sum()),
            len(norms),
            factor,
        )
        keep_ST = keep_ST.clone()
        keep_ST[keep_ST.clone()] = ~outlier
    return acts_ND[~outlier], keep_ST


def has_entry(cache_dir: Path | None, fields: dict[str, Any]) -> bool:
    """True when a complete cache entry for ``fields`` exists."""
    return (
        cache_dir is not None
        and (Path(cache_dir) / f"evaldata-{cache_key(fields)}" / "meta.json").is_file()
    )


def load_or_build(
    cache_dir: Path | None,
    fields: dict[str, Any],
    build: Callable[[], EvalData],
) -> tuple[EvalData, bool]:
    """The cached entry for ``fields`` if present, else ``build()`` (then cached). -> (data, hit)."""
    key = cache_key(fields)
    entry = None if cache_dir is None else Path(cache_dir) / f"evaldata-{key}"
    if entry is not None and (entry / "meta.json").is_file():
        data = _read_entry(entry)
        log.info("evaluation activations from cache %s", entry)
        return data, True
    data = build()
    data.meta = {
        **fields,
        "cache_key": key,
        "n_sequences": int(data.input_ids_ST.shape[0]),
        "n_tokens_evaluated": int(data.acts_ND.shape[0]),
        "d_model": int(data.acts_ND.shape[1]),
    }
    if entry is not None:
        _write_entry(entry, data)
    return data, False


def _write_entry(entry: Path, data: EvalData) -> None:
    from safetensors.torch import save_file

    entry.mkdir(parents=True, exist_ok=True)
    tensors = {
        "input_ids": data.input_ids_ST,
        "attention_mask": data.attention_mask_ST,
        "keep": data.keep_ST.to(torch.uint8),
        "acts": data.acts_ND,
    }
    atomic_write(entry / "data.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write_json(entry / "meta.json", data.meta)  # written last: marks the entry complete


def _read_entry(entry: Path) -> EvalData:
    from safetensors.torch import load_file

    try:
        meta = json.loads((entry / "meta.json").read_text())
        t = load_file(str(entry / "data.safetensors"))
        return EvalData(t["input_ids"], t["attention_mask"], t["keep"].bool(), t["acts"], meta)
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(
            f"evaluation cache entry {str(entry)!r} is unreadable ({exc}): delete it and re-run"
        ) from exc


def store_activations(
    path: str | Path,
    n_tokens: int,
    *,
    include_masked: bool,
    storage_options: dict[str, Any] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """The last ``n_tokens`` usable activations of an activation store (the part a training
    run reading from the start is least likely to have used), in store order, as [N, D]
    float32, with a JSON-able description.

    Usable rows are the non-excluded tokens (never position 0 or special tokens); with
    ``include_masked=False`` masked tokens are dropped too (the clean metrics), with True they
    are kept (the masked metrics).
    """
    from masksae.storage import ActivationStore

    if n_tokens < 1:
        raise ConfigError(f"store activations: n_tokens={n_tokens}, expected >= 1")
    store = ActivationStore.open(path, storage_options=storage_options)
    rows: list[Tensor] = []
    got = 0
    stop = store.n_tokens
    span = max(n_tokens, 1024)
    while got < n_tokens and stop > 0:
        start = max(0, stop - span)
        chunk = store.read(start, stop)
        ok = ~chunk.excluded
        if not include_masked:
            ok &= ~chunk.masked
        acts = torch.as_tensor(chunk.activations[ok])
        if acts.dtype == torch.uint16:  # bfloat16 stored as its bit pattern
            acts = acts.view(torch.bfloat16)
        rows.insert(0, acts.to(torch.float32))
        got += acts.shape[0]
        stop = start
    if got == 0:
        raise StoreError(
            f"activation store {str(path)!r} has no usable tokens (include_masked={include_masked})"
        )
    if got < n_tokens:
        log.warning(
            "activation store %s holds %d usable tokens (include_masked=%s), fewer "
            "than the %d asked for; using them all",
            path,
            got,
            include_masked,
            n_tokens,
        )
    acts = torch.cat(rows)[-n_tokens:]
    info = {
        "path": str(path),
        "n_tokens": int(acts.shape[0]),
        "d_model": int(acts.shape[1]),
        "include_masked": include_masked,
        "fingerprint": store.fingerprint,
        "provenance": {k: store.provenance.get(k) for k in ("model", "layer", "revision")},
    }
    return acts, info
