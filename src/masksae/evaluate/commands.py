"""CLI commands of this stage (registered by masksae.cli): ``evaluate``, ``report`` and the
``tasks`` group (``tasks list``)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from masksae.cli_utils import check_output_dir, user_errors

log = logging.getLogger(__name__)


tasks_app = typer.Typer(
    help="Probing tasks (sparse probing, SCR, TPP, OOD): what exists and what is available.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
    app.command("evaluate")(evaluate_cmd)
    app.command("report")(report_cmd)
    app.add_typer(tasks_app, name="tasks")


def _names(value: str | None) -> tuple[str, ...] | None:
    """A comma list option as a tuple (None when not given)."""
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


@user_errors
def evaluate_cmd(
    checkpoints: list[Path] = typer.Option(
        ...,
        "--checkpoints",
        help="Run, checkpoint or sweep directories: --checkpoints A B C (or repeat the flag).",
    ),
    more_checkpoints: list[Path] | None = typer.Argument(
        None, metavar="[DIR]...", help="More checkpoint directories (what follows --checkpoints A)."
    ),
    out: Path = typer.Option(..., "--out", help="Directory for one result JSON per checkpoint."),
    metrics: str = typer.Option(
        "core,absorption",
        "--metrics",
        help="Comma list of core, reconstruction, absorption, cooccurrence, sparse_probing, "
        "scr, tpp, ood; or all.",
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Cache of LLM activations reused across checkpoints and runs."
    ),
    eval_tokens: int = typer.Option(16384, "--eval-tokens", help="Held-out activations scored."),
    eval_corpus: str = typer.Option(
        "bundled",
        "--eval-corpus",
        help="'bundled', a local .txt/.jsonl/.parquet file or folder, or a Hugging Face "
        "dataset id (read like harvest's --corpus; held out from a harvest's start).",
    ),
    eval_corpus_field: str = typer.Option(
        "text", "--eval-corpus-field", help="Record field holding the text (jsonl/parquet/Hub)."
    ),
    eval_corpus_filter: list[str] | None = typer.Option(
        None, "--eval-corpus-filter", help="key=value a record must match (repeatable)."
    ),
    eval_corpus_split: str = typer.Option(
        "train", "--eval-corpus-split", help="Dataset split (Hugging Face datasets)."
    ),
    eval_skip_tokens: int | None = typer.Option(
        None,
        "--eval-skip-tokens",
        help="Read forward, skipping documents within the first N tokens (default: files "
        "are read from the end, Hub streams skip 1M tokens).",
    ),
    context_length: int = typer.Option(128, "--context-length", help="Evaluation sequence length."),
    ce_sequences: int = typer.Option(
        32, "--ce-sequences", help="Sequences scored for CE loss recovered / KL."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    eval_masked: bool = typer.Option(
        False, "--eval-masked", help="Also report core metrics on masked activations."
    ),
    eval_store: str | None = typer.Option(
        None,
        "--eval-store",
        help="Take reconstruction activations from this store's end (a directory or a URL "
        "such as s3://bucket/prefix).",
    ),
    storage_option: list[str] = typer.Option(
        [],
        "--storage-option",
        help="Option of the --eval-store filesystem, KEY=VALUE (repeatable).",
    ),
    model: str | None = typer.Option(
        None, "--model", help="Override the LLM spec recorded in the checkpoints."
    ),
    absorption_max_words: str = typer.Option(
        "demo",
        "--absorption-max-words",
        help="Absorption vocabulary cap per letter: a number, a preset (demo = 100, "
        "study = 400) or 0 / all for the whole vocabulary (SAEBench; slow on CPU).",
    ),
    cooccurrence_min_rate: float = typer.Option(
        0.005,
        "--cooccurrence-min-rate",
        help="Co-occurrence: latents firing on at least this fraction of tokens form pairs.",
    ),
    cooccurrence_max_latents: int = typer.Option(
        2048, "--cooccurrence-max-latents", help="Co-occurrence: at most this many latents."
    ),
    probing_preset: str = typer.Option(
        "demo",
        "--probing-preset",
        help="Probing tasks and sizes: demo (offline, CPU-sized), offline (sae-probes tasks, "
        "near-reference sizes), paper (SAEBench's Hub datasets, reference sizes), tiny (smoke).",
    ),
    sparse_probing_tasks: str | None = typer.Option(
        None, "--sparse-probing-tasks", help="Comma list replacing the preset's (tasks list)."
    ),
    scr_tasks: str | None = typer.Option(
        None, "--scr-tasks", help="Comma list of SCR tasks replacing the preset's."
    ),
    tpp_tasks: str | None = typer.Option(
        None, "--tpp-tasks", help="Comma list of TPP tasks replacing the preset's."
    ),
    ood_tasks: str | None = typer.Option(
        None, "--ood-tasks", help="Comma list of OOD tasks replacing the preset's."
    ),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Progress bars (rate, ETA) on every LLM pass and metric.",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Recompute checkpoints whose result JSON exists with the same settings "
        "(default: skip them; results with other settings are always recomputed).",
    ),
) -> None:
    """Score checkpoints (core, absorption, co-occurrence, probing metrics) into one JSON per
    checkpoint.

    Rerunning skips checkpoints whose result JSON exists with the same settings (--overwrite
    redoes them); a result made with other settings is recomputed, with a warning.
    """
    from masksae.evaluate.absorption import AbsorptionConfig
    from masksae.evaluate.absorption.config import parse_max_words
    from masksae.evaluate.cooccurrence import CooccurrenceConfig
    from masksae.evaluate.data import EvalDataConfig
    from masksae.evaluate.discover import find_checkpoints
    from masksae.evaluate.downstream import DownstreamConfig
    from masksae.evaluate.probing import probing_preset as make_probing
    from masksae.evaluate.probing import with_tasks
    from masksae.evaluate.runner import EvaluateConfig, evaluate_checkpoints
    from masksae.storage.location import parse_storage_options

    names = tuple(m.strip() for m in metrics.split(",") if m.strip())
    check_output_dir(out, "--out")
    if cache is not None:
        check_output_dir(cache, "--cache")
    cfg = EvaluateConfig(
        metrics=names,
        data=EvalDataConfig(
            corpus=eval_corpus,
            corpus_field=eval_corpus_field,
            corpus_filter=tuple(eval_corpus_filter or ()),
            corpus_split=eval_corpus_split,
            skip_tokens=eval_skip_tokens,
            n_tokens=eval_tokens,
            context_length=context_length,
        ),
        downstream=DownstreamConfig(n_sequences=ce_sequences),
        absorption=AbsorptionConfig(max_words_per_letter=parse_max_words(absorption_max_words)),
        cooccurrence=CooccurrenceConfig(
            min_firing_rate=cooccurrence_min_rate, max_latents=cooccurrence_max_latents
        ),
        cache_dir=cache,
        device=device,
        eval_masked=eval_masked,
        eval_store=eval_store,
        storage_options=parse_storage_options(storage_option) or None,
        model_override=model,
        probing=with_tasks(
            make_probing(probing_preset),
            sparse_probing=_names(sparse_probing_tasks),
            scr=_names(scr_tasks),
            tpp=_names(tpp_tasks),
            ood=_names(ood_tasks),
        ),
        progress=progress,
        overwrite=overwrite,
    )
    cfg.probing.validate()
    # click options take one value each; the positional list lets `--checkpoints A B` work too
    checkpoints = [*checkpoints, *(more_checkpoints or [])]
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
) -> None:
    """The probing tasks, whether each is available on this machine and why not."""
    from masksae.errors import ConfigError
    from masksae.evaluate.tasks import KINDS
    from masksae.evaluate.tasks.listing import task_table

    if kind is not None and kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: choose from {', '.join(KINDS)}")
    typer.echo(task_table(kind, details))
