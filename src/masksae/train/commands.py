"""CLI commands of the train stage: ``masksae train`` and ``masksae export``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import typer

from masksae.cli_utils import check_output_dir, user_errors

_SAE_FLAGS = ("architecture", "k", "d_sae")
#: architectures whose sparsity is set by ``k``
_TOPK_FAMILY = ("topk", "batch_topk", "matryoshka_batch_topk")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
    app.command("train")(train_command)
    app.command("export")(export_command)


@user_errors
def train_command(
    store: str = typer.Option(
        ...,
        "--store",
        help="Activation store (masksae harvest --out): a directory or a URL such as "
        "s3://bucket/prefix (read through a local chunk cache, see --cache-dir).",
    ),
    out: Path = typer.Option(..., "--out", help="Output folder: one sub-folder per SAE."),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="Sweep TOML with train, sae and grid tables. Without it the flags below define one SAE.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run held in --out (same config)."
    ),
    architecture: str | None = typer.Option(
        None, help="SAE architecture (single-SAE mode; default matryoshka_batch_topk)."
    ),
    k: int | None = typer.Option(None, help="Active latents per token (TopK family; default 40)."),
    d_sae: int | None = typer.Option(None, "--d-sae", help="Dictionary size (default 4096)."),
    lr: float | None = typer.Option(None, help="Peak lr (default 2e-4 / sqrt(d_sae / 16384))."),
    steps: int | None = typer.Option(
        None, help="Training steps (default: one pass over the store)."
    ),
    tokens: int | None = typer.Option(None, help="Training tokens (instead of --steps)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Activations per step (default 2048)."
    ),
    seed: int | None = typer.Option(None, help="SAE init seed (default 0)."),
    device: str | None = typer.Option(
        None, help="auto | cpu | cuda | cuda:N: where every SAE trains."
    ),
    devices: str | None = typer.Option(
        None,
        "--devices",
        help="Spread a sweep over several devices of this machine, e.g. cuda:0,cuda:1: one "
        "rank per device in a local process group, as torchrun --nproc-per-node N would "
        "start them (see --distributed). Instead of --device.",
    ),
    distributed: str | None = typer.Option(
        None,
        "--distributed",
        help="How ranks (torchrun, accelerate launch, --devices) share the sweep: runs (rank r "
        "trains runs i with i % world == r), data (each run data-parallel with DDP), or "
        "auto (data for a single run, else runs; default).",
    ),
    storage_option: list[str] = typer.Option(
        [],
        "--storage-option",
        help="Option of a remote store's filesystem, KEY=VALUE (repeatable).",
    ),
    cache_dir: str | None = typer.Option(
        None,
        "--cache-dir",
        help="Local chunk cache of a remote store (default $MASKSAE_CACHE/store-cache).",
    ),
    cache_size: str | None = typer.Option(
        None, "--cache-size", help="Size limit of the chunk cache, e.g. 20GiB (the default)."
    ),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: torch's)."),
    normalize: bool | None = typer.Option(
        None,
        "--normalize/--no-normalize",
        help="Scale activations so E||x||^2 = d_model (folded back at save).",
    ),
    autocast_bf16: bool | None = typer.Option(
        None, "--bf16/--no-bf16", help="bf16 autocast for the SAE forward."
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="Steps between resumable checkpoints."
    ),
    log_every: int | None = typer.Option(
        None, "--log-every", help="Steps between metrics records."
    ),
    verify: bool = typer.Option(
        False, "--verify", help="Check every chunk checksum of the store first."
    ),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Progress bars on stderr."
    ),
) -> None:
    """Train one SAE or a sweep of SAEs (one pass over the store for all of them).

    Ctrl-C finishes the current step, writes a checkpoint of it and stops.

    A second Ctrl-C stops at once. Rerun the same command with --resume to continue.
    """
    from masksae.errors import ConfigError
    from masksae.storage.location import parse_storage_options
    from masksae.train.config import SweepConfig, TrainConfig, load_sweep
    from masksae.train.sweep import single_run, train_sweep

    train_overrides: dict[str, Any] = {
        "distributed": distributed,
        "storage_options": parse_storage_options(storage_option) or None,
        "cache_dir": cache_dir,
        "cache_size": cache_size,
        "steps": steps,
        "tokens": tokens,
        "batch_size": batch_size,
        "device": device,
        "devices": _split_devices(devices),
        "threads": threads,
        "normalize_activations": normalize,
        "autocast_bf16": autocast_bf16,
        "checkpoint_every": checkpoint_every,
        "log_every": log_every,
    }
    train_overrides = {key: v for key, v in train_overrides.items() if v is not None}
    if steps is not None and tokens is not None:
        raise ConfigError(
            f"--steps {steps} and --tokens {tokens} cannot be combined: give one of them"
        )
    # a flag replaces the training length of a --config file, whichever way it was given
    if steps is not None:
        train_overrides["tokens"] = None
    elif tokens is not None:
        train_overrides["steps"] = None
    check_output_dir(out, "--out")
    if devices is not None:
        if device is not None:
            raise ConfigError("--device and --devices cannot be combined: pass one of them")
        train_overrides["device"] = "auto"  # --devices replaces a config file's device
    if config is not None:
        given = [
            f"--{n.replace('_', '-')}"
            for n, v in (
                ("architecture", architecture),
                ("k", k),
                ("d_sae", d_sae),
                ("lr", lr),
                ("seed", seed),
            )
            if v is not None
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} cannot be combined with --config: set them "
                f"in the [sae]/[grid] tables of {config}"
            )
        sweep = load_sweep(config)
        sweep = dataclasses.replace(
            sweep, train=dataclasses.replace(sweep.train, **train_overrides)
        )
        runs = None
    else:
        from masksae.train.sae import ARCHITECTURES

        arch = architecture or "matryoshka_batch_topk"
        if arch not in ARCHITECTURES:  # before any flag that depends on it
            raise ConfigError(
                f"--architecture {arch!r} is unknown: expected one of {', '.join(ARCHITECTURES)}"
            )
        for flag, value in (("--d-sae", d_sae), ("--k", k)):
            if value is not None and value < 1:
                raise ConfigError(
                    f"{flag} {value} is invalid: expected a positive integer "
                    f"(e.g. {flag} {4096 if flag == '--d-sae' else 40})"
                )
        if k is not None and arch not in _TOPK_FAMILY:
            raise ConfigError(
                f"--k {k} does not apply to --architecture {arch} (k is the sparsity of "
                f"{', '.join(_TOPK_FAMILY)}): drop --k"
            )
        sae: dict[str, Any] = {"architecture": arch, "d_sae": 4096 if d_sae is None else d_sae}
        if k is not None:
            sae["k"] = k
        elif arch in _TOPK_FAMILY:
            sae["k"] = 40
        train_cfg = TrainConfig(
            **train_overrides,
            **({"lr": lr} if lr is not None else {}),
            **({"seed": seed} if seed is not None else {}),
        )
        sweep = SweepConfig(train=train_cfg, sae=sae)
        runs = [single_run(sae, lr=None, seed=train_cfg.seed)]
    try:
        summary = train_sweep(
            store, sweep, out, resume=resume, progress=progress, verify=verify, runs=runs
        )
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: training progress is checkpointed in {out}; rerun the same "
            "command with --resume to continue",
            err=True,
        )
        raise typer.Exit(code=130) from None
    from masksae.distributed import launched_world

    if launched_world() > 1 and os.environ.get("RANK", "0") != "0":
        return  # rank 0 prints the sweep's summary
    for run in summary.runs:
        m = run.last_metrics
        typer.echo(
            f"{run.path}  step {run.step}  fvu {m.get('fvu', float('nan')):.4f}  "
            f"l0 {m.get('l0', float('nan')):.1f}  dead {m.get('dead_frac', float('nan')):.3f}"
        )
    typer.echo(f"data wait: {100 * summary.data_wait_frac:.1f}% of step time")


def _split_devices(value: str | None) -> list[str] | None:
    """``"cuda:0, cuda:1"`` -> ``["cuda:0", "cuda:1"]`` (None stays None)."""
    if value is None:
        return None
    from masksae.errors import ConfigError

    names = [part.strip() for part in value.split(",")]
    if not all(names):
        raise ConfigError(
            f"--devices {value!r}: expected comma-separated device names, e.g. cuda:0,cuda:1"
        )
    return names


@user_errors
def export_command(
    run_dir: Path = typer.Argument(..., help="A run folder written by masksae train (OUT/<run>)."),
    fmt: str = typer.Option(..., "--format", help="saelens | dictionary_learning"),
    out: Path = typer.Option(..., "--out", help="Folder to write the exported SAE into."),
) -> None:
    """Export a trained SAE to the SAELens or dictionary_learning format."""
    from masksae.train.export import export

    check_output_dir(out, "--out")
    path = export(run_dir, fmt, out)
    typer.echo(str(path))
