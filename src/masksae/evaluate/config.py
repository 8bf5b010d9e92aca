"""The settings dataclasses of ``masksae evaluate``, free of torch.

``masksae evaluate`` builds its flags from these fields (``masksae.cli_config``); keeping them
apart from the metric code (which imports torch) keeps ``masksae evaluate --help`` fast. Each
metric module re-exports its config (``masksae.evaluate.core.CoreConfig`` ...); absorption
and probing keep theirs in ``masksae.evaluate.absorption.config`` and
``masksae.evaluate.probing.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masksae.errors import ConfigError

__all__ = [
    "ALL",
    "METRICS",
    "PROBING_METRICS",
    "CooccurrenceConfig",
    "CoreConfig",
    "DownstreamConfig",
    "EvalDataConfig",
    "EvaluateConfig",
]


@dataclass
class CoreConfig:
    """Settings of the core reconstruction metrics."""

    batch_size: int = 4096
    """Tokens per SAE forward (also the batch over which the legacy EV centres tokens)."""
    density_bin_min_log10: float = -8.0
    """Lower edge of the log10 firing-frequency histogram (dead latents are counted apart)."""
    density_bin_width: float = 0.5
    """Width of one histogram bin in log10 units; the upper edge is 0 (always firing)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(f"core batch_size={self.batch_size}: expected >= 2 tokens")
        if self.density_bin_width <= 0 or self.density_bin_min_log10 >= 0:
            raise ConfigError(
                "density histogram needs density_bin_width > 0 and density_bin_min_log10 < 0, "
                f"got {self.density_bin_width} and {self.density_bin_min_log10}"
            )


@dataclass
class EvalDataConfig:
    """How the held-out evaluation activations are made."""

    corpus: str = "bundled"
    """Evaluation text, read with the harvest stage's ``masksae.harvest.Corpus``: "bundled",
    a local .txt/.jsonl/.parquet file or folder, or a Hugging Face dataset id."""
    corpus_field: str = "text"
    """Record field holding the text (jsonl, parquet, Hugging Face datasets)."""
    corpus_filter: tuple[str, ...] = field(default=(), metadata={"cli_split": False})
    """``key=value`` conditions a record must meet (jsonl, parquet, Hugging Face datasets)."""
    corpus_split: str = "train"
    """Dataset split (Hugging Face datasets)."""
    skip_tokens: int | None = None
    """Held-out rule (``masksae.evaluate.texts``). None: finite corpora are read from the end
    backwards, Hugging Face streams skip their first 1M tokens; N: read forward, skipping
    every document that starts within the first N tokens."""
    n_tokens: int = 16384
    """Activations (non-excluded positions) used by the core reconstruction metrics."""
    context_length: int = 128
    """Tokens per evaluation sequence (BOS included where the model needs one)."""
    seed: int = 1234
    """Seed of the masking draws (with masked=True); distinct from training seeds."""
    llm_batch_size: int = 8
    """Sequences per LLM forward while capturing activations."""
    cache_dtype: str = "float32"
    """Dtype the activations are cached in ("float32", "bfloat16", "float16")."""
    masked: bool = False
    """Replace tokens with the mask token at probability mask_prob before the forward."""
    mask_prob: float = 0.3
    """Masking probability when masked=True."""
    mask_token_id: int | None = None
    """Mask token id when masked=True (None: the tokenization of mask_string)."""
    mask_string: str = "..."
    """Mask string (the paper's "...") used when mask_token_id is None."""
    outlier_norm_factor: float = 10.0
    """Positions whose activation norm exceeds this factor x the median norm are not
    evaluated (and not spliced), the harvest's rule for training data; 0 keeps them."""

    def __post_init__(self) -> None:
        if self.n_tokens < 2:
            raise ConfigError(f"--eval-tokens {self.n_tokens}: expected at least 2 tokens")
        if self.context_length < 3:
            raise ConfigError(f"eval context_length {self.context_length}: expected >= 3")
        if self.skip_tokens is not None and self.skip_tokens < 0:
            raise ConfigError(f"eval skip_tokens {self.skip_tokens}: expected >= 0 or None")
        self.corpus_filter = tuple(self.corpus_filter)
        if not 0.0 <= self.mask_prob < 1.0:
            raise ConfigError(f"eval mask_prob {self.mask_prob}: expected 0 <= p < 1")


@dataclass
class DownstreamConfig:
    """Settings of the spliced-reconstruction loss metrics."""

    n_sequences: int = 32
    """Held-out sequences scored (the first ones of the evaluation set)."""
    batch_size: int = 8
    """Sequences per LLM forward pass."""
    clean_cache_mb: int = 1024
    """Memory (MiB) for keeping the clean forward's results between checkpoints of one run
    (on CPU): the residual stream at the SAE's layer (small: later checkpoints run only the
    blocks after it) and the exact float32 log-probs (large: later checkpoints skip the
    clean forward for the batches that fit). 0 disables it. The full distribution is kept
    because exact KL needs it."""

    def __post_init__(self) -> None:
        if self.n_sequences < 1 or self.batch_size < 1:
            raise ConfigError(
                f"downstream n_sequences={self.n_sequences}, batch_size="
                f"{self.batch_size}: expected >= 1"
            )
        if self.clean_cache_mb < 0:
            raise ConfigError(f"downstream clean_cache_mb={self.clean_cache_mb}: expected >= 0")


