"""CLI commands of the store: ``masksae store info|verify|copy|ls``.

Every command takes a local path or an fsspec URL (``s3://bucket/prefix``, ``gs://``,
``hf://datasets/org/name/prefix``, ``file://``) plus ``--storage-option KEY=VALUE``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from masksae.cli_utils import user_errors

store_app = typer.Typer(
    name="store",
    help="Inspect, verify, copy and list activation stores (local paths or fsspec URLs).",
    no_args_is_help=True,
)

STORE_ARG_HELP = "Store directory or URL (s3://bucket/prefix, gs://..., hf://..., file://...)."
STORAGE_OPTION_HELP = (
    "Option of the store's filesystem, KEY=VALUE (repeatable; JSON values decoded), e.g. "
    "endpoint_url=http://127.0.0.1:9000 or anon=true. Credentials otherwise come from the "
    "standard places (AWS_* variables incl. AWS_ENDPOINT_URL, ~/.aws, gcloud, HF_TOKEN)."
)


def storage_option_flag() -> Any:
    """The ``--storage-option`` typer option (shared by every command taking a store)."""
    return typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
    app.add_typer(store_app, name="store")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def store_summary(
    path: str | Path, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything ``store info`` shows, as a JSON-able dict."""
    from masksae.storage.provenance import corruption_kind, corruption_label
    from masksae.storage.reader import ActivationStore

    store = ActivationStore.open(path, require_complete=False, storage_options=storage_options)
    spec = store.spec
    written_tokens = sum(r["n_tokens"] for r in store.records.values())
    acts_raw = written_tokens * spec.d_model * spec.itemsize
    listing = store.location.listing()
    acts_disk = sum(size for key, size in listing.items() if key.startswith("activations/"))
    summary: dict[str, Any] = {
        "path": str(store.path),
        "provenance": store.provenance,
        "package_version": store.attrs.get("package_version"),
        "d_model": spec.d_model,
        "dtype": spec.dtype,
        "compression": spec.compression,
        "compression_ratio": (acts_raw / acts_disk) if acts_disk else None,
        "size_on_disk_bytes": sum(listing.values()),
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
        "corruption": corruption_kind(store.provenance),
        "corruption_label": corruption_label(store.provenance),
        "tokens_deleted": sum(int(r.get("n_deleted", 0)) for r in store.records.values()),
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
        f"{s['tokens_masked']} masked or replaced (usable)"
    )
    corruption = f"corruption   {s['corruption_label']}"
    if s["corruption"] == "delete":
        corruption += f" ({s['tokens_deleted']} tokens deleted, their slots excluded)"
    lines.append(corruption)
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
    path: str = typer.Argument(..., help=STORE_ARG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    storage_option: list[str] = storage_option_flag(),
) -> None:
    """Show a store's provenance, size, compression, chunks and statistics."""
    from masksae.storage.location import parse_storage_options

    summary = store_summary(path, parse_storage_options(storage_option))
    typer.echo(json.dumps(summary, indent=2) if as_json else _format_info(summary))


@store_app.command("verify")
@user_errors
def verify(
    path: str = typer.Argument(..., help=STORE_ARG_HELP),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print a machine-readable JSON report "
        "on stdout (path, ok, store-level problems, chunk counts, fingerprint, and each "
        "bad chunk's index, token range and problem).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
    storage_option: list[str] = storage_option_flag(),
) -> None:
    """Check every chunk is present and checksum-correct (exit 1 naming bad chunks).

    Remote stores are read from the store itself, never from a local chunk cache.
    """
    from tqdm import tqdm

    from masksae.storage.location import parse_storage_options
    from masksae.storage.reader import ActivationStore
    from masksae.storage.verify import chunk_problems, store_problems

    store = ActivationStore.open(
        path, require_complete=False, storage_options=parse_storage_options(storage_option)
    )
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


