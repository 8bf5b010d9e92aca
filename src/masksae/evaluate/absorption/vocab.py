"""The alphabetic vocabulary of a tokenizer and its seeded train/test split."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def is_alpha_word(text: str, *, allow_leading_space: bool = True) -> bool:
    """True when `text` is only ASCII letters, optionally after one leading space."""
    if allow_leading_space and text.startswith(" "):
        text = text[1:]
    return len(text) > 0 and text.isascii() and text.isalpha()


def first_letter_index(word: str) -> int:
    """Index 0..25 of the first letter of `word` (leading space ignored)."""
    stripped = word.strip()
    if not stripped or stripped[0].lower() not in LETTERS:
        raise ValueError(f"word {word!r} does not start with an ASCII letter")
    return LETTERS.index(stripped[0].lower())


def alpha_vocab(tokenizer, *, allow_leading_space: bool = True) -> list[str]:
    """Decoded vocabulary entries made only of letters, with an optional leading space.

    Each id is decoded on its own, which turns the tokenizer's space marker ("Ġ", "▁") into a
    plain space; special tokens are skipped. Order follows token id; duplicates are dropped.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words: list[str] = []
    seen: set[str] = set()
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if text not in seen and is_alpha_word(text, allow_leading_space=allow_leading_space):
            seen.add(text)
            words.append(text)
    return words


def cap_per_letter(words: Sequence[str], max_per_letter: int | None, seed: int) -> list[str]:
    """A seeded sample of at most `max_per_letter` words per first letter (order kept)."""
    if max_per_letter is None:
        return list(words)
    by_letter: dict[int, list[int]] = defaultdict(list)
    for i, word in enumerate(words):
        by_letter[first_letter_index(word)].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for letter in sorted(by_letter):
        indices = by_letter[letter]
        keep.update(
            indices if len(indices) <= max_per_letter else rng.sample(indices, max_per_letter)
        )
    return [w for i, w in enumerate(words) if i in keep]


def split_vocab(
    words: Sequence[str], train_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded shuffle, then the first `train_fraction` is train and the rest test."""
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n_train = int(len(shuffled) * train_fraction)
    return shuffled[:n_train], shuffled[n_train:]