@dataclass
class CooccurrenceConfig:
    """Settings of the ``cooccurrence`` metric."""

    min_firing_rate: float = 0.005
    """A latent enters the pair statistics when it fires on at least this fraction of the
    evaluation tokens (0.005 of 16k tokens = 82 firings, enough to estimate PMI)."""
    max_latents: int = 2048
    """At most this many of those latents (the most frequent) form the pairs."""
    batch_size: int = 4096
    """Tokens per SAE encode call (the dense [batch, F] code lives only inside a batch)."""
    max_absorbers_per_letter: int = 3
    """Parent-child pairs: the absorbing latents of a letter taken, most frequent first."""
    quantiles: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
    """Quantiles reported for each pair statistic."""

    def __post_init__(self) -> None:
        if not 0.0 < self.min_firing_rate <= 1.0:
            raise ConfigError(
                f"cooccurrence min_firing_rate={self.min_firing_rate}: expected 0 < rate <= 1 "
                "(e.g. 0.005)"
            )
        for name in ("max_latents", "batch_size", "max_absorbers_per_letter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cooccurrence {name}={getattr(self, name)}: expected >= 1")
        if any(not 0.0 <= q <= 1.0 for q in self.quantiles):
            raise ConfigError(f"cooccurrence quantiles={self.quantiles}: expected values in [0, 1]")


PROBING_METRICS = ("sparse_probing", "scr", "tpp", "ood")
"""The probing metrics (masksae.evaluate.probing), each its own result section."""
METRICS = ("core", "reconstruction", "absorption", "cooccurrence", *PROBING_METRICS)
"""core = reconstruction metrics + spliced CE/KL; reconstruction = without the LLM splice;
cooccurrence = latent co-activation on the clean held-out activations (with absorption's
parent-child pairs when absorption runs too); the probing metrics."""
ALL = "all"
"""``--metrics all``: every metric except ``reconstruction`` (which ``core`` contains)."""


@dataclass
class EvaluateConfig:
    """Settings of ``masksae evaluate``."""

    metrics: tuple[str, ...] = ("core",)
    """Metric families to run: core, reconstruction (core without CE/KL), absorption,
    cooccurrence, sparse_probing, scr, tpp, ood; "all" = every one but reconstruction."""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Held-out evaluation activations."""
    core: CoreConfig = field(default_factory=CoreConfig)
    """Reconstruction metric settings."""
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    """Spliced CE / KL settings."""
    absorption: Any = None
    """An ``AbsorptionConfig`` (None: its defaults, i.e. SAEBench's whole vocabulary; the CLI
    caps it with ``--absorption-max-words``, default the "demo" preset)."""
    cooccurrence: CooccurrenceConfig = field(default_factory=CooccurrenceConfig)
    """Latent co-occurrence settings."""
    cache_dir: Path | None = None
    """Directory of reusable LLM activations (None: nothing cached across runs)."""
    device: str = "auto"
    """Device of the LLM and the SAE."""
    llm_dtype: str = "float32"
    """Dtype the LLM is loaded in."""
    eval_masked: bool = False
    """Also report core metrics on masked activations (metrics["core_masked"])."""
    eval_store: str | Path | None = None
    """Activation store (directory or URL such as s3://bucket/prefix) to take the
    reconstruction activations from instead of the corpus."""
    storage_options: dict | None = None
    """Options of a remote eval store's filesystem (CLI: --storage-option KEY=VALUE)."""
    model_override: str | None = None
    """Load this model spec instead of the one in the checkpoint provenance (same weights
    at another path, e.g. offline)."""
    probing: Any = None
    """A ``ProbingConfig`` for sparse_probing, scr, tpp and ood (None: the "demo" preset)."""
    progress: bool = True
    """Progress bars (tqdm on stderr, with rate and ETA) on every LLM pass and metric."""
    overwrite: bool = False
    """Recompute checkpoints whose result file already exists with the same recorded
    settings (default: skip them; a result with other settings is always recomputed)."""

    def __post_init__(self) -> None:
        if ALL in self.metrics:
            rest = [m for m in METRICS if m != "reconstruction"]
            self.metrics = tuple(dict.fromkeys([*rest, *(m for m in self.metrics if m != ALL)]))
        if not self.metrics:
            raise ConfigError(
                f"--metrics names no metric: give a comma list from {', '.join(METRICS)} or {ALL}"
            )
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ConfigError(
                f"unknown metric(s) {unknown}: choose from {', '.join(METRICS)} or {ALL}"
            )
