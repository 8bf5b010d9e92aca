"""Tokenise documents and pack them into fixed-length sequences.

Documents are concatenated into one token stream, each followed by a separator (the
tokenizer's EOS, or BOS when it has no EOS), and the stream is cut into sequences of
``context_length`` tokens. For models that need BOS at the start (``LoadedModel.prepend_bos``,
the Gemma family) every sequence is BOS + ``context_length - 1`` stream tokens. Documents are
not shuffled: the order is the corpus order, so packing is deterministic (the store's reader
shuffles at training time). The tail of the stream that does not fill a sequence is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from masksae.errors import ConfigError, ModelError

DEFAULT_CONTEXT = 1024
"""Default context length for Hub and local models (capped at the model's maximum)."""
DEFAULT_BUNDLED_CONTEXT = 128
"""Default context length for the bundled demo models (fast on CPU)."""


def resolve_context_length(requested: int | None, max_context: int | None, *, bundled: bool) -> int:
    """The context length to use; ModelError if ``requested`` exceeds the model's maximum."""
    if requested is None:
        default = DEFAULT_BUNDLED_CONTEXT if bundled else DEFAULT_CONTEXT
        return min(default, max_context) if max_context else default
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 2:
        raise ConfigError(f"context length {requested!r} is invalid: expected an integer >= 2")
    if max_context is not None and requested > max_context:
        raise ModelError(
            f"context length {requested} is longer than the model allows ({max_context} "
            f"positions): use --context-length {max_context} or less"
        )
    return requested


def separator_id(tokenizer: Any) -> int | None:
    """Token placed after every document: EOS, else BOS, else None."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def pack_sequences(
    documents: Iterable[str],
    tokenizer: Any,
    context_length: int,
    *,
    prepend_bos: bool = False,
    docs_per_batch: int = 64,
) -> Iterator[np.ndarray]:
    """Yield int32 arrays of exactly ``context_length`` token ids, in corpus order."""
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise ModelError("the model needs a BOS token but its tokenizer defines none")
    body = context_length - 1 if prepend_bos else context_length
    sep = separator_id(tokenizer)
    buffer: list[int] = []

    def encode(batch: list[str]) -> list[list[int]]:
        return tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]

    batch: list[str] = []
    doc_iter = iter(documents)
    while True:
        doc = next(doc_iter, None)
        if doc is not None:
            batch.append(doc)
            if len(batch) < docs_per_batch:
                continue
        if batch:
            for ids in encode(batch):
                if not ids:
                    continue
                buffer.extend(ids)
                if sep is not None:
                    buffer.append(sep)
            batch = []
            start = 0
            while len(buffer) - start >= body:
                seq = buffer[start : start + body]
                start += body
                if prepend_bos:
                    seq = [int(bos), *seq]
                yield np.asarray(seq, dtype=np.int32)
            del buffer[:start]
        if doc is None:
            return
