"""CLI commands of the train stage: ``masksae train`` and ``masksae export``.

``train``'s flags are generated from the sweep file's tables (masksae.cli_config):
``--train.*`` from :class:`masksae.train.config.TrainConfig`, ``--sae.*`` from the SAE
config dataclasses of every architecture; ``--config`` takes a sweep TOML ([train], [sae],
[grid]) and flags override it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import typer

from masksae.cli_utils import check_output_dir, user_errors

log = logging.getLogger(__name__)

#: architectures whose sparsity is set by ``k``
_TOPK_FAMILY = ("topk", "batch_topk", "matryoshka_batch_topk")
#: the SAE of ``masksae train`` without a [sae] table
DEFAULT_SAE = {"architecture": "matryoshka_batch_topk", "d_sae": 4096}
DEFAULT_K = 40
"""k of a TopK-family SAE when neither the file nor a flag sets it."""
#: older (and shorter) flag names kept working
ALIASES: dict[str, tuple[str, ...]] = {
    "train.steps": ("--steps",),
    "train.tokens": ("--tokens",),
    "train.batch_size": ("--batch-size",),
    "train.lr": ("--lr",),
    "train.seed": ("--seed",),
    "train.device": ("--device",),
    "train.devices": ("--devices",),
    "train.distributed": ("--distributed",),
    "train.storage_options": ("--storage-option",),
    "train.cache_dir": ("--cache-dir",),
    "train.cache_size": ("--cache-size",),
    "train.threads": ("--threads",),
    "train.normalize_activations": ("--normalize/--no-normalize",),
    "train.autocast_bf16": ("--bf16/--no-bf16",),
    "train.checkpoint_every": ("--checkpoint-every",),
    "train.log_every": ("--log-every",),
    "sae.architecture": ("--architecture",),
    "sae.k": ("--k",),
    "sae.d_sae": ("--d-sae",),
}
HELP = """Train one SAE or a sweep of SAEs on an activation store (one pass for all of them).

Without --config the flags define one SAE (matryoshka_batch_topk, d_sae 4096, k 40 unless
set). A --config sweep TOML has [train], [sae] and [grid] tables; every flag below is a key
of those tables (--train.warmup-steps is warmup_steps in [train]) and overrides the file;
a --sae.X or --lr/--seed flag replaces a [grid] list of the same key. Recipe steps left
unset (warmup, threshold start, dead-latent window) are scaled down for short runs.

Ctrl-C finishes the current step, writes a checkpoint of it and stops; a second Ctrl-C
stops at once. Rerun the same command with --resume to continue.
"""


def register(app: typer.Typer) -> None:
    """Add ``export``; ``train`` is built lazily (masksae.cli.LAZY_COMMANDS)."""
    app.command("export")(export_command)


def sae_fields() -> dict[str, tuple[Any, Any, str, list[str]]]:
    """Every SAE config field but d_in, over all architectures: name -> (type, default,
    help, architectures having it)."""
    import dataclasses
    import typing

    from masksae.config import field_docs
    from masksae.train.sae_config import ARCHITECTURES, config_class

    out: dict[str, tuple[Any, Any, str, list[str]]] = {}
    for arch in ARCHITECTURES:
        cls = config_class(arch)
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name == "d_in":
                continue
            if f.name in out:
                out[f.name][3].append(arch)
                continue
            default = None if f.default is dataclasses.MISSING else f.default
            out[f.name] = (hints[f.name], default, docs.get(f.name, ""), [arch])
    return out


def _sae_parameters() -> list[Any]:
    from masksae.cli_config import field_parameter
    from masksae.train.sae_config import ARCHITECTURES

    fields = sae_fields()
    params = []
    for name, (annotation, default, doc, archs) in fields.items():
        if name == "architecture":
            default, doc = DEFAULT_SAE["architecture"], f"One of {', '.join(ARCHITECTURES)}."
        elif name == "d_sae":
            default = DEFAULT_SAE["d_sae"]
        elif name == "k":
            default = DEFAULT_K
        if len(archs) < len(ARCHITECTURES) and name != "architecture":
            doc = f"{doc} ({', '.join(archs)})"
        path = ("sae", name)
        params.append(
            field_parameter(path, annotation, default, doc, ALIASES.get(f"sae.{name}", ()))
        )
    return params


def train_command() -> Any:
    """The ``masksae train`` command, its flags generated from the sweep's configs."""
    from masksae.cli_config import build_command, common_options, dataclass_parameters, own_option
    from masksae.train.config import TrainConfig

    own = [
        own_option(
            "store",
            str | None,
            typer.Option(
                None,
                "--store",
                help="Activation store (masksae harvest --out): a directory or a URL such as "
                "s3://bucket/prefix (read through a local chunk cache, see --cache-dir). "
                "Required.",
            ),
        ),
        own_option(
            "out",
            Path | None,
            typer.Option(None, "--out", help="Output folder: one sub-folder per SAE. Required."),
        ),
        own_option(
            "resume",
            bool,
            typer.Option(False, "--resume", help="Continue the run held in --out (same config)."),
        ),
        own_option(
            "verify",
            bool,
            typer.Option(False, "--verify", help="Check every chunk checksum of the store first."),
        ),
        *common_options(),
    ]
    generated = dataclass_parameters(TrainConfig(), prefix=("train",), aliases=ALIASES)
    generated += _sae_parameters()
    return build_command("train", HELP, own, generated, _run_train)


