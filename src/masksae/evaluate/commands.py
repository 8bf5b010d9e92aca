"""CLI commands of this stage (registered by masksae.cli): ``evaluate``, ``report`` and the
``tasks`` group (``tasks list``).

``evaluate``'s flags are generated from :class:`masksae.evaluate.runner.EvaluateConfig` and
its nested configs (masksae.cli_config); ``--config FILE.toml`` holds the same keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from masksae.cli_utils import check_output_dir, user_errors

log = logging.getLogger(__name__)


tasks_app = typer.Typer(
    help="Probing tasks (sparse probing, SCR, TPP, OOD): what exists and what is available.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add ``report`` and ``tasks``; ``evaluate`` is built lazily (masksae.cli.LAZY_COMMANDS)."""
    app.command("report")(report_cmd)
    app.add_typer(tasks_app, name="tasks")


#: older flag names kept working (the canonical name is the config path, e.g. --data.n-tokens)
ALIASES: dict[str, tuple[str, ...]] = {
    "cache_dir": ("--cache",),
    "model_override": ("--model",),
    "storage_options": ("--storage-option",),
    "data.n_tokens": ("--eval-tokens",),
    "data.corpus": ("--eval-corpus",),
    "data.corpus_field": ("--eval-corpus-field",),
    "data.corpus_filter": ("--eval-corpus-filter",),
    "data.corpus_split": ("--eval-corpus-split",),
    "data.skip_tokens": ("--eval-skip-tokens",),
    "data.context_length": ("--context-length",),
    "downstream.n_sequences": ("--ce-sequences",),
    "absorption.max_words_per_letter": ("--absorption-max-words",),
    "cooccurrence.min_firing_rate": ("--cooccurrence-min-rate",),
    "cooccurrence.max_latents": ("--cooccurrence-max-latents",),
    "probing.preset": ("--probing-preset",),
    "probing.sparse_probing.tasks": ("--sparse-probing-tasks",),
    "probing.scr.tasks": ("--scr-tasks",),
    "probing.tpp.tasks": ("--tpp-tasks",),
    "probing.ood.tasks": ("--ood-tasks",),
}
DEFAULT_METRICS = ("core", "absorption")
"""--metrics of ``masksae evaluate`` when neither the file nor a flag sets it."""
DEFAULT_PRESET = "demo"
"""Absorption vocabulary and probing preset of the CLI (CPU-sized; "paper"/"all" for the
references' sizes)."""
HELP = """Score checkpoints (core, absorption, co-occurrence, probing metrics) into one result JSON
per checkpoint.

CHECKPOINT: run, checkpoint or sweep directories (also accepted after --checkpoints).
Every flag is a key of a --config TOML file: top-level keys (metrics, device, ...) and the
tables [data], [core], [downstream], [absorption], [cooccurrence], [probing] (with
[probing.sparse_probing], [probing.scr], [probing.tpp], [probing.ood]); flags override the
file. probing.preset (--probing-preset) picks the probing defaults the other probing keys
change; absorption.max_words_per_letter also takes a preset (demo, study, all).

Rerunning skips checkpoints whose result JSON exists with the same settings (--overwrite
redoes them); a result made with other settings is recomputed, with a warning.
"""


def cli_base() -> Any:
    """The EvaluateConfig the CLI starts from (CPU-sized vocabulary and probing preset)."""
    from masksae.evaluate.absorption.config import AbsorptionConfig, parse_max_words
    from masksae.evaluate.config import EvaluateConfig
    from masksae.evaluate.probing import probing_preset

    return EvaluateConfig(
        metrics=DEFAULT_METRICS,
        absorption=AbsorptionConfig(max_words_per_letter=parse_max_words(DEFAULT_PRESET)),
        probing=probing_preset(DEFAULT_PRESET),
    )


def evaluate_command() -> Any:
    """The ``masksae evaluate`` command, its flags generated from EvaluateConfig."""
    from masksae.cli_config import build_command, common_options, dataclass_parameters, own_option

    own = [
        own_option(
            "checkpoints",
            list[Path] | None,
            typer.Argument(None, metavar="CHECKPOINT", show_default=False),
        ),
        own_option(
            "more_checkpoints",
            list[Path] | None,
            typer.Option(
                None,
                "--checkpoints",
                metavar="DIR",
                help="A run, checkpoint or sweep directory (repeatable; the same as the "
                "CHECKPOINT arguments).",
            ),
        ),
        own_option(
            "out",
            Path | None,
            typer.Option(
                None,
                "--out",
                metavar="DIR",
                help="Directory for one result JSON per checkpoint. Required.",
            ),
        ),
        *common_options(),
    ]
    generated = dataclass_parameters(
        cli_base(),
        aliases=ALIASES,
        exclude=("progress",),
        as_text=("absorption.max_words_per_letter",),
    )
    return build_command("evaluate", HELP, own, generated, _run_evaluate)


