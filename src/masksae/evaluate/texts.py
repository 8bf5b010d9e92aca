"""Held-out evaluation text, read through the harvest stage's corpus API.

Documents come from :class:`masksae.harvest.Corpus` - the same reader (and the same
document order) a harvest uses - so evaluation text and training text have one
implementation. A harvest packs documents *from the start* of its corpus; evaluation keeps
clear of that part in one of two ways (:func:`held_out_documents`):

- **tail** (finite sources - ``bundled``, local ``.txt`` / ``.jsonl`` / ``.parquet`` files
  and folders - when ``skip_tokens`` is None): documents are taken from the *end* of the
  corpus backwards (last document first). A harvest of H tokens and an evaluation of E
  tokens on the same corpus never share a document while H + E (plus one context of
  rounding each) stays below the corpus size; the bundled corpus holds about 0.8M tokens
  (SmolLM2 tokenizer), so the default harvest (100K tokens) and evaluation (16K) are far
  apart. Only the tail is kept in memory (``TAIL_CHARS_PER_TOKEN`` characters per wanted
  token, at least ``MIN_TAIL_CHARS``).
- **skip** (Hugging Face streams, which cannot be read from the end, or any source given
  ``skip_tokens``): documents are read forward, and every document that *starts* before
  ``skip_tokens`` tokens of text (counted by the model's tokenizer, separators not counted)
  is skipped. A harvest of at most ``skip_tokens`` tokens from the start of the same corpus
  (same field, filters and split) only touches skipped documents. Streams skip
  ``HUB_SKIP_TOKENS`` by default; pass ``skip_tokens=0`` with a held-out split
  (``split="validation"``) instead where the dataset has one.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from masksae.errors import CorpusError
from masksae.harvest import Corpus, CorpusSpec

log = logging.getLogger(__name__)

HUB_SKIP_TOKENS = 1_000_000
"""Tokens skipped at the start of a Hugging Face stream when ``skip_tokens`` is None
(10x the default harvest size)."""
TAIL_CHARS_PER_TOKEN = 32
"""Characters of corpus tail kept in memory per wanted token (tail mode)."""
MIN_TAIL_CHARS = 4 << 20
"""Smallest corpus tail kept in memory (tail mode): 4 MiB of text."""
_TOKENIZE_BATCH = 64


def make_corpus(
    source: str, field: str = "text", filters: Iterable[str] = (), split: str = "train"
) -> Corpus:
    """The harvest stage's corpus reader for an evaluation source."""
    return Corpus(CorpusSpec(source=source, field=field, filters=tuple(filters), split=split))


def holdout_mode(corpus: Corpus, skip_tokens: int | None) -> tuple[str, int]:
    """("tail", 0) or ("skip", tokens) for this corpus and setting."""
    if skip_tokens is not None:
        if skip_tokens < 0:
            raise CorpusError(f"eval skip_tokens {skip_tokens}: expected >= 0")
        return "skip", int(skip_tokens)
    if corpus.kind == "hub":
        return "skip", HUB_SKIP_TOKENS
    return "tail", 0


def tail_documents(documents: Iterable[str], max_chars: int) -> list[str]:
    """The last documents of ``documents`` holding at most ``max_chars`` characters (at
    least one document), last document first. Memory is bounded by ``max_chars``."""
    tail: collections.deque[str] = collections.deque()
    chars = 0
    for doc in documents:
        tail.append(doc)
        chars += len(doc)
        while len(tail) > 1 and chars > max_chars:
            chars -= len(tail.popleft())
    tail.reverse()
    return list(tail)


def skip_documents(documents: Iterable[str], tokenizer: Any, skip_tokens: int) -> Iterator[str]:
    """``documents`` without every document that starts before ``skip_tokens`` text tokens."""
    it = iter(documents)
    if skip_tokens <= 0:
        yield from it
        return
    seen = 0
    n_skipped = 0
    while seen < skip_tokens:
        batch = list(itertools.islice(it, _TOKENIZE_BATCH))
        if not batch:
            raise CorpusError(
                f"evaluation corpus ended within the {skip_tokens} held-out "
                f"tokens skipped at its start ({seen} tokens in {n_skipped} "
                "documents): pass a smaller skip or a larger corpus"
            )
        lengths = [
            len(ids)
            for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        ]
        for i, n in enumerate(lengths):
            if seen >= skip_tokens:  # this document starts after the skipped span
                log.info(
                    "evaluation text starts after %d documents (%d tokens) of the corpus",
                    n_skipped,
                    seen,
                )
                yield from batch[i:]
                yield from it
                return
            seen += n
            n_skipped += 1
    log.info("evaluation text starts after %d documents (%d tokens) of the corpus", n_skipped, seen)
    yield from it


def held_out_documents(
    corpus: Corpus,
    tokenizer: Any,
    n_tokens: int,
    skip_tokens: int | None = None,
) -> Iterator[str]:
    """Evaluation documents of ``corpus``, held out from a harvest reading it from the start
    (see the module docstring); enough for ``n_tokens`` tokens when the corpus has them."""
    mode, skip = holdout_mode(corpus, skip_tokens)
    if mode == "tail":
        docs = tail_documents(iter(corpus), max(MIN_TAIL_CHARS, TAIL_CHARS_PER_TOKEN * n_tokens))
        if not docs or not any(d.strip() for d in docs):
            raise CorpusError(f"evaluation corpus {corpus.spec.source!r} holds no text")
        return iter(docs)
    return skip_documents(iter(corpus), tokenizer, skip)
