"""CLI command of the study driver: ``masksae study CONFIG --out DIR`` (registered by
masksae.cli)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from masksae.cli_utils import check_output_dir, user_errors


def register(app: typer.Typer) -> None:
    """Add this command to the top-level app."""
    app.command(name="study")(study_command)


@user_errors
def study_command(
    config: Path = typer.Argument(..., help="Study TOML file, e.g. configs/study/study.toml."),
    out: Path = typer.Option(..., "--out", help="Output folder of the whole study."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override a config value: key=value, repeatable, e.g. --set harvest.tokens=20000, "
        "--set train.seeds=[0], --set store.p0.3.k=[20], --set evaluate.metrics=all.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List the stages still to run and their commands; run nothing."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bars of the stage commands."
    ),
) -> None:
    """Run a study: harvest every store, train each store's SAEs once per seed, evaluate,
    report.

    Rerunning the same command continues: finished stages are skipped, an interrupted one
    resumes. Stage times go to OUT/stages.md.
    """
    from masksae.study.config import load_study
    from masksae.study.runner import StageFailed, run_study

    check_output_dir(out, "--out")
    cfg = load_study(config, overrides)
    if progress is not None:
        cfg.progress = progress
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    try:
        run_study(cfg, out, dry_run=dry_run, verbose=verbose, echo=typer.echo)
    except StageFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=exc.exit_code if exc.exit_code != 0 else 1) from None
