"""CLI command of this stage: ``masksae harvest`` (registered by masksae.cli)."""

from __future__ import annotations

import typer

from masksae.cli_utils import user_errors


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
    app.command(name="harvest")(harvest)


@user_errors
def harvest(
    out: str = typer.Option(
        ...,
        "--out",
        help="Store directory or URL (s3://bucket/prefix, gs://..., hf://..., file://...): "
        "created, or resumed when it holds a store made with identical settings.",
    ),
    model: str = typer.Option(
        "bundled:smollm2-135m",
        "--model",
        help="Hugging Face id, local directory, or bundled:smollm2-135m / bundled:gemma3-270m.",
    ),
    revision: str | None = typer.Option(
        None,
        "--revision",
        help="Hub models: model revision (commit sha, tag or branch); the store records the "
        "commit it resolved to. Default: the Hub's default branch.",
    ),
    layer: int | None = typer.Option(
        None, "--layer", help="Block whose output is captured (0-based); default the middle block."
    ),
    corpus: str = typer.Option(
        "bundled",
        "--corpus",
        help="bundled, a local .txt/.jsonl/.parquet file or folder, or a Hugging Face dataset id.",
    ),
    corpus_field: str = typer.Option("text", "--corpus-field", help="Text field of records."),
    corpus_filter: list[str] = typer.Option(
        [],
        "--corpus-filter",
        help="key=value record filter (repeatable), e.g. meta.pile_set_name=Pile-CC.",
    ),
    corpus_split: str = typer.Option("train", "--corpus-split", help="Dataset split."),
    dataset_revision: str | None = typer.Option(
        None,
        "--dataset-revision",
        help="Hub dataset corpora: dataset revision (commit sha, tag or branch) to stream, "
        "recorded in the store's provenance. Default: the default branch (not reproducible).",
    ),
    dataset_config: str | None = typer.Option(
        None,
        "--dataset-config",
        help="Hub dataset corpora: dataset configuration name (load_dataset's name=), e.g. "
        "wikitext-103-raw-v1.",
    ),
    corpus_allow_undecodable: bool = typer.Option(
        False,
        "--corpus-allow-undecodable",
        help="Harvest local .txt files that are mostly not UTF-8 text anyway (undecodable "
        "bytes become U+FFFD); by default such files are refused.",
    ),
    tokens: int = typer.Option(
        100_000, "--tokens", help="Tokens to harvest (rounded up to whole sequences)."
    ),
    mask_prob: float = typer.Option(
        0.3,
        "--mask-prob",
        help="Masking probability p, 0 <= p < 1 (the rate of every --corruption).",
    ),
    mask_string: str = typer.Option(
        "...", "--mask-string", help="Mask string (must be one token)."
    ),
    mask_token_id: int | None = typer.Option(
        None, "--mask-token-id", help="Mask token id (overrides --mask-string)."
    ),
    mask_token_role: str | None = typer.Option(
        None,
        "--mask-token-role",
        help="unk or pad: mask with the tokenizer's own unk/pad token (a special token; "
        "overrides --mask-string and --mask-token-id).",
    ),
    corruption: str = typer.Option(
        "mask",
        "--corruption",
        help="What happens at the drawn positions: mask (the mask token), random_uniform or "
        "random_unigram (a random token), delete (removed; the sequence shortens), noise (clean "
        "text, Gaussian noise on the activations matched to masking's shift at --mask-prob).",
    ),
    unigram_tokens: int = typer.Option(
        1_000_000,
        "--unigram-tokens",
        help="random_unigram: frequencies counted over the harvest's first N tokens.",
    ),
    noise_sigma: float | None = typer.Option(
        None,
        "--noise-sigma",
        help="noise: per-dimension standard deviation; default calibrated to masking's mean "
        "squared activation shift at --mask-prob.",
    ),
    noise_calibration_sequences: int = typer.Option(
        64,
        "--noise-calibration-sequences",
        help="noise: sequences (the harvest's first) the calibration measures masking on.",
    ),
    context_length: int | None = typer.Option(
        None,
        "--context-length",
        help="Tokens per sequence; default 128 for bundled models, else min(1024, model maximum).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32/bfloat16/float16."),
    store_dtype: str | None = typer.Option(
        None, "--store-dtype", help="Activation dtype at rest; default the model dtype."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    devices: str | None = typer.Option(
        None,
        "--devices",
        help="Comma-separated devices for a multi-device harvest on this machine, e.g. "
        "cuda:0,cuda:1 (or cpu,cpu): one rank per device in a local process group, as "
        "torchrun --nproc-per-node N would start them; rank 0 holds the store lock and "
        "finalises. The store equals a single-device run. Overrides --device. For several "
        "nodes use torchrun/accelerate launch -m masksae harvest ... instead.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the mask draws."),
    chunk_sequences: int | None = typer.Option(
        None,
        "--chunk-sequences",
        help="Sequences per store chunk (unit of resume); default about 32K tokens.",
    ),
    compression: str | None = typer.Option(
        None,
        "--compression",
        help="Activation compression, e.g. none, zstd:1, "
        "blosc-lz4-shuffle; default the storage default.",
    ),
    outlier_norm_factor: float = typer.Option(
        10.0,
        "--outlier-norm-factor",
        help="Also flag as excluded (stored, skipped by the reader and the statistics) tokens "
        "whose activation norm exceeds this factor x the median norm of their chunk's "
        "non-special, non-position-0 tokens (attention-sink-like outliers); 0 disables.",
    ),
    storage_option: list[str] = typer.Option(
        [],
        "--storage-option",
        help="Option of the store's filesystem, KEY=VALUE (repeatable), e.g. "
        "endpoint_url=http://127.0.0.1:9000; credentials otherwise come from AWS_* variables "
        "(AWS_ENDPOINT_URL included), ~/.aws, gcloud or HF_TOKEN.",
    ),
    break_lock: bool = typer.Option(
        False,
        "--break-lock",
        help="Remove the writer lease of a remote store left by a dead writer (one whose "
        "lease has not expired yet) before starting.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run the LLM on a masked corpus and cache the residual stream after block --layer.

    --corruption chooses a control instead of masking (random tokens, deletion, noise).

    Special tokens, position 0 and norm outliers (--outlier-norm-factor) are flagged excluded.

    --devices cuda:0,cuda:1 splits the chunks over one rank per device; several nodes:
    torchrun --nnodes M --nproc-per-node N -m masksae harvest ... (or accelerate launch).

    Rerunning the same command resumes an interrupted harvest.
    """
    from masksae.harvest.config import HarvestConfig
    from masksae.harvest.parallel import parse_devices
    from masksae.harvest.runner import run_harvest
    from masksae.storage.location import parse_storage_options

    cfg = HarvestConfig(
        out=out,
        storage_options=parse_storage_options(storage_option),
        break_lock=break_lock,
        model=model,
        revision=revision,
        layer=layer,
        corpus=corpus,
        corpus_field=corpus_field,
        corpus_filter=tuple(corpus_filter),
        corpus_split=corpus_split,
        dataset_revision=dataset_revision,
        dataset_config=dataset_config,
        corpus_allow_undecodable=corpus_allow_undecodable,
        tokens=tokens,
        mask_prob=mask_prob,
        mask_string=mask_string,
        mask_token_id=mask_token_id,
        mask_token_role=mask_token_role,
        corruption=corruption,
        unigram_tokens=unigram_tokens,
        noise_sigma=noise_sigma,
        noise_calibration_sequences=noise_calibration_sequences,
        context_length=context_length,
        batch_size=batch_size,
        dtype=dtype,
        store_dtype=store_dtype,
        device=device,
        seed=seed,
        chunk_sequences=chunk_sequences,
        compression=compression,
        outlier_norm_factor=outlier_norm_factor,
        devices=parse_devices(devices) if devices is not None else (),
    )
    run_harvest(cfg, progress=progress)  # logs its own one-line summary
