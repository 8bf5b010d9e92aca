"""Kantamneni et al.'s probing datasets, read from the ``sae-probes`` wheel's data files.

``pip install --no-deps sae-probes==0.4.2`` (``make setup`` does it) puts the data under
``site-packages/sae_probes/data/``: ``cleaned_data/<N>_<tag>.csv.zst`` (columns ``prompt``,
``target``, some also ``prompt_len``) and ``OOD data/<N>_<tag>_OOD.csv.zst``. The package
itself is never imported (its imports pull sae-lens and transformer-lens): the folder is found
with ``importlib.util.find_spec``, which does not execute it, and the files are decompressed
with ``zstandard``.

Labels follow the reference's encoding (scikit-learn's LabelEncoder in their
``utils_data.py``): a file's distinct target strings, sorted, are numbered 0, 1, ...
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import logging
import sys
from pathlib import Path

from masksae.evaluate.tasks.data import TaskUnavailableError

log = logging.getLogger(__name__)

PACKAGE = "sae_probes"
VERSION = "0.4.2"
"""The wheel whose files the registry's documented class counts describe."""
INSTALL_HINT = f"pip install --no-deps sae-probes=={VERSION} (make setup does it)"
CLEANED = "cleaned_data"
OOD = "OOD data"


def installed_version() -> str | None:
    """Version of the installed ``sae-probes`` distribution, None when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-probes")
    except PackageNotFoundError:
        return None


def data_dir() -> Path | None:
    """The package's ``data`` folder, or None when ``sae-probes`` is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if folder.is_dir() else None


def require_data_dir() -> Path:
    """:func:`data_dir`, or TaskUnavailableError saying how to install it."""
    folder = data_dir()
    if folder is None:
        raise TaskUnavailableError(
            f"the sae-probes probing datasets are not installed: {INSTALL_HINT}"
        )
    found = installed_version()
    if found is not None and found != VERSION:
        log.warning(
            "sae-probes %s is installed; the task registry documents %s (class counts may differ)",
            found,
            VERSION,
        )
    return folder


def dataset_path(stem: str, *, ood: bool = False) -> Path:
    """The zstd CSV of dataset ``stem`` (``5_hist_fig_ismale``); OOD files add ``_OOD``."""
    folder = require_data_dir()
    path = folder / OOD / f"{stem}_OOD.csv.zst" if ood else folder / CLEANED / f"{stem}.csv.zst"
    if not path.is_file():
        where = OOD if ood else CLEANED
        raise TaskUnavailableError(
            f"sae-probes has no dataset {stem!r} in {where!r} ({path}): check the name with "
            "`masksae tasks list` or reinstall: " + INSTALL_HINT
        )
    return path


@functools.lru_cache(maxsize=32)
def read_rows(path: str) -> tuple[tuple[str, str], ...]:
    """``(prompt, target)`` of every row of a zstd CSV, in file order (cached per path)."""
    import zstandard

    csv.field_size_limit(sys.maxsize)
    with open(path, "rb") as fh:
        raw = zstandard.ZstdDecompressor().stream_reader(fh).read()
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    if reader.fieldnames is None or not {"prompt", "target"} <= set(reader.fieldnames):
        raise TaskUnavailableError(
            f"{path} has columns {reader.fieldnames}, expected 'prompt' and 'target'"
        )
    return tuple((row["prompt"], row["target"]) for row in reader)


def rows(stem: str, *, ood: bool = False) -> tuple[tuple[str, str], ...]:
    """``(prompt, target)`` rows of dataset ``stem`` (its OOD test file with ``ood``)."""
    return read_rows(str(dataset_path(stem, ood=ood)))


def encode_labels(targets: list[str] | tuple[str, ...]) -> tuple[list[int], list[str]]:
    """The reference's LabelEncoder rule: (codes, sorted distinct targets)."""
    classes = sorted(set(targets))
    index = {c: i for i, c in enumerate(classes)}
    return [index[t] for t in targets], classes


def dataset_stems(*, ood: bool = False) -> list[str]:
    """Every dataset stem in the installed package (OOD test files with ``ood``)."""
    folder = data_dir()
    if folder is None:
        return []
    sub, suffix = (OOD, "_OOD.csv.zst") if ood else (CLEANED, ".csv.zst")
    names = sorted(p.name[: -len(suffix)] for p in (folder / sub).glob(f"*{suffix}"))
    return sorted(names, key=lambda n: (int(n.split("_")[0]) if n[0].isdigit() else 10**6, n))
