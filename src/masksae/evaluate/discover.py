"""Find checkpoints and result files from the paths a user gives on the command line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from masksae.errors import CheckpointError, MasksaeError

CHECKPOINT_MARKER = "config.json"
MAX_DEPTH = 4


def find_checkpoints(paths: Iterable[str | Path]) -> list[Path]:
    """Run or checkpoint directories under ``paths``.

    A directory holding ``config.json`` is a run (or checkpoint) and is passed to
    ``masksae.train.load_sae`` as is; otherwise its subdirectories are searched (a sweep
    directory), up to a few levels deep. Results are sorted and unique.
    """
    found: list[Path] = []
    for raw in paths:
        root = Path(raw)
        if not root.is_dir():
            raise CheckpointError(
                f"checkpoint path {str(root)!r} is not a directory: pass a run "
                "directory (holding config.json) or a sweep directory of runs"
            )
        hits = _search(root, 0)
        if not hits:
            raise CheckpointError(
                f"no run or checkpoint (a directory with {CHECKPOINT_MARKER}) under "
                f"{str(root)!r}{_not_a_run_hint(root)}: pass the --out folder of `masksae "
                "train`, one of its run folders, or a checkpoint folder"
            )
        found.extend(hits)
    return sorted(set(found))


def _not_a_run_hint(root: Path) -> str:
    """`` (it is an activation store)`` when ``root`` is a store rather than a run."""
    try:
        attrs = json.loads((root / "zarr.json").read_text(encoding="utf-8")).get("attributes")
    except (OSError, ValueError, AttributeError):
        return ""
    return " (it is an activation store, the input of `masksae train`)" if attrs else ""


def _search(directory: Path, depth: int) -> list[Path]:
    if (directory / CHECKPOINT_MARKER).is_file():
        return [directory.resolve()]
    if depth >= MAX_DEPTH:
        return []
    out: list[Path] = []
    for child in sorted(p for p in directory.iterdir() if p.is_dir()):
        if not child.name.startswith("."):
            out.extend(_search(child, depth + 1))
    return out


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """JSON result files: given directly, or ``*.json`` anywhere under given directories."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        else:
            raise MasksaeError(
                f"result path {str(p)!r} does not exist: pass the JSON files or "
                "the --out directory of `masksae evaluate`"
            )
    if not files:
        where = ", ".join(repr(str(p)) for p in paths)
        raise MasksaeError(
            f"no result JSON files under {where}: pass the --out directory of "
            "`masksae evaluate` (run it first) or its JSON files"
        )
    return sorted(set(files))
