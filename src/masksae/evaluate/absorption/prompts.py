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


def tokenize_prompt(
    tokenizer, prompt: Prompt, *, prepend_bos: bool = False
) -> tuple[list[int], int]:
    """Token ids of `prompt` and the index of the last token of the query word.

    The position comes from the tokenizer's character offsets where it provides them, else
    from the token count of the text up to the word's end; nothing is hard-coded, so any
    template and tokenizer work.
    """
    ids, position = _tokenize_with_offsets(tokenizer, prompt)
    if ids is None:
        ids = tokenizer(prompt.text)["input_ids"]
        position = len(tokenizer(prompt.text[: prompt.word_end])["input_ids"]) - 1
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
        position += 1
    if not 0 <= position < len(ids):
        raise ValueError(f"could not locate the word {prompt.word!r} in its prompt's tokens")
    return list(ids), position


def _tokenize_with_offsets(tokenizer, prompt: Prompt) -> tuple[list[int] | None, int]:
    try:
        enc = tokenizer(prompt.text, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None, -1
    offsets = enc.get("offset_mapping")
    if offsets is None:
        return None, -1
    position = -1
    for i, (start, end) in enumerate(offsets):
        if end > start and start < prompt.word_end:
            position = i
    if position < 0:
        return None, -1
    return list(enc["input_ids"]), position