@store_app.command("copy")
@user_errors
def copy(
    source: str = typer.Argument(..., help="Store to copy: " + STORE_ARG_HELP),
    destination: str = typer.Argument(
        ..., help="Where to copy it (absent or empty, or a partial copy of the same store)."
    ),
    verify_arrival: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Read each chunk back from the destination and compare it byte for byte before "
        "marking it complete (each chunk is always checked against its checksum at the "
        "source before it is sent).",
    ),
    workers: int = typer.Option(4, "--workers", help="Chunks copied concurrently."),
    break_lock: bool = typer.Option(
        False, "--break-lock", help="Remove a remote writer lease left by a dead writer."
    ),
    storage_option: list[str] = typer.Option(
        [], "--storage-option", help="Option of the source's filesystem. " + STORAGE_OPTION_HELP
    ),
    dest_storage_option: list[str] = typer.Option(
        [],
        "--dest-storage-option",
        help="Option of the destination's filesystem (default: the --storage-option values).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Copy a store between a local folder and object storage (either way), resumably.

    Rerunning an interrupted copy skips the chunks already at the destination.
    """
    from tqdm import tqdm

    from masksae.errors import ConfigError
    from masksae.storage.copy import copy_store
    from masksae.storage.location import parse_storage_options

    if workers < 1:
        raise ConfigError(f"--workers {workers} is invalid: expected an integer >= 1")
    src_opts = parse_storage_options(storage_option)
    dst_opts = parse_storage_options(dest_storage_option) if dest_storage_option else src_opts
    with tqdm(desc="copy", unit="B", unit_scale=True, disable=not progress) as bar:
        result = copy_store(
            source,
            destination,
            source_options=src_opts,
            destination_options=dst_opts,
            verify=verify_arrival,
            break_lock=break_lock,
            workers=workers,
            on_chunk=lambda _i, n: bar.update(n),
        )
    status = "complete" if result.complete else "INCOMPLETE (the source is incomplete)"
    typer.echo(
        f"copied {result.copied_chunks} chunk(s) ({_human_bytes(result.copied_bytes)}), "
        f"{result.skipped_chunks} already there, in {result.seconds:.1f} s: "
        f"{result.destination} is {status}, fingerprint {result.fingerprint}"
    )


def list_stores(
    prefix: str, storage_options: dict[str, Any] | None = None, max_depth: int = 4
) -> list[dict[str, Any]]:
    """The stores under ``prefix`` (itself included), up to ``max_depth`` folders deep.

    One directory listing per folder visited; a store's own folders are not descended.
    """
    from masksae.errors import StoreError
    from masksae.storage.layout import GROUP_METADATA, read_attrs
    from masksae.storage.location import StoreLocation

    root = StoreLocation.parse(prefix, storage_options)
    fs = root.fs
    found: list[dict[str, Any]] = []
    folders = [root.root]
    for _depth in range(max_depth + 1):
        below: list[str] = []
        for folder in folders:
            try:
                fs.invalidate_cache(folder)
                entries = fs.ls(folder, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                continue
            names = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
            rel = folder[len(root.root) :].strip("/")
            loc = StoreLocation(
                root.display(rel) if rel else root.display(),
                fs,
                folder,
                root.local_path / rel if root.local_path is not None else None,
                root.storage_options,
            )
            attrs = read_attrs(loc) if GROUP_METADATA in names else None
            if attrs is not None:
                found.append(_ls_row(loc, attrs))
                continue
            below += [e["name"].rstrip("/") for e in entries if e.get("type") == "directory"]
        folders = sorted(below)
    if not found and not root.exists():
        raise StoreError(f"{root} does not exist: check the path or URL and the credentials")
    return found


def _ls_row(loc: Any, attrs: dict[str, Any]) -> dict[str, Any]:
    prov = attrs.get("provenance", {})
    spec = attrs.get("spec", {})
    return {
        "path": loc.display(),
        "model": prov.get("model"),
        "layer": prov.get("layer"),
        "mask_prob": prov.get("mask_prob"),
        "tokens": spec.get("total_tokens"),
        "d_model": spec.get("d_model"),
        "dtype": spec.get("dtype"),
        "complete": bool(attrs.get("complete")),
        "chunks_complete": attrs.get("chunks_complete"),
        "n_chunks": attrs.get("n_chunks"),
        "fingerprint": attrs.get("fingerprint"),
        "size_bytes": sum(loc.listing().values()),
    }


@store_app.command("ls")
@user_errors
def ls(
    prefix: str = typer.Argument(..., help="Folder or URL prefix to search for stores."),
    depth: int = typer.Option(4, "--depth", help="Folders to descend below PREFIX."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    storage_option: list[str] = storage_option_flag(),
) -> None:
    """List the stores under a prefix: model, layer, p, tokens, size, state."""
    from masksae.storage.location import parse_storage_options

    rows = list_stores(prefix, parse_storage_options(storage_option), max_depth=depth)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no activation store under {prefix}")
        return
    header = ("path", "model", "layer", "p", "tokens", "size", "state")
    table = [header] + [
        (
            r["path"],
            str(r["model"]),
            str(r["layer"]),
            str(r["mask_prob"]),
            str(r["tokens"]),
            _human_bytes(r["size_bytes"]),
            "complete"
            if r["complete"]
            else f"partial {r['chunks_complete'] or 0}/{r['n_chunks']} chunks",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