def load_train_config(config: str | Path | None, overrides: dict[str, Any]) -> Any:
    """The SweepConfig of defaults < the sweep TOML ``config`` < ``overrides`` (the flags,
    a nested dict {"train": {...}, "sae": {...}}).

    A flag for a key the file's [grid] varies replaces that grid list (--sae.k 20 trains
    k = 20 only); --train.steps replaces the file's tokens and --train.tokens its steps.
    """
    from masksae.config import check_keys, deep_merge, load_toml, merge_into
    from masksae.errors import ConfigError
    from masksae.train.config import RUN_KEYS, SweepConfig, TrainConfig
    from masksae.train.sae_config import ARCHITECTURES

    where = str(config) if config else "train flags"
    data = load_toml(config) if config else {}
    check_keys(data, ("train", "sae", "grid"), where)
    known_sae = {*sae_fields(), "d_in"}  # d_in: the store's d_model when unset
    file_sae = dict(data.get("sae", {}))
    grid = dict(data.get("grid", {}))
    check_keys(file_sae, known_sae, f"{where} [sae]")
    check_keys(grid, known_sae | set(RUN_KEYS), f"{where} [grid]")
    flag_train = dict(overrides.get("train", {}))
    flag_sae = dict(overrides.get("sae", {}))
    if "steps" in flag_train and "tokens" in flag_train:
        raise ConfigError(
            f"--steps {flag_train['steps']} and --tokens {flag_train['tokens']} cannot be "
            "combined: give one of them"
        )
    # a flag replaces the training length of the file, whichever way the file gave it
    if "steps" in flag_train:
        flag_train["tokens"] = None
    elif "tokens" in flag_train:
        flag_train["steps"] = None
    if flag_train.get("devices") is not None:
        if "device" in flag_train:
            raise ConfigError("--device and --devices cannot be combined: pass one of them")
        flag_train["device"] = "auto"  # --devices replaces the file's device
    for name, value in (("d_sae", flag_sae.get("d_sae")), ("k", flag_sae.get("k"))):
        if value is not None and value < 1:
            raise ConfigError(
                f"--sae.{name.replace('_', '-')} {value} is invalid: expected a positive "
                f"integer (e.g. --sae.{name.replace('_', '-')} {4096 if name == 'd_sae' else 40})"
            )
    train_data = deep_merge(data.get("train", {}), flag_train)
    train = merge_into(TrainConfig(), train_data, f"{where} [train]")
    replaced = [(f"sae.{key}", key) for key in flag_sae] + [
        (f"train.{key}", key) for key in RUN_KEYS if key in flag_train
    ]
    for flag, key in replaced:
        if key in grid:
            log.info("--%s replaces grid.%s = %s of %s", flag, key, grid.pop(key), where)
    sae = {**DEFAULT_SAE, **file_sae, **flag_sae}
    archs = grid.get("architecture", [sae["architecture"]])
    for arch in archs:
        if arch not in ARCHITECTURES:
            raise ConfigError(
                f"architecture {arch!r} is unknown: expected one of {', '.join(ARCHITECTURES)}"
            )
    if "k" in flag_sae and any(a not in _TOPK_FAMILY for a in archs):
        raise ConfigError(
            f"--k {flag_sae['k']} does not apply to --architecture {sae['architecture']} (k is "
            f"the sparsity of {', '.join(_TOPK_FAMILY)}): drop --k"
        )
    if "k" not in sae and "k" not in grid and all(a in _TOPK_FAMILY for a in archs):
        sae["k"] = DEFAULT_K
    return SweepConfig(train=train, sae=sae, grid=grid)


def sweep_toml(sweep: Any) -> str:
    """The sweep as TOML that ``--config`` reads back to the same sweep."""
    from masksae.config import dumps_toml, to_dict

    tables: dict[str, Any] = {"train": to_dict(sweep.train), "sae": dict(sweep.sae)}
    if sweep.grid:
        tables["grid"] = dict(sweep.grid)
    return dumps_toml(tables)


@user_errors
def _run_train(ctx: typer.Context, own: dict[str, Any], overrides: dict[str, Any]) -> None:
    from masksae.errors import ConfigError
    from masksae.train.sweep import train_sweep

    sweep = load_train_config(own["config"], overrides)
    if own["print_config"]:
        typer.echo(sweep_toml(sweep), nl=False)
        return
    missing = [flag for flag in ("store", "out") if own[flag] is None]
    if missing:
        raise ConfigError(
            f"masksae train needs {' and '.join('--' + m for m in missing)}: e.g. "
            "masksae train --store runs/stores/demo --out runs/sae/demo"
        )
    store, out = own["store"], Path(own["out"])
    check_output_dir(out, "--out")
    sweep.runs()  # a bad grid is refused before the store is opened
    try:
        summary = train_sweep(
            store,
            sweep,
            out,
            resume=own["resume"],
            progress=own["progress"],
            verify=own["verify"],
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


@user_errors
def export_command(
    run_dir: Path = typer.Argument(
        ..., help="A run folder written by masksae train (OUT/RUN_NAME)."
    ),
    fmt: str = typer.Option(..., "--format", help="saelens | dictionary_learning"),
    out: Path = typer.Option(..., "--out", help="Folder to write the exported SAE into."),
) -> None:
    """Export a trained SAE to the SAELens or dictionary_learning format."""
    from masksae.train.export import export

    check_output_dir(out, "--out")
    path = export(run_dir, fmt, out)
    typer.echo(str(path))
