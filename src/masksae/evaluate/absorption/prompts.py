"""In-context first-letter prompts and the token position of the query word."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from masksae.evaluate.absorption.vocab import LETTERS, first_letter_index


@dataclass(frozen=True)
class Prompt:
    """One prompt: in-context examples, then the query built from the template."""

    text: str
    """The full prompt text fed to the model."""
    word: str
    """The query word (as decoded from the tokenizer, possibly with a leading space)."""
    word_end: int
    """Character offset in `text` just past the query word."""
    letter: int
    """Index 0..25 of the word's first letter (the label)."""


def answer_for(word: str, answer_template: str) -> str:
    """The in-context answer for `word`, e.g. " C" for " cat"."""
    return answer_template.format(letter=LETTERS[first_letter_index(word)].upper())


def build_prompt(
    word: str,
    examples: Sequence[str],
    rng: random.Random,
    *,
    n_examples: int,
    template: str,
    answer_template: str,
    separator: str,
    prepend_separator: bool = False,
) -> Prompt:
    """A prompt with `n_examples` examples drawn from `examples` (never `word` itself).

    Layout: [separator] ex1 answer1 separator ... exN answerN separator query, where each
    example is `template` filled with the example word followed by its answer.
    """
    pool = [w for w in examples if w != word]
    if len(pool) < n_examples:
        raise ValueError(
            f"need {n_examples} in-context examples other than {word!r}, only {len(pool)} "
            "words available; lower n_icl_examples or use a larger vocabulary"
        )
    chosen = rng.sample(pool, n_examples)
    parts = [template.format(word=w) + answer_for(w, answer_template) for w in chosen]
    prefix = separator.join(parts) + separator if parts else ""
    if prepend_separator:
        prefix = separator + prefix
    before, after = template.split("{word}", 1)
    text = prefix + before + word + after.format(word=word)
    word_end = len(prefix) + len(before) + len(word)
    return Prompt(text=text, word=word, word_end=word_end, letter=first_letter_index(word))


def build_prompts(
    words: Sequence[str],
    examples: Sequence[str],
    seed: int,
    *,
    n_examples: int,
    template: str,
    answer_template: str,
    separator: str,
    prepend_separator: bool = False,
) -> list[Prompt]:
    """One prompt per word with seeded example draws."""
    rng = random.Random(seed)
    return [
        build_prompt(
            w,
            examples,
            rng,
            n_examples=n_examples,
            template=template,
            answer_template=answer_template,
            separator=separator,
            prepend_separator=prepend_separator,
        )
        for w in words
    ]


@dataclass(frozen=True)
class BosPolicy:
    """Which token starts every absorption prompt (SAEBench runs its prompts through
    TransformerLens, whose ``to_tokens`` prepends the tokenizer's BOS for every model, using
    EOS as BOS when the tokenizer defines none)."""

    token: str | None
    """The token's text (None: prompts start with their first text token)."""
    token_id: int | None
    """Its id."""
    source: str
    """"bos_token", "eos_token" (the tokenizer has no BOS: TransformerLens's fallback),
    "disabled" (``prepend_bos=False``) or "unavailable" (neither BOS nor EOS exists)."""
    tokenizer_adds_it: bool
    """The tokenizer prepends it by itself (Gemma); otherwise its text is prepended to the
    prompt string before tokenising, as TransformerLens does."""

    def to_dict(self) -> dict:
        return {
            "prepend_bos": self.token_id is not None,
            "bos_token": self.token,
            "bos_token_id": self.token_id,
            "source": self.source,
            "tokenizer_adds_it": self.tokenizer_adds_it,
        }


def resolve_bos(tokenizer, prepend_bos: bool = True) -> BosPolicy:
    """The BOS policy of `tokenizer` (see :class:`BosPolicy`)."""
    adds = _tokenizer_prepends_bos(tokenizer)
    if not prepend_bos:
        return BosPolicy(None, None, "disabled", False)
    for source in ("bos_token", "eos_token"):
        token = getattr(tokenizer, source, None)
        token_id = getattr(tokenizer, f"{source}_id", None)
        if token is not None and token_id is not None:
            return BosPolicy(str(token), int(token_id), source, adds and source == "bos_token")
    return BosPolicy(None, None, "unavailable", False)


def _tokenizer_prepends_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def prompt_token_ids(tokenizer, text: str, bos: BosPolicy) -> tuple[list[int], str]:
    """Token ids of `text` under `bos` and the string they encode (the BOS text + `text` when
    the BOS is prepended by hand), mirroring TransformerLens's ``to_tokens``."""
    if bos.token_id is None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), text
    if bos.tokenizer_adds_it:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"]), text
    full = bos.token + text  # type: ignore[operator]
    return list(tokenizer(full, add_special_tokens=False)["input_ids"]), full


def tokenize_prompt(
    tokenizer, prompt: Prompt, bos: BosPolicy | None = None
) -> tuple[list[int], int]:
    """Token ids of `prompt` (BOS first under `bos`; None = no BOS) and the index of the last
    token of the query word.

    The position comes from the tokenizer's character offsets where it provides them, else
    from the token count of the text up to the word's end; nothing is hard-coded, so any
    template and tokenizer work (with SAEBench's template it is the -6 SAEBench hard-codes).
    """
    bos = bos or BosPolicy(None, None, "disabled", False)
    ids, full = prompt_token_ids(tokenizer, prompt.text, bos)
    word_end = prompt.word_end + (len(full) - len(prompt.text))
    position = _word_position_from_offsets(tokenizer, full, word_end, bos, len(ids))
    if position < 0:
        prefix_ids, _ = prompt_token_ids(tokenizer, prompt.text[: prompt.word_end], bos)
        position = len(prefix_ids) - 1
    if not 0 <= position < len(ids):
        raise ValueError(f"could not locate the word {prompt.word!r} in its prompt's tokens")
    return ids, position


def _word_position_from_offsets(
    tokenizer, full: str, word_end: int, bos: BosPolicy, n_ids: int
) -> int:
    try:
        enc = tokenizer(
            full,
            add_special_tokens=bos.tokenizer_adds_it,
            return_offsets_mapping=True,
        )
    except (NotImplementedError, ValueError, TypeError):
        return -1
    offsets = enc.get("offset_mapping")
    if offsets is None or len(offsets) != n_ids:
        return -1
    position = -1
    for i, (start, end) in enumerate(offsets):
        if end > start and start < word_end:
            position = i
    return position
