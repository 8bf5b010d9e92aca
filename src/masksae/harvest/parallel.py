"""Harvest on several ranks (torch.distributed), all writing chunks of one store.

Ranks come from a launcher (``torchrun --nproc-per-node N -m masksae harvest ...`` or
``accelerate launch -m masksae harvest ...``, on any number of nodes sharing the store's
filesystem or object store) or from ``--devices cuda:0,cuda:1``, which spawns one local
rank per device (:func:`masksae.distributed.spawn_local`): one implementation.

Every rank first makes the checks that need no weights (the model's config and tokenizer
only: layer, compression, provenance against an existing store; rank 0 also sizes the
corpus), as a single-process harvest does, and the ranks share their outcomes: one refusal
fails every rank, and a store that is already complete on every rank ends the run on all of
them, before any rank loads the weights. Then rank 0 creates or resumes the store and holds
its writer lock for the whole run; it broadcasts the lock's owner token and the chunks already complete, and
the other ranks wait for that (the broadcast is the barrier), then attach to the store
under rank 0's lock (:meth:`StoreWriter.attach` checks the token and that their settings
equal the store's). The pending chunks are dealt round-robin over the ranks; each rank
computes its chunks and writes their data files and completion records (chunks are
disjoint sets of files). The mask draw is a pure function of (seed, sequence index) and
the norm-outlier rule looks only at a chunk's own activations, so the store equals a
single-process harvest (bit-exact on CPU). Every rank then reports its counts or its
error; rank 0 finalises the store (statistics, fingerprint, ``complete``) from the
completion records. A failed rank fails the run on every rank; completed chunks are kept
and rerunning the same command resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from masksae.errors import ConfigError
from masksae.harvest.config import HarvestConfig
from masksae.harvest.corruption import adopt_noise_record
from masksae.harvest.runner import (
    ChunkCounts,
    HarvestResult,
    harvest_chunks,
    log_done,
    log_start,
    make_result,
    plan_harvest,
    precheck,
)

log = logging.getLogger(__name__)


def parse_devices(devices: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """``"cuda:0,cuda:1"`` or a sequence -> validated device names; ConfigError naming a bad one."""
    from masksae.devices import resolve_device

    items = devices.split(",") if isinstance(devices, str) else list(devices)
    names = tuple(item.strip() for item in items if item.strip())
    if not names:
        raise ConfigError(
            f"--devices {devices!r} names no device: use e.g. cuda:0,cuda:1 or cpu,cpu"
        )
    for name in names:
        if name == "auto":
            raise ConfigError(
                "--devices takes explicit devices (cuda:0,cuda:1, cpu,cpu), not 'auto'"
            )
        device = resolve_device(name)
        if device.type == "cuda":
            import torch

            index = device.index if device.index is not None else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise ConfigError(
                    f"device {name!r} does not exist: this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s), cuda:0.."
                    f"cuda:{torch.cuda.device_count() - 1}"
                )
    return names


def harvest_on_device(device: str, cfg: HarvestConfig, progress: bool) -> HarvestResult:
    """Entry point of a rank spawned by ``--devices`` (runs in the child process)."""
    from masksae.harvest.runner import run_harvest

    return run_harvest(dataclasses.replace(cfg, device=device, devices=()), progress=progress)


def run_distributed_harvest(
    cfg: HarvestConfig, ctx: Any, *, lm: Any = None, progress: bool = True
) -> HarvestResult:
    """This rank's part of the harvest ``cfg`` (see the module docstring)."""
    from tqdm.auto import tqdm

    from masksae.distributed import describe_failure, raise_first_failure
    from masksae.storage import StoreWriter

    cfg = dataclasses.replace(cfg, device=ctx.device_for(cfg.device))
    if lm is not None:
        raise ConfigError("a distributed harvest loads the model in each rank: pass no lm")
    what = f"harvest into {cfg.out}"
    # the checks that need no weights, on every rank (rank 0 alone reads the whole corpus)
    done, complete = _agreed(
        ctx, lambda: precheck(cfg, check_corpus=ctx.is_main), what, lambda r: r is not None
    )
    if all(complete):  # nothing to compute: no rank loads the weights
        if ctx.is_main:
            log_done(done)
        return done
    # ranks that disagree on completeness (the store finished meanwhile) carry on together:
    # rank 0 opens the store below and deals out what is still pending
    plan, _ = _agreed(ctx, lambda: plan_harvest(cfg, check_corpus=False), what)
    if plan.corruption is not None and plan.corruption.kind == "noise":
        # each rank measured the noise scale with its own forward pass: adopt rank 0's, so
        # every rank records and draws the same sigma (floating point differs across devices)
        adopt_noise_record(plan, ctx.broadcast(plan.corruption_record))
    spec = plan.store_spec()
    writer = None
    opened: tuple[Any, ...] | None = None
    if ctx.is_main:
        try:
            writer = StoreWriter.open(
                cfg.out, spec, storage_options=cfg.storage_options, break_lock=cfg.break_lock
            )
            opened = ("ok", writer.lock_owner, sorted(writer.completed_chunks))
        except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then raised
            opened = ("error", *describe_failure(exc))
            ctx.broadcast(opened)
            raise
    opened = ctx.broadcast(opened)
    if opened[0] == "error":
        raise_first_failure([opened[1:]], f"harvest into {cfg.out}")
    _, owner, completed_list = opened
    completed = set(completed_list)
    if writer is None:
        writer = StoreWriter.attach(cfg.out, spec, owner=owner, storage_options=cfg.storage_options)
    n_chunks = spec.n_chunks
    pending = [i for i in range(n_chunks) if i not in completed]
    mine = set(pending[ctx.rank :: ctx.world])
    if ctx.is_main:
        log_start(plan, n_chunks, len(completed))
        log.info(
            "harvest on %d ranks: rank 0 computes %d of %d pending chunks",
            ctx.world,
            len(mine),
            len(pending),
        )
    my_tokens = sum(spec.chunk_bounds(i)[1] - spec.chunk_bounds(i)[0] for i in mine)
    bar = tqdm(
        total=my_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"harvest rank 0/{ctx.world}",
        disable=not (progress and ctx.is_main),
        dynamic_ncols=True,
        smoothing=0.1,
    )
    start = time.perf_counter()
    failure = None
    counts = ChunkCounts()
    try:
        counts = harvest_chunks(plan, writer, owned=mine.__contains__, on_tokens=bar.update)
        writer.flush()
    except Exception as exc:  # noqa: BLE001 - every rank learns about it below
        failure = describe_failure(exc)
    finally:
        bar.close()
    outcomes = ctx.gather((failure, dataclasses.asdict(counts)))
    try:
        writer.close()  # rank 0: finalises from the completion records every rank wrote
    finally:
        ctx.barrier()  # nobody returns before the store is final
    raise_first_failure([o[0] for o in outcomes], f"harvest into {cfg.out}")
    total = ChunkCounts()
    for _failure, part in outcomes:
        total.add(ChunkCounts(**part))
    result = make_result(plan, total, n_chunks, len(completed), time.perf_counter() - start)
    if ctx.is_main:
        log_done(result)
    return result


def _agreed(
    ctx: Any, step: Callable[[], Any], what: str, summary: Callable[[Any], Any] = lambda _v: None
) -> tuple[Any, list[Any]]:
    """Run ``step`` on every rank and share the outcomes: when any rank failed, every rank
    raises that rank's error (none is left waiting at a later collective). Returns this
    rank's value and every rank's ``summary(value)``, in rank order."""
    from masksae.distributed import describe_failure, raise_first_failure

    value, outcome = None, None
    try:
        value = step()
    except Exception as exc:  # noqa: BLE001 - every rank learns about it below
        log.debug("rank %d: %s failed", ctx.rank, what, exc_info=True)
        outcome = describe_failure(exc)
    outcomes = ctx.gather((outcome, None if outcome else summary(value)))
    raise_first_failure([o[0] for o in outcomes], what)
    return value, [o[1] for o in outcomes]
