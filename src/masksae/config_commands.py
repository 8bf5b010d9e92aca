"""``masksae config list|show``: the example configs shipped in the package, and the config
of a training run as a file ``--config`` accepts.

The examples live in ``masksae/configs`` (package data; the repository's ``configs/`` is a
link to it): ``harvest-*.toml`` for ``masksae harvest --config``, ``evaluate-*.toml`` for
``masksae evaluate --config``, ``study/*.toml`` for ``masksae study``, and the other files
are sweep files for ``masksae train --config``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import typer

from masksae.cli_utils import user_errors

config_app = typer.Typer(
    help="Example configs shipped with masksae, and the config of a training run, as TOML "
    "for --config.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the ``config`` group to the top-level app."""
    app.add_typer(config_app, name="config")


def examples_dir() -> Path:
    """Folder of the shipped example configs."""
    return Path(str(resources.files("masksae") / "configs"))


def example_command(name: str) -> str:
    """The command an example is for: harvest, evaluate, study or train."""
    if name.startswith("study/"):
        return "study"
    for stage in ("harvest", "evaluate"):
        if name.startswith(stage + "-"):
            return stage
    return "train"


def _description(path: Path) -> str:
    """The first sentence of the file's header comment (command lines left out)."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("masksae "):
            words += text.split()
    header = " ".join(words)
    end = header.find(". ")
    return header if end < 0 else header[: end + 1]


def list_examples() -> list[dict[str, str]]:
    """Every shipped example: name, command, description, path."""
    root = examples_dir()
    rows = []
    for path in sorted(root.rglob("*.toml")):
        name = path.relative_to(root).with_suffix("").as_posix()
        rows.append(
            {
                "name": name,
                "command": example_command(name),
                "description": _description(path),
                "path": str(path),
            }
        )
    return rows


def run_config_toml(folder: Path) -> str:
    """The sweep TOML of a training output folder (sweep.json) or of one run folder
    (config.json): [train], [sae] with what every run shares, [grid] with what differs."""
    from masksae.config import dumps_toml
    from masksae.errors import ConfigError

    sweep_file, run_file = folder / "sweep.json", folder / "config.json"
    if sweep_file.is_file():
        manifest = json.loads(sweep_file.read_text(encoding="utf-8"))
        train, runs = dict(manifest["train"]), manifest["runs"]
    elif run_file.is_file():
        meta = json.loads(run_file.read_text(encoding="utf-8"))
        train, runs = dict(meta["train"]), [{"sae": meta["sae"], "seed": meta["train"]["seed"]}]
    else:
        raise ConfigError(
            f"{folder} holds neither sweep.json nor config.json: give an example name "
            "(masksae config list), a training --out folder or one of its run folders"
        )
    saes = [dict(r["sae"]) for r in runs]
    keys = list(dict.fromkeys(k for sae in saes for k in sae))
    shared = {k: saes[0][k] for k in keys if all(s.get(k) == saes[0].get(k) for s in saes)}
    grid = {
        k: list(dict.fromkeys(json.dumps(s.get(k)) for s in saes)) for k in keys if k not in shared
    }
    grid = {k: [json.loads(v) for v in values] for k, values in grid.items()}
    seeds = list(dict.fromkeys(r.get("seed", train.get("seed", 0)) for r in runs))
    if len(seeds) > 1:
        grid["seed"] = seeds
    tables: dict[str, Any] = {"train": train, "sae": shared}
    if grid:
        tables["grid"] = grid
    return dumps_toml(tables)


@config_app.command("list")
@user_errors
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """The example configs shipped with masksae (show one with masksae config show NAME)."""
    rows = list_examples()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        typer.echo(f"{row['name']:<{width}}  {row['command']:<8}  {row['description']}")


@config_app.command("show")
@user_errors
def show_cmd(
    name: str = typer.Argument(
        ...,
        metavar="NAME",
        help="An example's name (masksae config list), a training --out folder or one of "
        "its run folders.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the config as JSON."),
) -> None:
    """Print a config as TOML: an example (save it and pass it to --config) or the sweep a
    training folder was run with."""
    import tomllib

    from masksae.errors import ConfigError

    rows = {r["name"]: r for r in list_examples()}
    key = name.removesuffix(".toml")
    if key in rows:
        text = Path(rows[key]["path"]).read_text(encoding="utf-8")
    elif Path(name).is_dir():
        text = run_config_toml(Path(name))
    else:
        from masksae.config import did_you_mean

        raise ConfigError(
            f"no example config or run folder {name!r}{did_you_mean(key, rows)}: the "
            f"examples are {', '.join(rows)}"
        )
    if as_json:
        typer.echo(json.dumps(tomllib.loads(text), indent=2))
    else:
        typer.echo(text, nl=not text.endswith("\n"))
