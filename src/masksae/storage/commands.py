"""CLI commands of the store: ``masksae store info PATH`` and ``masksae store verify PATH``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from masksae.cli_utils import user_errors

store_app = typer.Typer(
    name="store",
    help="Inspect and verify activation stores.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
    app.add_typer(store_app, name="store")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def store_summary(path: Path) -> dict[str, Any]:
    """Everything ``store info`` shows, as a JSON-able dict."""
    from masksae.storage.layout import directory_bytes
    from masksae.storage.reader import ActivationStore

    store = ActivationStore.open(path, require_complete=False)
    spec = store.spec
    written_tokens = sum(r["n_tokens"] for r in store.records.values())
    acts_raw = written_tokens * spec.d_model * spec.itemsize
    acts_disk = directory_bytes(store.path / "activations")
    summary: dict[str, Any] = {
        "path": str(store.path),
        "provenance": store.provenance,
        "package_version": store.attrs.get("package_version"),
        "d_model": spec.d_model,
        "dtype": spec.dtype,
        "compression": spec.compression,
        "compression_ratio": (acts_raw / acts_disk) if acts_disk else None,
        "size_on_disk_bytes": directory_bytes(store.path),
        "activations_bytes_on_disk": acts_disk,
        "activations_bytes_raw": acts_raw,
        "n_tokens": store.n_tokens,
        "chunk_tokens": spec.chunk_tokens,
        "chunks_complete": len(store.completed_chunks),
        "chunks_total": store.n_chunks,
        "complete": store.is_complete,
        "tokens_usable": store.count_tokens(),
        "tokens_excluded": store.count_tokens(include_excluded=True) - store.count_tokens(),
        "tokens_norm_outliers": sum(
            int(r.get("n_norm_outliers", 0)) for r in store.records.values()
        ),
        "tokens_masked": store.count_tokens() - store.count_tokens(include_masked=False),
        "excluded_token_policy": store.provenance.get("excluded_token_policy")
        or store.attrs.get("excluded_token_policy"),
        "fingerprint": store.fingerprint,
        "statistics": store.stats.summary() if store.completed_chunks else None,
    }
    return summary


def _format_info(s: dict[str, Any]) -> str:
    lines = [f"store        {s['path']}"]
    status = "complete" if s["complete"] else "INCOMPLETE (rerun the harvest to resume)"
    lines.append(
        f"chunks       {s['chunks_complete']}/{s['chunks_total']} complete "
        f"({s['chunk_tokens']} tokens each): {status}"
    )
    lines.append(
        f"tokens       {s['n_tokens']} total, {s['tokens_usable']} usable, "
        f"{s['tokens_masked']} masked (usable)"
    )
    outliers = s["tokens_norm_outliers"]
    lines.append(
        f"excluded     {s['tokens_excluded'] - outliers} special/position-0, "
        f"{outliers} norm outliers"
    )
    lines.append(f"activations  d_model={s['d_model']} dtype={s['dtype']}")
    ratio = s["compression_ratio"]
    lines.append(
        f"compression  {s['compression']}" + (f", ratio {ratio:.3f}x" if ratio is not None else "")
    )
    lines.append(
        f"size         {_human_bytes(s['size_on_disk_bytes'])} on disk "
        f"(activations {_human_bytes(s['activations_bytes_on_disk'])})"
    )
    stats = s["statistics"]
    if stats:
        lines.append(
            f"statistics   mean norm {stats['mean_norm']:.6g}, rms norm "
            f"{stats['rms_norm']:.6g}, norm scale {stats['norm_scale']:.6g}, "
            f"mean |mean_d| {stats['mean_abs_mean_D']:.4g}, mean var_d "
            f"{stats['mean_var_D']:.4g} (over {stats['n_tokens']} tokens)"
        )
    lines.append(f"fingerprint  {s['fingerprint']}")
    lines.append(f"version      masksae {s['package_version']}")
    lines.append("provenance")
    for key, value in sorted(s["provenance"].items()):
        lines.append(f"  {key}: {json.dumps(value)}")
    return "\n".join(lines)


@store_app.command("info")
@user_errors
def info(
    path: Path = typer.Argument(..., help="Store directory."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show a store's provenance, size, compression, chunks and statistics."""
    summary = store_summary(path)
    typer.echo(json.dumps(summary, indent=2) if as_json else _format_info(summary))


@store_app.command("verify")
@user_errors
def verify(
    path: Path = typer.Argument(..., help="Store directory."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print a machine-readable JSON report "
        "on stdout (path, ok, store-level problems, chunk counts, fingerprint, and each "
        "bad chunk's index, token range and problem).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Check every chunk is present and checksum-correct (exit 1 naming bad chunks)."""
    from tqdm import tqdm

    from masksae.storage.reader import ActivationStore
    from masksae.storage.verify import chunk_problems, store_problems

    store = ActivationStore.open(path, require_complete=False)
    general = store_problems(store)
    problems: dict[int, str] = {}
    if not store.metadata_problems:  # with edited array metadata every chunk reads wrongly
        with tqdm(
            total=store.n_chunks, desc="verify", unit="chunk", disable=not progress, file=None
        ) as bar:
            problems = chunk_problems(store, on_chunk=lambda _i: bar.update(1))
    if as_json:
        report = {
            "path": str(store.path),
            "ok": not problems and not general,
            "store_problems": general,
            "n_chunks": store.n_chunks,
            "n_bad_chunks": len(problems),
            "n_tokens": store.n_tokens,
            "fingerprint": store.fingerprint,
            "bad_chunks": [
                {
                    "index": index,
                    "start": store.chunk_bounds(index)[0],
                    "stop": store.chunk_bounds(index)[1],
                    "problem": problem,
                }
                for index, problem in problems.items()
            ],
        }
        typer.echo(json.dumps(report, indent=2))
    elif problems or general:
        for problem in [*general, *problems.values()]:
            typer.echo(f"BAD {problem}")
        if general:
            typer.echo(f"{len(general)} store-level problem(s) in {store.path}")
        if problems:
            typer.echo(f"{len(problems)} of {store.n_chunks} chunks bad or missing in {store.path}")
    else:
        typer.echo(
            f"OK: all {store.n_chunks} chunks of {store.path} present and "
            f"checksum-correct ({store.n_tokens} tokens, fingerprint "
            f"{store.fingerprint})"
        )
    if problems or general:
        raise typer.Exit(code=1)
