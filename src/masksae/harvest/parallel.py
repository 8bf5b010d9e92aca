"""Multi-device harvest: one worker process per device, all writing chunks of one store.

The parent validates the configuration (loading only the model's config and tokenizer, on
the meta device), creates or resumes the store and holds its writer lock for the whole run.
Worker ``rank`` of ``n`` (spawned with ``torch.multiprocessing``, one per ``--devices``
entry) loads the model on its device and computes the chunks with ``index % n == rank``
that are not complete yet, writing each chunk's data files and completion record through
:meth:`StoreWriter.attach` (which checks that the parent holds the lock and that the
worker's settings equal the store's). Chunks are disjoint sets of files, so the workers
never touch the same file. The mask draw is a pure function of (seed, sequence index) and
the norm-outlier rule looks only at a chunk's own activations, so the store equals a
single-process harvest (bit-exact on CPU). The parent aggregates progress (tokens/s over
all workers) and, once every worker is done, finalises the store (statistics, fingerprint,
``complete``). A failed worker stops the others; completed chunks are kept, and rerunning
the same command resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time
from dataclasses import dataclass
from typing import Any

from masksae.errors import ConfigError, MasksaeError
from masksae.harvest.config import HarvestConfig
from masksae.harvest.runner import (
    ChunkCounts,
    HarvestResult,
    harvest_chunks,
    log_done,
    log_start,
    make_result,
    plan_harvest,
)

log = logging.getLogger(__name__)

_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerTask:
    """What one worker process does."""

    cfg: HarvestConfig
    """The harvest configuration (``device`` set to this worker's device, no ``devices``)."""
    rank: int
    """Index of this worker: it computes the chunks with index % world == rank."""
    world: int
    """Number of workers."""
    owner_pid: int
    """Pid of the parent, which holds the store's writer lock."""
    torch_threads: int
    """CPU threads for torch in this worker (CPU workers share the machine's cores)."""


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


def run_parallel_harvest(cfg: HarvestConfig, *, progress: bool = True) -> HarvestResult:
    """Harvest ``cfg`` with one worker process per device of ``cfg.devices``."""
    import torch.multiprocessing as mp
    from tqdm.auto import tqdm

    from masksae.models import load_model
    from masksae.storage import StoreWriter

    devices = parse_devices(cfg.devices)
    world = len(devices)
    lm = load_model(cfg.model, dtype=cfg.dtype, device="cpu", weights=False)
    plan = plan_harvest(dataclasses.replace(cfg, device="cpu", devices=()), lm=lm)
    spec = plan.store_spec()
    writer = StoreWriter.open(cfg.out, spec)
    completed = writer.completed_chunks
    n_chunks = writer.n_chunks
    done_tokens = sum(spec.chunk_bounds(i)[1] - spec.chunk_bounds(i)[0] for i in completed)
    log_start(plan, n_chunks, len(completed))
    ranks = sorted({i % world for i in range(n_chunks) if i not in completed})
    n_cpu = sum(1 for d in devices if d.startswith("cpu"))
    threads = max(1, (os.cpu_count() or 1) // max(1, n_cpu))
    log.info(
        "multi-device harvest on %s: %d worker(s) with pending chunks",
        ",".join(devices),
        len(ranks),
    )
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    workers = {
        rank: ctx.Process(
            target=worker_main,
            args=(
                WorkerTask(
                    cfg=dataclasses.replace(cfg, device=devices[rank], devices=()),
                    rank=rank,
                    world=world,
                    owner_pid=os.getpid(),
                    torch_threads=threads,
                ),
                messages,
            ),
            name=f"masksae-harvest-{rank}-{devices[rank]}",
            daemon=True,
        )
        for rank in ranks
    }
    bar = tqdm(
        total=plan.total_tokens,
        initial=done_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"harvest x{world}",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    start = time.perf_counter()
    counts = ChunkCounts()
    failure: str | None = None
    failure_kind = "MasksaeError"
    finished = False
    try:
        for proc in workers.values():
            proc.start()
        pending = set(workers)
        seen_dead: dict[int, int] = {}
        while pending and failure is None:
            try:
                msg = messages.get(timeout=_POLL_S)
            except queue.Empty:
                msg = None
            if msg is not None:
                kind, rank = msg[0], msg[1]
                if kind == "tokens":
                    bar.update(msg[2])
                elif kind == "done":
                    counts.add(ChunkCounts(**msg[2]))
                    pending.discard(rank)
                elif kind == "error":
                    failure_kind = msg[2]
                    failure = f"worker {rank} on {devices[rank]} failed: {msg[3]}"
                continue
            for rank in list(pending):  # died without a word (killed, out of memory, ...)
                if workers[rank].exitcode is None:
                    continue
                # its last message may still be in flight: wait for a second quiet poll
                seen_dead[rank] = seen_dead.get(rank, 0) + 1
                if seen_dead[rank] >= 2:
                    failure = (
                        f"worker {rank} on {devices[rank]} exited with code "
                        f"{workers[rank].exitcode} before finishing its chunks"
                    )
                    break
        finished = failure is None
    finally:
        for proc in workers.values():
            if proc.is_alive() and not finished:
                proc.terminate()
        for proc in workers.values():
            if proc.pid is not None:
                proc.join(timeout=60)
        bar.close()
        writer.close()  # finalises from the completion records on disk; releases the lock
    seconds = time.perf_counter() - start
    if failure is not None:
        raise _error_class(failure_kind)(
            f"{failure}. Completed chunks are kept: fix the cause and rerun the same command "
            "to resume"
        )
    result = make_result(plan, counts, n_chunks, len(completed), seconds)
    log_done(result)
    return result


def _error_class(name: str) -> type[MasksaeError]:
    from masksae import errors

    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, MasksaeError) else MasksaeError


def worker_main(task: WorkerTask, messages: Any) -> None:
    """Entry point of a worker process (see the module docstring)."""
    import torch

    from masksae.errors import StoreError
    from masksae.storage import StoreWriter

    rank = task.rank
    try:
        logging.basicConfig(
            level=logging.WARNING, format=f"%(levelname)s worker {rank}: %(message)s"
        )
        if task.cfg.device.startswith("cpu"):
            torch.set_num_threads(task.torch_threads)
        plan = plan_harvest(task.cfg, check_corpus=False)
        writer = StoreWriter.attach(task.cfg.out, plan.store_spec(), owner_pid=task.owner_pid)

        def parent_alive(index: int) -> None:
            if os.getppid() != task.owner_pid:
                raise StoreError(
                    f"parent process {task.owner_pid} is gone; stopping before chunk {index}"
                )

        with writer:
            counts = harvest_chunks(
                plan,
                writer,
                owned=lambda i: i % task.world == rank,
                on_tokens=lambda n: messages.put(("tokens", rank, int(n))),
                before_chunk=parent_alive,
            )
        messages.put(("done", rank, dataclasses.asdict(counts)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        kind = type(exc).__name__ if isinstance(exc, MasksaeError) else "MasksaeError"
        detail = str(exc) if isinstance(exc, MasksaeError) else f"{type(exc).__name__}: {exc}"
        messages.put(("error", rank, kind, detail))
        raise SystemExit(1) from None
