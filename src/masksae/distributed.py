"""Several processes working on one harvest or one sweep, through torch.distributed.

Ranks are started by a launcher (``torchrun --nproc-per-node N -m masksae ...``,
``accelerate launch -m masksae ...``, on one node or many), which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables, or by ``--devices``, which
spawns one process per listed device on this machine with the same variables
(:func:`spawn_local`): both run the same code. :func:`init` joins the process group
(gloo for control messages; NCCL on top for CUDA training) and returns a
:class:`DistContext` with small collective helpers; a plain single-process command gets a
world of one and no process group at all.

Control messages (barriers, who holds the store lock, errors, results) use a gloo group on
the CPU with a long timeout: ranks may legitimately wait hours for each other (a rank
with a longer share of a sweep). A rank that dies is noticed by the launcher, which stops
the others; everything completed so far (store chunks, checkpoints) is kept.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from masksae.errors import ConfigError, MasksaeError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "MASKSAE_DIST_TIMEOUT_S"
"""Environment variable: seconds a rank waits for the others at a collective."""
DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass
class DistContext:
    """This process's place among the ranks (a world of one when not distributed)."""

    rank: int = 0
    """Global rank."""
    world: int = 1
    """Number of ranks."""
    local_rank: int = 0
    """Rank on this node (picks the GPU)."""
    group: Any = None
    """gloo process group for control messages (None in a world of one)."""
    owns_process_group: bool = False
    """True when :func:`init` created the default process group (and destroys it)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: creates and finalises stores, writes sweep-level files, shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def device_for(self, requested: str) -> str:
        """The device this rank uses for a ``--device`` value.

        ``auto`` and a bare ``cuda`` become ``cuda:<local rank>`` when CUDA is available
        (modulo the GPUs visible, so more ranks than GPUs share them); an explicit
        ``cuda:N`` or ``cpu`` is kept.
        """
        if not self.distributed:
            return requested
        import torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % max(1, torch.cuda.device_count())}"
        if requested == "auto":
            return "cpu"
        return requested


def launched_world() -> int:
    """``WORLD_SIZE`` set by a launcher (1 when none)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def timeout() -> timedelta:
    """The collective timeout (``MASKSAE_DIST_TIMEOUT_S``, default 24 h)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        return timedelta(seconds=float(text)) if text else timedelta(seconds=DEFAULT_TIMEOUT_S)
    except ValueError:
        raise ConfigError(
            f"{TIMEOUT_ENV}={text!r} is not a number of seconds: e.g. {TIMEOUT_ENV}=3600"
        ) from None


def init(*, cuda: bool = False) -> DistContext:
    """Join the launcher's process group (or create none in a world of one).

    ``cuda``: the ranks will run CUDA collectives (DDP on GPUs): the default group then
    gets NCCL for CUDA tensors (and gloo for CPU ones). Ranks other than 0 log warnings
    only.
    """
    import torch
    import torch.distributed as dist

    world = launched_world()
    owns = False
    if not dist.is_available():
        if world > 1:
            raise ConfigError(
                "WORLD_SIZE > 1 but this torch build has no torch.distributed: install a "
                "torch with distributed support"
            )
        return DistContext()
    if not dist.is_initialized():
        if world == 1:
            return DistContext()
        backend = "cpu:gloo,cuda:nccl" if cuda and torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend=backend, timeout=timeout())
        except ValueError as exc:  # rendezvous variables missing
            raise ConfigError(
                f"WORLD_SIZE={world} is set but the process group cannot start ({exc}): "
                "launch with torchrun or accelerate launch, or unset WORLD_SIZE"
            ) from None
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return DistContext(owns_process_group=owns)
    group = dist.new_group(backend="gloo", timeout=timeout())
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if rank != 0:
        logging.getLogger("masksae").setLevel(max(logging.WARNING, logging.getLogger().level))
    log.info("rank %d of %d (local rank %d) joined the process group", rank, world, local_rank)
    return DistContext(rank, world, local_rank, group, owns)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group created by :func:`init` (no-op otherwise)."""
    if ctx.owns_process_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def raise_first_failure(outcomes: list[Any], what: str) -> None:
    """Raise the error of the first failed rank (outcomes: None or (kind, message))."""
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            kind, message = outcome
            raise error_class(kind)(f"{what}: rank {rank} failed: {message}")


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(error class name, message) of an exception, to send to the other ranks."""
    if isinstance(exc, MasksaeError):
        return type(exc).__name__, str(exc)
    return "MasksaeError", f"{type(exc).__name__}: {exc}"


def error_class(name: str) -> type[MasksaeError]:
    """The masksae error class called ``name`` (MasksaeError if there is none)."""
    from masksae import errors

    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, MasksaeError) else MasksaeError


# ---------------------------------------------------------------------------- --devices
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawned_rank(
    rank: int,
    world: int,
    port: int,
    threads: int | None,
    entry: Callable[..., Any],
    args: tuple,
    devices: tuple[str, ...],
    results: Any,
) -> None:
    """Body of one process started by :func:`spawn_local`."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        result = entry(devices[rank], *args)
        if rank == 0:
            results.put(("ok", result))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", rank, *describe_failure(exc)))
        raise SystemExit(1) from None


def spawn_local(
    entry: Callable[..., Any], args: tuple, devices: tuple[str, ...] | list[str]
) -> Any:
    """Run ``entry(device, *args)`` in one process per device, as ranks 0..N-1 of a local
    process group (what ``torchrun --nproc-per-node N`` does); returns rank 0's result.

    CPU ranks share the machine's cores (threads split evenly). The first rank to fail
    stops the others; its error is raised here.
    """
    import queue

    import torch.multiprocessing as mp

    devices = tuple(devices)
    world = len(devices)
    n_cpu = sum(1 for d in devices if d.startswith("cpu"))
    threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu else None
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    log.info("spawning %d local ranks on %s", world, ",".join(devices))
    procs = mp.start_processes(
        _spawned_rank,
        args=(world, port, threads, entry, args, devices, results),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    failure: BaseException | None = None
    try:
        while not procs.join():
            pass
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a rank died: find out why below
        failure = exc
    messages = []
    try:
        while not results.empty():
            messages.append(results.get())
    except (OSError, EOFError, queue.Empty):
        pass
    errors = [m for m in messages if m[0] == "error"]
    if errors:
        _, rank, kind, message = errors[0]
        raise error_class(kind)(f"rank {rank} on {devices[rank]} failed: {message}")
    if failure is not None:
        raise MasksaeError(
            f"a rank of the {world}-process run on {','.join(devices)} died: {failure}. "
            "Completed work is kept: fix the cause and rerun the same command to resume"
        )
    for message in messages:
        if message[0] == "ok":
            return message[1]
    raise MasksaeError(f"rank 0 of the {world}-process run ended without a result")
