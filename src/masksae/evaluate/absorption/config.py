"""Configuration of the first-letter feature-absorption metric (SAEBench defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from masksae.errors import ConfigError

VOCAB_PRESETS: dict[str, int | None] = {
    "demo": 100,
    "study": 400,
    "all": None,
}
"""Named vocabulary caps (``max_words_per_letter``), chosen by measuring the score's standard
error against the LLM cost on the bundled SmolLM2-135M layer 15 (docs/bench/absorption-vocab.md):
"demo" fits `make demo`'s 10-minute budget on 2 cores; "study" resolves masked-vs-unmasked
differences of a few points for an offline CPU study; "all" is SAEBench's whole vocabulary."""


def parse_max_words(value: str | int | None) -> int | None:
    """``max_words_per_letter`` from a CLI value: a preset name of :data:`VOCAB_PRESETS`, a
    number of words per letter, or 0 / "all" for the whole vocabulary."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in VOCAB_PRESETS:
        return VOCAB_PRESETS[text]
    try:
        words = int(text)
    except ValueError:
        words = -1
    if words == 0:
        return None
    if words < 2:
        raise ConfigError(
            f"--absorption-max-words {value!r}: expected a preset "
            f"({', '.join(VOCAB_PRESETS)}), 0 for the whole vocabulary, or a number >= 2"
        )
    return words


@dataclass
class AbsorptionConfig:
    """Settings of :func:`masksae.evaluate.absorption.run`.

    Defaults follow SAEBench ``evals/absorption`` (eval_config.py and the constants in its
    feature_absorption / k_sparse_probing / probing modules) except ``max_words_per_letter``,
    which SAEBench does not have (it uses the whole alphabetic vocabulary).
    :data:`VOCAB_PRESETS` holds the measured caps for the demo and the CPU study.
    """

    seed: int = 42
    """Seed of the vocabulary cap and split, the in-context example draws and probe training."""

    max_words_per_letter: int | None = None
    """Keep at most this many vocabulary words per first letter (seeded sample); None keeps
    all (SAEBench). A 49k-token vocabulary gives ~47k prompts, so cap it on CPU (e.g. 100)."""

    train_fraction: float = 0.8
    """Fraction of the vocabulary used to train the probes; the rest is the test split."""

    n_icl_examples: int = 10
    """In-context examples ("word has the first letter: W") before the query word."""

    prompt_template: str = "{word} has the first letter:"
    """Query template; must contain "{word}". The activation is read at the word's last token."""

    answer_template: str = " {letter}"
    """Answer appended to each in-context example; "{letter}" is the upper-case first letter."""

    example_separator: str = "\n"
    """Separator between in-context examples and before the query; every prompt (probe and
    absorption prompts alike) also starts with it, as in SAEBench."""

    prepend_bos: bool = True
    """Start every prompt with the tokenizer's BOS token (its EOS where it has no BOS), as
    SAEBench does through TransformerLens for every model; recorded in the result's
    ``settings.bos``. False only to reproduce runs made without it."""

    llm_batch_size: int = 32
    """Prompts per LLM forward pass."""

    sae_batch_size: int = 4096
    """Activations per SAE encode call."""

    probe_epochs: int = 50
    """Epochs of the ground-truth (LLM activation) letter probe."""

    probe_batch_size: int = 64
    """Minibatch size of the ground-truth probe."""

    probe_lr: float = 1e-2
    """Initial Adam learning rate of the ground-truth probe (decays exponentially)."""

    probe_end_lr: float = 1e-5
    """Learning rate reached after the last epoch (both probe kinds)."""

    probe_weight_decay: float = 1e-4
    """Adam weight decay of the ground-truth probe."""

    k_sparse_l1_decay: float = 0.01
    """L1 penalty of the latent-selection probe on SAE latents."""

    k_sparse_epochs: int = 50
    """Epochs of the L1 latent-selection probe."""

    k_sparse_batch_size: int = 4096
    """Minibatch size of the L1 latent-selection probe."""

    k_sparse_lr: float = 1e-2
    """Initial Adam learning rate of the L1 latent-selection probe."""

    k_sparse_l2_decay: float = 1e-6
    """Adam weight decay of the L1 latent-selection probe."""

    max_k: int = 10
    """Largest k of the k-sparse probes (k = 1..max_k)."""

    f1_jump_threshold: float = 0.03
    """Grow the main-latent set from k-1 to k only while F1 rises by more than this."""

    min_probe_f1: float = 0.6
    """A letter is eligible when its ground-truth probe's test F1 is strictly above this."""

    min_eligible_letters: int = 20
    """SAEBench's ``min_feats_for_eval``: with fewer eligible letters the headline score is
    null (a warning says so); the mean over the letters available is still reported under
    ``all_eligible_letters``."""

    full_absorption_cos_threshold: float = 0.025
    """Full absorption: the top-projecting latent's cos(probe, W_dec) must be >= this."""

    fraction_cos_threshold: float = 0.1
    """Fractional absorption: candidate absorbing latents need cos(probe, W_dec) >= this."""

    projection_ratio_threshold: float = 0.4
    """Absorbing latent(s) projection / (x . p_hat) must be >= this (both scores)."""

    max_absorbing_latents: int = 3
    """Fractional absorption: at most this many latents may share the absorbed projection."""

    inactive_eps: float = 1e-8
    """A main latent counts as inactive when |activation| < this."""

    device: str = "auto"
    """Device for probe training ("auto", "cpu", "cuda", ...). The LLM and the SAE run
    where they already are."""

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        if "{word}" not in self.prompt_template:
            raise ConfigError(
                f"absorption prompt_template {self.prompt_template!r} has no '{{word}}' "
                "placeholder; add one (default: '{word} has the first letter:')"
            )
        if "{letter}" not in self.answer_template:
            raise ConfigError(
                f"absorption answer_template {self.answer_template!r} has no '{{letter}}' "
                "placeholder; add one (default: ' {letter}')"
            )
        if not 0.0 < self.train_fraction < 1.0:
            raise ConfigError(
                f"absorption train_fraction={self.train_fraction}; expected 0 < value < 1"
            )
        positive = {
            "n_icl_examples": self.n_icl_examples + 1,  # 0 is allowed
            "llm_batch_size": self.llm_batch_size,
            "sae_batch_size": self.sae_batch_size,
            "probe_epochs": self.probe_epochs,
            "probe_batch_size": self.probe_batch_size,
            "k_sparse_epochs": self.k_sparse_epochs,
            "k_sparse_batch_size": self.k_sparse_batch_size,
            "max_k": self.max_k,
            "max_absorbing_latents": self.max_absorbing_latents,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"absorption {name}={getattr(self, name)}; expected >= 1")
        if self.min_eligible_letters < 1:
            raise ConfigError(
                f"absorption min_eligible_letters={self.min_eligible_letters}; expected >= 1"
            )
        if self.max_words_per_letter is not None and self.max_words_per_letter < 2:
            raise ConfigError(
                f"absorption max_words_per_letter={self.max_words_per_letter}; expected None "
                "(all words) or >= 2"
            )
