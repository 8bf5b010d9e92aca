"""HarvestConfig: every setting of one harvest run (CLI options map 1:1 onto fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from masksae.harvest.corruption import (
    DEFAULT_NOISE_CALIBRATION_SEQUENCES,
    DEFAULT_UNIGRAM_TOKENS,
)
from masksae.harvest.masking import DEFAULT_MASK_STRING
from masksae.harvest.outliers import DEFAULT_OUTLIER_NORM_FACTOR

DEFAULT_CHUNK_TOKENS = 32768
"""Target tokens per chunk when ``chunk_sequences`` is not given."""


@dataclass
class HarvestConfig:
    """One harvest: (model, layer, corpus, mask p, seed) -> an activation store at ``out``."""

    out: str = ""
    """Store to create, or to resume when it holds a store of identical settings: a local
    directory or an fsspec URL (s3://bucket/prefix, gs://..., hf://..., file://...)."""
    storage_options: dict = field(default_factory=dict)
    """Options of the store's filesystem (CLI: --storage-option KEY=VALUE), e.g.
    {"endpoint_url": "http://127.0.0.1:9000"}; credentials otherwise come the standard way
    (AWS_* environment variables, AWS_ENDPOINT_URL included)."""
    break_lock: bool = False
    """Remove the writer lease of a remote store left by a dead writer before starting
    (a live writer's lease is renewed; an expired one is taken over without this)."""
    model: str = "bundled:smollm2-135m"
    """Hugging Face id, local directory, or bundled:smollm2-135m / bundled:gemma3-270m."""
    revision: str | None = None
    """Hugging Face Hub models: the model revision (commit sha, tag or branch) to load; the
    store records the commit it resolved to. None = the Hub's default branch."""
    layer: int | None = None
    """Block whose output (resid_post) is captured, 0-based; None = the middle block."""
    corpus: str = "bundled"
    """"bundled", a local .txt/.jsonl/.parquet file or folder, or a Hugging Face dataset id."""
    corpus_field: str = "text"
    """Text field of jsonl/parquet records and Hugging Face datasets."""
    corpus_filter: tuple[str, ...] = field(default_factory=tuple, metadata={"cli_split": False})
    """key=value conditions on records, e.g. meta.pile_set_name=Pile-CC (CLI: repeat the
    flag, one condition each)."""
    corpus_split: str = "train"
    """Hugging Face dataset split."""
    dataset_revision: str | None = None
    """Hugging Face dataset corpora: the dataset revision (commit sha, tag or branch) to
    stream, recorded in the store's provenance; None = the default branch (not
    reproducible: the dataset may change)."""
    dataset_config: str | None = None
    """Hugging Face dataset corpora: the dataset configuration name (load_dataset's
    ``name``), e.g. ``wikitext-103-raw-v1``; recorded in the provenance."""
    corpus_allow_undecodable: bool = False
    """Harvest local .txt files that are mostly not UTF-8 text (binary-looking) anyway, their
    undecodable bytes replaced by U+FFFD; False refuses them."""
    tokens: int = 100_000
    """Tokens to harvest (rounded up to whole sequences)."""
    mask_prob: float = 0.3
    """Probability p that a token is replaced by the mask token (0 <= p < 1); the corruption
    rate of every ``corruption`` kind (they all corrupt the positions masking would)."""
    mask_string: str = DEFAULT_MASK_STRING
    """Mask string; must encode to exactly one token."""
    mask_token_id: int | None = None
    """Mask token id overriding mask_string (an ordinary token, not a special one)."""
    mask_token_role: str | None = None
    """Use the tokenizer's own ``unk`` or ``pad`` token as the mask (a special token, allowed
    here on purpose); overrides mask_string and mask_token_id."""
    corruption: str = "mask"
    """What happens at the drawn positions: ``mask`` (the mask token, the paper's method),
    ``random_uniform`` / ``random_unigram`` (a random ordinary token, uniform or by the
    corpus's unigram frequencies), ``delete`` (the token is removed and the sequence
    shortens), or ``noise`` (clean text; Gaussian noise added to the activations, its scale
    matched to masking at mask_prob). See masksae.harvest.corruption."""
    unigram_tokens: int = DEFAULT_UNIGRAM_TOKENS
    """random_unigram: the frequencies are counted over the harvest's first packed sequences
    holding this many tokens (special tokens not counted)."""
    noise_sigma: float | None = None
    """noise: per-dimension standard deviation; None calibrates it so the noise's mean squared
    shift equals masking's at mask_prob (measured on noise_calibration_sequences)."""
    noise_calibration_sequences: int = DEFAULT_NOISE_CALIBRATION_SEQUENCES
    """noise: the harvest's first sequences on which masking's activation shift is measured."""
    context_length: int | None = None
    """Tokens per sequence; None = 128 for bundled models, else min(1024, model maximum)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    dtype: str = "float32"
    """Model dtype: float32 / bfloat16 / float16."""
    store_dtype: str | None = None
    """Activation dtype at rest; None = the model dtype."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:N."""
    seed: int = 0
    """Seed of the mask draws (a pure function of seed and sequence index)."""
    chunk_sequences: int | None = None
    """Sequences per store chunk (the unit of writing and resume); None = about 32K tokens,
    a multiple of batch_size."""
    compression: str | None = None
    """Activation compression (see masksae.storage.codecs); None = the storage default."""
    outlier_norm_factor: float = DEFAULT_OUTLIER_NORM_FACTOR
    """Flag as excluded the tokens whose activation norm exceeds this factor x the median norm
    of their chunk's non-special, non-position-0 tokens (attention-sink-like outliers); 0 = off."""
    devices: tuple[str, ...] = field(default_factory=tuple)
    """Several devices (e.g. cuda:0, cuda:1) on this machine: one rank per device is spawned
    in a local process group, exactly as ``torchrun --nproc-per-node N`` would start them
    (see masksae.harvest.parallel); empty = ``device``."""
