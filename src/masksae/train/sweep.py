"""Open a store and train a sweep on it (the library form of ``masksae train``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from masksae.errors import ConfigError, StoreError
from masksae.train.config import RunSpec, SweepConfig, TrainConfig

log = logging.getLogger(__name__)


def open_store(
    path: str | Path,
    *,
    verify: bool = False,
    train: TrainConfig | None = None,
) -> Any:
    """Open a complete store for training; with ``verify`` check every chunk's checksum.

    ``train`` supplies the remote-store settings (storage options, chunk cache folder and
    size limit).
    """
    from masksae.storage import ActivationStore
    from masksae.storage.cache import parse_size

    train = train or TrainConfig()
    store = ActivationStore.open(
        path,
        require_complete=True,
        storage_options=train.storage_options,
        cache_dir=train.cache_dir,
        cache_bytes=parse_size(train.cache_size),
    )
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
    runs: list[RunSpec] | None = None,
) -> Any:
    """Train every run of ``sweep`` (or ``runs``) on the store at ``store_path`` in one pass.

    Under a launcher (torchrun, accelerate launch) this process is one rank of the sweep;
    with several ``sweep.train.devices`` one rank per device is spawned here (the same code
    path). Returns the TrainSummary of every run.
    """
    import dataclasses

    from masksae import distributed

    devices = sweep.train.devices
    if devices is not None and len(devices) > 1:
        if distributed.launched_world() > 1:
            raise ConfigError(
                "--devices spawns its own ranks: do not combine it with torchrun or "
                "accelerate launch (use --device there; each rank takes its local GPU)"
            )
        one = dataclasses.replace(
            sweep, train=dataclasses.replace(sweep.train, devices=None, device="cpu")
        )
        return distributed.spawn_local(
            _train_on_device,
            (str(store_path), one, str(out_dir), resume, progress, verify, runs),
            tuple(devices),
        )
    device = (devices or [sweep.train.device])[0]
    ctx = distributed.init(cuda=device.startswith("cuda") or device == "auto")
    try:
        return _train_rank(store_path, sweep, out_dir, resume, progress, verify, runs, ctx)
    finally:
        distributed.shutdown(ctx)


def _train_on_device(
    device: str,
    store_path: str,
    sweep: SweepConfig,
    out_dir: str,
    resume: bool,
    progress: bool,
    verify: bool,
    runs: list[RunSpec] | None,
) -> Any:
    """Entry point of a rank spawned by ``--devices`` (runs in the child process)."""
    import dataclasses

    train = dataclasses.replace(sweep.train, device=device, devices=None)
    return train_sweep(
        store_path,
        dataclasses.replace(sweep, train=train),
        out_dir,
        resume=resume,
        progress=progress,
        verify=verify,
        runs=runs,
    )


def _train_rank(
    store_path: str | Path,
    sweep: SweepConfig,
    out_dir: str | Path,
    resume: bool,
    progress: bool,
    verify: bool,
    runs: list[RunSpec] | None,
    ctx: Any,
) -> Any:
    from masksae.distributed import describe_failure, raise_first_failure
    from masksae.train.trainer import Trainer

    # rank 0 verifies the store once; every rank opens it (remote: its own chunk cache)
    failure = None
    try:
        store = open_store(store_path, verify=verify and ctx.is_main, train=sweep.train)
    except Exception as exc:
        if not ctx.distributed:
            raise
        failure = describe_failure(exc)
    raise_first_failure(ctx.gather(failure), f"opening the store {store_path}")
    runs = sweep.runs() if runs is None else runs
    if ctx.is_main:
        log.info(
            "training %d SAE(s) on %s: %s", len(runs), store_path, ", ".join(r.name for r in runs)
        )
    # strict: a run too short for its explicit recipe is refused before anything is written
    trainer = Trainer(
        store,
        runs,
        sweep.train,
        out_dir,
        resume=resume,
        progress=progress,
        dist=ctx,
        strict_recipe=True,
    )
    return trainer.train()


__all__ = ["SweepConfig", "TrainConfig", "open_store", "single_run", "train_sweep"]