def load_evaluate_config(config: str | Path | None, overrides: dict[str, Any]) -> Any:
    """EvaluateConfig from the CLI's base < the TOML file ``config`` < ``overrides`` (the
    flags as a nested dict). A probing.preset given in either replaces the base preset
    before the other probing keys apply."""
    import dataclasses

    from masksae.config import deep_merge, load_toml, merge_into
    from masksae.evaluate.absorption.config import parse_max_words
    from masksae.evaluate.probing import probing_preset

    data = deep_merge(load_toml(config) if config else {}, overrides)
    base = cli_base()
    preset = (
        data.get("probing", {}).get("preset") if isinstance(data.get("probing"), dict) else None
    )
    if preset is not None:
        base = dataclasses.replace(base, probing=probing_preset(str(preset)))
    hooks = {"absorption.max_words_per_letter": parse_max_words}
    cfg = merge_into(base, data, where=str(config) if config else "evaluate flags", hooks=hooks)
    cfg.probing.validate()
    return cfg


def evaluate_toml(cfg: Any) -> str:
    """The config as TOML that ``--config`` reads back to the same config."""
    from masksae.config import dumps_toml, to_dict

    data = to_dict(cfg)
    data.pop("progress", None)
    if data["absorption"].get("max_words_per_letter") is None:
        data["absorption"]["max_words_per_letter"] = "all"  # None (omitted) reads as the base
    return dumps_toml(data)


@user_errors
def _run_evaluate(ctx: typer.Context, own: dict[str, Any], overrides: dict[str, Any]) -> None:
    import dataclasses

    from masksae.errors import ConfigError
    from masksae.evaluate.discover import find_checkpoints
    from masksae.evaluate.runner import evaluate_checkpoints

    cfg = load_evaluate_config(own["config"], overrides)
    if own["print_config"]:
        typer.echo(evaluate_toml(cfg), nl=False)
        return
    checkpoints = [*(own["checkpoints"] or []), *(own["more_checkpoints"] or [])]
    if not checkpoints or own["out"] is None:
        raise ConfigError(
            "masksae evaluate needs checkpoints and --out: e.g. masksae evaluate runs/sae/demo "
            "--out runs/eval"
        )
    out = Path(own["out"])
    check_output_dir(out, "--out")
    if cfg.cache_dir is not None:
        check_output_dir(Path(cfg.cache_dir), "--cache")
        cfg = dataclasses.replace(cfg, cache_dir=Path(cfg.cache_dir))
    cfg = dataclasses.replace(cfg, progress=own["progress"])
    found = find_checkpoints(checkpoints)
    log.info("%d checkpoint(s) to evaluate", len(found))
    written = evaluate_checkpoints(found, out, cfg, roots=checkpoints)
    typer.echo(f"wrote {len(written)} result file(s) to {out}")


@user_errors
def report_cmd(
    results: list[Path] = typer.Argument(..., help="Result JSON files or directories of them."),
    out: Path = typer.Option(
        ..., "--out", help="Directory for report.md, the PNG figures and tables/ (CSV, LaTeX)."
    ),
) -> None:
    """Compare masked and unmasked SAEs: tables with 95% intervals over seeds, paired
    differences at equal k and at equal measured L0, figures (Markdown, CSV, LaTeX, PNG)."""
    from masksae.evaluate.report import write_report

    check_output_dir(out, "--out")
    path = write_report(results, out)
    typer.echo(f"wrote {path}")


@tasks_app.command("list")
@user_errors
def tasks_list_cmd(
    kind: str | None = typer.Option(
        None, "--kind", help="Only tasks of this kind: classes, scr, ood."
    ),
    details: bool = typer.Option(
        False, "--details", help="Also the dataset, labels, split, licence, origin and presets."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print machine-readable JSON (every detail of every task)."
    ),
) -> None:
    """The probing tasks, whether each is available on this machine and why not."""
    from masksae.errors import ConfigError
    from masksae.evaluate.tasks import KINDS
    from masksae.evaluate.tasks.listing import task_records, task_table

    if kind is not None and kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: choose from {', '.join(KINDS)}")
    if as_json:
        import json

        typer.echo(json.dumps(task_records(kind), indent=2))
        return
    typer.echo(task_table(kind, details))
