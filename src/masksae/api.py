"""The notebook API: thin functions over the stage runners (exported by ``import masksae``).

>>> import masksae
>>> masksae.harvest(out="store", tokens=4096, layer=15)
>>> masksae.train("store", "runs", sae={"architecture": "batch_topk", "d_sae": 1024, "k": 20},
...               steps=200, warmup_steps=20)
>>> results = masksae.evaluate(["runs"], "results", metrics=("core",))
>>> store = masksae.open_store("store")
>>> sae, meta = masksae.load_sae("runs/batch_topk-k20-F1024-s0")

Each function takes either the stage's dataclass config or its fields as keyword arguments
(not both); nothing here imports torch until a function is called.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from masksae.errors import ConfigError


def _config(cls: type, config: Any, fields: dict[str, Any], what: str) -> Any:
    """``config`` itself, or ``cls(**fields)``; ConfigError naming unknown fields."""
    if config is not None:
        if fields:
            raise ConfigError(
                f"{what}: give a {cls.__name__} or keyword fields, not both "
                f"(got also {sorted(fields)}): use dataclasses.replace(config, ...)"
            )
        if not isinstance(config, cls):
            raise ConfigError(f"{what}: expected a {cls.__name__}, got {type(config).__name__}")
        return config
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ConfigError(
            f"{what}: unknown field(s) {unknown} of {cls.__name__}: choose from {sorted(names)}"
        )
    return cls(**fields)


def open_store(path: str | Path, **kwargs: Any) -> Any:
    """Open the activation store at ``path`` (a directory or URL) read-only.

    ``kwargs`` go to :meth:`masksae.storage.ActivationStore.open` (``require_complete``,
    ``storage_options``, ``cache_dir``, ...).
    """
    from masksae.storage import ActivationStore

    return ActivationStore.open(path, **kwargs)


def load_sae(path: str | Path, *, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Load a run or checkpoint directory -> ``(sae, meta)`` (the SAE acts on raw activations)."""
    from masksae.train.checkpoint import load_sae as _load_sae

    return _load_sae(path, device=device)


def harvest(config: Any = None, /, *, progress: bool = True, **fields: Any) -> Any:
    """Harvest (or resume) an activation store; returns a ``HarvestResult``.

    ``config`` is a :class:`masksae.harvest.HarvestConfig`, or pass its fields
    (``out="store", tokens=4096, layer=15, mask_prob=0.3, ...``).
    """
    from masksae.harvest.config import HarvestConfig
    from masksae.harvest.runner import run_harvest

    return run_harvest(_config(HarvestConfig, config, fields, "harvest"), progress=progress)


def train(
    store: str | Path,
    out: str | Path,
    sweep: Any = None,
    *,
    sae: dict[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None,
    resume: bool = False,
    progress: bool = True,
    verify: bool = False,
    **train_fields: Any,
) -> Any:
    """Train one SAE or a sweep on ``store``, writing one run directory per SAE under ``out``.

    ``sweep`` is a :class:`masksae.train.SweepConfig` or the path of a sweep TOML file;
    otherwise ``sae`` (SAE config dict, e.g. ``{"architecture": "batch_topk", "d_sae": 1024,
    "k": 20}``), an optional ``grid`` and ``TrainConfig`` fields (``steps=200, ...``) make
    one. Returns the ``TrainSummary``.
    """
    from masksae.train.config import SweepConfig, TrainConfig, load_sweep
    from masksae.train.sweep import train_sweep

    if sweep is not None:
        if sae is not None or grid is not None or train_fields:
            raise ConfigError(
                "train: give a sweep (SweepConfig or TOML path) or sae=/grid=/TrainConfig "
                "fields, not both"
            )
        if isinstance(sweep, (str, Path)):
            sweep = load_sweep(sweep)
        elif not isinstance(sweep, SweepConfig):
            raise ConfigError(
                f"train: sweep must be a SweepConfig or a TOML path, got {type(sweep).__name__}"
            )
    else:
        if sae is None:
            raise ConfigError(
                'train: no SAE given: pass sae={"architecture": "batch_topk", "d_sae": 1024, '
                '"k": 20} (or a sweep)'
            )
        cfg = _config(TrainConfig, None, train_fields, "train")
        sweep = SweepConfig(train=cfg, sae=dict(sae), grid=dict(grid or {}))
    return train_sweep(store, sweep, out, resume=resume, progress=progress, verify=verify)


def evaluate(
    checkpoints: str | Path | Sequence[str | Path],
    out: str | Path,
    config: Any = None,
    /,
    *,
    overwrite: bool = False,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Score checkpoints (run, checkpoint or sweep directories); returns their result
    documents (also written as ``out/<name>.json``, see ``masksae evaluate``).

    ``config`` is a :class:`masksae.evaluate.runner.EvaluateConfig`, or pass its fields
    (``metrics=("core",), cache_dir="cache", device="cpu", ...``). Results already in
    ``out`` with the same settings are reused unless ``overwrite``.
    """
    from masksae.evaluate.discover import find_checkpoints
    from masksae.evaluate.runner import EvaluateConfig, evaluate_checkpoints

    cfg = _config(EvaluateConfig, config, fields, "evaluate")
    roots = (
        [Path(checkpoints)]
        if isinstance(checkpoints, (str, Path))
        else list(map(Path, checkpoints))
    )
    found = find_checkpoints(roots)
    paths = evaluate_checkpoints(found, Path(out), cfg, roots=roots, overwrite=overwrite)
    return [json.loads(Path(p).read_text()) for p in paths]


__all__ = ["evaluate", "harvest", "load_sae", "open_store", "train"]
