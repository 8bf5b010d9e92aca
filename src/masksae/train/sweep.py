"""Open a store and train a sweep on it (the library form of ``masksae train``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from masksae.errors import StoreError
from masksae.train.config import RunSpec, SweepConfig, TrainConfig

log = logging.getLogger(__name__)


def open_store(path: str | Path, *, verify: bool = False) -> Any:
    """Open a complete store for training; with ``verify`` check every chunk's checksum."""
    from masksae.storage import ActivationStore

    store = ActivationStore.open(path, require_complete=True)
    if verify:
        problems = store.verify()
        if problems:
            shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
            raise StoreError(
                f"activation store {path} failed verification ({len(problems)} problem(s)):\n  "
                f"{shown}\nrerun the harvest command that created it to rewrite the bad chunks"
            )
    return store


def single_run(sae: dict[str, Any], *, lr: float | None, seed: int) -> RunSpec:
    """A one-SAE 'sweep' (CLI flags without --config)."""
    from masksae.train.config import run_name

    return RunSpec(run_name(sae, lr, seed), sae, lr, seed)


def train_sweep(
    store_path: str | Path,
    sweep: SweepConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    verify: bool = False,
) -> Any:
    """Train every run of ``sweep`` on the store at ``store_path`` in one pass."""
    from masksae.train.trainer import Trainer

    store = open_store(store_path, verify=verify)
    runs = sweep.runs()
    log.info("training %d SAE(s) on %s: %s", len(runs), store_path, ", ".join(r.name for r in runs))
    trainer = Trainer(store, runs, sweep.train, out_dir, resume=resume, progress=progress)
    return trainer.train()


__all__ = ["SweepConfig", "TrainConfig", "open_store", "single_run", "train_sweep"]
