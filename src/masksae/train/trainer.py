"""The training loop: several SAEs trained from one pass over an activation store.

Each batch is read once from ``store.stream(...)`` and fed to every SAE of the sweep; each
SAE keeps its own optimizer, lr schedule, RNG state and dead-latent counters, so a sweep
gives exactly the weights that training each SAE alone (same seeds) would.

Per step and SAE (the dictionary_learning recipe): ``training_loss`` -> backward ->
remove the decoder-parallel gradient -> clip -> Adam -> lr schedule -> renormalise decoder
rows -> update dead-latent counters (AuxK already saw them as they stand after this batch,
the reference's order; see ``_Run._dead_candidates``). b_dec starts at the geometric median
of the first batch. ``tests/test_train_reference_equivalence.py`` holds this loop to a
transcription of the reference's update rule.

Ranks (``torchrun``/``accelerate launch -m masksae train``, or ``--devices``, which spawns
one local rank per device: see :mod:`masksae.distributed`): with ``TrainConfig.distributed``
= "runs" each rank trains its share of the sweep (runs i with i % world == rank), reading
the same deterministic stream; with "data" every run is wrapped in DDP and each rank steps
on a 1/world slice of every batch (only rank 0 writes files). Interrupts: a first Ctrl-C
(SIGINT, main thread only) finishes the current step, writes a checkpoint of it and then
raises KeyboardInterrupt; a KeyboardInterrupt raised between steps (e.g. from ``on_step``)
does the same, so ``--resume`` continues from exactly where the run stopped. A second
Ctrl-C stops at once (the last checkpoint written is then used).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from masksae import __version__
from masksae.atomic import atomic_write_json
from masksae.config import to_dict
from masksae.devices import resolve_device
from masksae.distributed import DistContext, describe_failure, raise_first_failure
from masksae.errors import CheckpointError, ConfigError, MasksaeError, StoreError
from masksae.train import checkpoint as ckpt
from masksae.train.config import (
    OPERATIONAL_FIELDS,
    RunSpec,
    TrainConfig,
    check_recipe_fits,
    fit_recipe_to_run,
    resolve_select_dtype,
)
from masksae.train.metrics_log import (
    JsonlLog,
    MetricsLog,
    TensorBoardLog,
    WandbLog,
    check_sinks_available,
    read_metrics,
)
from masksae.train.optim import clip_grad_norm, make_adam
from masksae.train.schedules import make_schedule, make_scheduler

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT_VERSION = 1
#: OSError numbers meaning "the output folder cannot take this write"
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
LOCK_FILE = ".train.lock"
"""flock held by the process training into an output folder (released when it exits)."""


class TrainingDivergedError(MasksaeError):
    """The loss or the input became NaN/inf."""


@dataclass
class RunResult:
    """Outcome of one SAE of a sweep."""

    name: str
    """Run name (its directory under the output folder)."""
    path: Path
    """Run directory (load it with ``masksae.train.load_sae``)."""
    step: int
    """Steps trained."""
    last_metrics: dict[str, Any] = field(default_factory=dict)
    """The last logged metrics record."""


@dataclass
class TrainSummary:
    """What ``Trainer.train`` returns."""

    runs: list[RunResult]
    """One entry per SAE."""
    total_steps: int
    """Planned steps (== steps done)."""
    steps_this_session: int
    """Steps run by this call (less than total_steps after a resume)."""
    wall_s: float
    """Time spent in the step loop by this call."""
    data_wait_s: float
    """Part of ``wall_s`` spent waiting for the next batch."""

    @property
    def data_wait_frac(self) -> float:
        return self.data_wait_s / self.wall_s if self.wall_s > 0 else 0.0


# ---------------------------------------------------------------------------- setup helpers
def resolve_sae_configs(runs: Sequence[RunSpec], d_model: int) -> list[Any]:
    """SAE config objects for ``runs`` (d_in defaults to the store's d_model; validated)."""
    from masksae.train.sae import sae_config_from_dict

    configs = []
    for run in runs:
        data = dict(run.sae)
        d_in = data.setdefault("d_in", d_model)
        if d_in != d_model:
            raise ConfigError(
                f"run {run.name}: SAE d_in = {d_in} but the store's activations have "
                f"d_model = {d_model}; drop d_in from the SAE config (it defaults to the "
                f"store's d_model) or set d_in = {d_model}"
            )
        try:
            configs.append(sae_config_from_dict(data))
        except ConfigError as exc:
            raise ConfigError(f"run {run.name}: {exc}") from None
    return configs


def resolve_train_device(cfg: TrainConfig, dist: DistContext) -> torch.device:
    """The device this rank trains on (``device``, made per-rank under a launcher)."""
    if cfg.devices is not None and len(cfg.devices) > 1:
        raise ConfigError(
            f"train.devices = {cfg.devices}: several devices are spawned as ranks by "
            "`masksae train --devices` (masksae.train.sweep.train_sweep); a Trainer trains "
            "one rank on one device"
        )
    name = cfg.devices[0] if cfg.devices else cfg.device
    name = dist.device_for(name)
    device = resolve_device(name)
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ConfigError(
                f"device {name!r} requested but this machine has {count} CUDA device(s) "
                f"(cuda:0 .. cuda:{count - 1}): fix --device/--devices"
            )
    return device


def distribution_mode(cfg: TrainConfig, n_runs: int, dist: DistContext) -> str:
    """ "single" (one rank), "runs" (the sweep's runs spread over the ranks) or "data" (DDP)."""
    if not dist.distributed:
        return "single"
    mode = cfg.distributed
    if mode == "auto":
        mode = "data" if n_runs == 1 else "runs"
    if mode == "data" and cfg.batch_size % dist.world:
        raise ConfigError(
            f"train.batch_size = {cfg.batch_size} does not divide over {dist.world} ranks for "
            f"data-parallel training: use a multiple of {dist.world}"
        )
    if mode == "runs" and n_runs < dist.world:
        log.warning(
            "%d run(s) over %d ranks: %d rank(s) have nothing to train (set "
            'distributed = "data" to train each run data-parallel instead)',
            n_runs,
            dist.world,
            dist.world - n_runs,
        )
    return mode


class _LossModule(torch.nn.Module):
    """``forward`` = the SAE's training loss, so DDP can wrap it (DDP hooks ``forward``)."""

    def __init__(self, sae: torch.nn.Module) -> None:
        super().__init__()
        self.sae = sae

    def forward(self, x_BD: torch.Tensor, ctx: Any) -> Any:
        return self.sae.training_loss(x_BD, ctx)


def plan_steps(store: Any, cfg: TrainConfig) -> tuple[int, int]:
    """(total steps, stream epochs) for ``cfg`` on ``store``."""
    per_epoch = store.batches_per_epoch(cfg.batch_size, include_masked=cfg.include_masked_positions)
    if per_epoch < 1:
        usable = store.count_tokens(include_masked=cfg.include_masked_positions)
        raise ConfigError(
            f"the store {store.path} has {usable} usable tokens, fewer than one batch of "
            f"batch_size = {cfg.batch_size}: lower batch_size or harvest more tokens"
        )
    if cfg.steps is not None:
        total = cfg.steps
    elif cfg.tokens is not None:
        total = cfg.tokens // cfg.batch_size
        if total < 1:
            raise ConfigError(
                f"train.tokens = {cfg.tokens} is less than one batch "
                f"({cfg.batch_size}): raise tokens or lower batch_size"
            )
    else:
        total = per_epoch
    return total, math.ceil(total / per_epoch)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def sweep_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two sweep manifests (operational keys ignored)."""

    def comparable(manifest: dict[str, Any]) -> dict[str, Any]:
        train = {k: v for k, v in manifest.get("train", {}).items() if k not in OPERATIONAL_FIELDS}
        return {
            "train": train,
            "runs": manifest.get("runs"),
            "store_fingerprint": manifest.get("store_fingerprint"),
            "total_steps": manifest.get("total_steps"),
        }

    a, b = _flatten(comparable(old)), _flatten(comparable(new))
    return [
        f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key, "<unset>") != b.get(key, "<unset>")
    ]


# ---------------------------------------------------------------------------- per-run state
class _Run:
    """One SAE of the sweep with its optimizer, schedule, RNG and dead counters."""

    def __init__(
        self,
        spec: RunSpec,
        sae_cfg: Any,
        train: TrainConfig,
        total_steps: int,
        device: torch.device,
        out_dir: Path,
        *,
        data_parallel: bool = False,
    ) -> None:
        from masksae.train.sae import build_sae

        self.spec = spec
        self.dir = out_dir / spec.name
        self.lr = spec.resolved_lr(train)
        self.train = train
        self.train_dict = to_dict(dataclasses.replace(train, lr=self.lr, seed=spec.seed))
        self.device = device
        torch.manual_seed(spec.seed)
        self.sae = build_sae(sae_cfg).to(device)
        self.rng_state = torch.get_rng_state()
        self.cuda_rng_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.optimizer = make_adam(self.sae.parameters(), self.lr, tuple(train.adam_betas), device)
        #: "float32" or "bfloat16": the fused step's selection product on this device
        self.select_dtype = resolve_select_dtype(train.select_dtype, device)
        #: DDP wrapper of the training loss (data-parallel ranks), else None
        self.loss_module: Any = None
        if data_parallel:
            from torch.nn.parallel import DistributedDataParallel

            self.loss_module = DistributedDataParallel(
                _LossModule(self.sae),
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=True,  # buffers (the BatchTopK threshold) follow rank 0
            )
        schedule = make_schedule(total_steps, train.warmup_steps, train.decay_start_frac)
        self.scheduler = make_scheduler(self.optimizer, schedule)
        F = sae_cfg.d_sae
        self.tokens_since_fired_F = torch.zeros(F, dtype=torch.long, device=device)
        self.dead_threshold = int(sae_cfg.dead_tokens_threshold)
        self.dead_mask_F = torch.zeros(F, dtype=torch.bool, device=device)
        #: latents dead once the current batch is counted unless they fire in it
        self.dead_candidates_F = torch.zeros(F, dtype=torch.bool, device=device)
        self.metrics: MetricsLog | None = None
        self.last_record: dict[str, Any] = {}

    # -- RNG isolation: each run draws from its own stream, whatever the others do.
    def _enter_rng(self) -> None:
        torch.set_rng_state(self.rng_state)
        if self.cuda_rng_state is not None:
            torch.cuda.set_rng_state(self.cuda_rng_state, self.device)

    def _exit_rng(self) -> None:
        self.rng_state = torch.get_rng_state()
        if self.cuda_rng_state is not None:
            self.cuda_rng_state = torch.cuda.get_rng_state(self.device)

    def step(
        self,
        x_BD: torch.Tensor,
        step: int,
        total_steps: int,
        *,
        want_metrics: bool,
        full_x_BD: torch.Tensor | None = None,
    ) -> dict[str, float] | None:
        """One optimizer step on ``x_BD``; data-parallel ranks pass their slice as ``x_BD``
        and the whole batch as ``full_x_BD`` (b_dec init, dead-latent token counts)."""
        # kernels (Triton included) launch on the *current* CUDA device: make it the run's
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        with on_device:
            return self._step(x_BD, step, total_steps, want_metrics=want_metrics, full=full_x_BD)

    def _step(
        self,
        x_BD: torch.Tensor,
        step: int,
        total_steps: int,
        *,
        want_metrics: bool,
        full: torch.Tensor | None = None,
    ) -> dict[str, float] | None:
        from masksae.train.sae.base import StepContext

        full = x_BD if full is None else full
        self._enter_rng()
        try:
            sae = self.sae
            if step == 0:
                sae.init_from_data(full)  # every rank: the same whole batch, the same b_dec
            ctx = StepContext(
                step,
                total_steps,
                self._dead_candidates(step, full.shape[0]),
                self.train.fused,
                self.select_dtype,
                want_metrics,
            )
            autocast = (
                torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                if self.train.autocast_bf16
                else nullcontext()
            )
            with autocast:
                if self.loss_module is None:
                    out = sae.training_loss(x_BD, ctx)
                else:  # DDP: gradients are averaged over the ranks during backward
                    out = self.loss_module(x_BD, ctx)
            loss = out.loss
            if not bool(torch.isfinite(loss)):
                raise TrainingDivergedError(
                    f"run {self.spec.name}: the loss became {loss.item()} at step {step} "
                    f"(the input batch was finite): lower the lr (now {self.lr:g}) or enable "
                    "normalize_activations; rerun with --resume continues from the last "
                    "checkpoint of this output folder"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            known_norms = sae.remove_parallel_decoder_grad()
            if self.train.grad_clip > 0:
                clip_grad_norm(sae.parameters(), self.train.grad_clip, known_norms, self.optimizer)
            lr_used = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            sae.normalize_decoder()
            with torch.no_grad():  # no host sync
                fired_F = out.fired_F
                if self.loss_module is not None:  # fired on any rank's slice
                    fired_F = _fired_on_any_rank(fired_F)
                self.tokens_since_fired_F += full.shape[0]
                self.tokens_since_fired_F.masked_fill_(fired_F, 0)
                torch.ge(self.tokens_since_fired_F, self.dead_threshold, out=self.dead_mask_F)
            if not want_metrics:
                return None
            record = {
                "loss": float(loss.detach()),
                "lr": float(lr_used),
                "dead_frac": float(self.dead_mask_F.float().mean()),
            }
            for key, value in out.metrics.items():
                record[key] = float(value.detach().float()) if torch.is_tensor(value) else value
            return record
        finally:
            self._exit_rng()

    @torch.no_grad()
    def _dead_candidates(self, step: int, batch_tokens: int) -> torch.Tensor | None:
        """``StepContext.dead_mask_F`` for this step: latents whose counter reaches the dead
        threshold once this batch is counted (the SAE then drops those that fire in it).

        None while no counter can reach it: a counter is at most the tokens trained so far
        (``step * batch_tokens``), so the first ~threshold tokens need no mask and no host
        sync at all.
        """
        if (step + 1) * batch_tokens < self.dead_threshold:
            return None
        torch.ge(
            self.tokens_since_fired_F,
            self.dead_threshold - batch_tokens,
            out=self.dead_candidates_F,
        )
        return self.dead_candidates_F

    # -- checkpoint state
    def state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "batches_consumed": step,
            "model": {k: v.detach().cpu().clone() for k, v in self.sae.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_state": self.rng_state.clone(),
            "cuda_rng_state": None if self.cuda_rng_state is None else self.cuda_rng_state.clone(),
            "tokens_since_fired_F": self.tokens_since_fired_F.detach().cpu().clone(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng_state = state["rng_state"]
        if self.cuda_rng_state is not None and state.get("cuda_rng_state") is not None:
            self.cuda_rng_state = state["cuda_rng_state"]
        self.tokens_since_fired_F.copy_(state["tokens_since_fired_F"].to(self.device))
        torch.ge(self.tokens_since_fired_F, self.dead_threshold, out=self.dead_mask_F)


def _fired_on_any_rank(fired_F: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    fired = fired_F.to(torch.uint8)
    dist.all_reduce(fired, op=dist.ReduceOp.MAX)
    return fired.bool()


# ---------------------------------------------------------------------------- the trainer
class Trainer:
    """Train the SAEs of ``runs`` on ``store`` in one pass, writing under ``out_dir``.

    ``resume=True`` continues the sweep found in ``out_dir`` (same config required);
    ``on_step(step)`` is called after each completed step (tests use it to simulate a crash).
    Recipe knobs left unset are scaled to the run's length (``fit_recipe_to_run``);
    ``strict_recipe=True`` (``masksae train``) also refuses explicit values that would leave
    the SAE without a learned inference threshold (``check_recipe_fits``).
    """

    def __init__(
        self,
        store: Any,
        runs: Sequence[RunSpec],
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool = True,
        on_step: Callable[[int], None] | None = None,
        dist: DistContext | None = None,
        strict_recipe: bool = False,
    ) -> None:
        if not runs:
            raise ConfigError("no SAE to train: the sweep's grid expands to zero runs")
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise ConfigError(f"run names must be unique, got {names}")
        self.store = store
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self._bar: Any = None  # the sweep's one progress bar (rank 0)
        self.on_step = on_step
        # everything that can be refused is checked before anything is written
        resolve_sae_configs(list(runs), store.d_model)  # bad SAE settings first
        self.total_steps, self.epochs = plan_steps(store, cfg)
        # recipe knobs left unset are scaled to the run's length (a short run still
        # learns its inference threshold); explicit values that cannot work are refused
        cfg, runs, scaled = fit_recipe_to_run(cfg, list(runs), self.total_steps)
        if scaled and (dist is None or dist.is_main):
            log.info(
                "short run (%d steps): scaled the recipe's %s (set them to override)",
                self.total_steps,
                ", ".join(scaled),
            )
        self.runs_spec = list(runs)
        self.cfg = cfg
        self.sae_configs = resolve_sae_configs(self.runs_spec, store.d_model)
        if strict_recipe:
            check_recipe_fits(cfg, self.runs_spec, self.sae_configs, self.total_steps)
        self.scale: float | None = None
        if cfg.normalize_activations:
            self.scale = float(store.norm_scale())
            if cfg.normalize_target == "unit":  # E||s x||^2 = 1 instead of d_model
                self.scale /= math.sqrt(store.d_model)
            if not (math.isfinite(self.scale) and self.scale > 0):
                raise StoreError(
                    f"the store's activation statistics give the normalisation scale "
                    f"{self.scale}: the store holds NaN/inf or all-zero activations; check it "
                    "with `masksae store verify` or set normalize_activations = false"
                )
        self.dist = dist or DistContext()
        """This process's rank (a world of one by default)."""
        self.device = resolve_train_device(cfg, self.dist)
        self.mode = distribution_mode(cfg, len(self.runs_spec), self.dist)
        """"single", "runs" (runs spread over the ranks) or "data" (DDP)."""
        #: indices of the sweep's runs this rank trains
        self.local_runs = [
            i
            for i in range(len(self.runs_spec))
            if self.mode != "runs" or i % self.dist.world == self.dist.rank
        ]
        #: whether this rank writes run folders (data-parallel: rank 0 only; replicas agree)
        self.writes = self.mode != "data" or self.dist.is_main
        if self.dist.distributed and self.dist.is_main:
            log.info(
                "%d rank(s), %s: %s",
                self.dist.world,
                "each run data-parallel (DDP)" if self.mode == "data" else "runs spread",
                f"every rank steps on 1/{self.dist.world} of each batch"
                if self.mode == "data"
                else f"rank r trains runs i with i % {self.dist.world} == r",
            )
        self._interrupt_requested = False
        #: (last completed step, whether every run is at it): read on KeyboardInterrupt
        self._position: tuple[int, bool] = (0, True)
        check_sinks_available(cfg.tensorboard, cfg.wandb)
        self.manifest = self._manifest()

    def _manifest(self) -> dict[str, Any]:
        runs = []
        for spec, sae_cfg in zip(self.runs_spec, self.sae_configs, strict=True):
            runs.append(
                {
                    "name": spec.name,
                    "sae": sae_cfg.to_dict(),
                    "lr": spec.resolved_lr(self.cfg),
                    "seed": spec.seed,
                }
            )
        return {
            "format_version": SWEEP_FORMAT_VERSION,
            "train": to_dict(self.cfg),
            "runs": runs,
            "store_fingerprint": self.store.fingerprint,
            "store_path": str(self.store.path),
            "store": dict(self.store.provenance),
            "total_steps": self.total_steps,
            "normalization_scale": self.scale,
            "masksae_version": __version__,
        }

    # -- output folder checks
    def _check_out_dir(self) -> None:
        sweep_file = self.out_dir / SWEEP_FILE
        if sweep_file.exists():
            if not self.resume:
                raise CheckpointError(
                    f"the output folder {self.out_dir} already holds a training run "
                    f"({SWEEP_FILE}); pass --resume to continue it, or choose another --out"
                )
            import json

            try:
                old = json.loads(sweep_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{sweep_file} is damaged ({exc}); cannot resume") from exc
            diffs = sweep_differences(old, self.manifest)
            if diffs:
                raise CheckpointError(
                    f"cannot resume {self.out_dir}: the config differs from the run it holds:\n  "
                    + "\n  ".join(diffs)
                    + "\nrestore the original config to resume, or train into another --out"
                )
            return
        if self.resume:
            raise CheckpointError(
                f"--resume given but {self.out_dir} holds no training run ({SWEEP_FILE} "
                "missing): drop --resume to start a new one"
            )
        if self.out_dir.exists() and any(p.name != LOCK_FILE for p in self.out_dir.iterdir()):
            raise CheckpointError(
                f"the output folder {self.out_dir} is not empty and holds no masksae training "
                "run: choose an empty or new --out folder"
            )

    def _resume_step(self, runs: list[_Run]) -> int:
        """Largest step every run has a checkpoint for (0: start over)."""
        common: set[int] | None = None
        for run in runs:
            steps = set(ckpt.list_checkpoints(run.dir))
            if (run.dir / ckpt.CONFIG_FILE).exists():
                meta = ckpt.read_meta(run.dir)
                if meta.get("complete"):
                    steps.add(int(meta["step"]))
            common = steps if common is None else common & steps
        return max(common) if common else 0

    def _load_run_state(self, run: _Run, step: int) -> None:
        src = ckpt.checkpoint_dir(run.dir, step)
        if not (src / ckpt.STATE_FILE).exists():
            src = run.dir
        try:
            state = torch.load(src / ckpt.STATE_FILE, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure means a damaged checkpoint
            raise CheckpointError(f"cannot read {src / ckpt.STATE_FILE}: {exc}") from exc
        run.load_state(state)

    def _lock_out_dir(self) -> Any:
        """Take the output folder's lock (an flock: a killed run releases it); CheckpointError
        naming the holder when another process trains into the same folder."""
        import fcntl
        import os

        created = not self.out_dir.exists()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.out_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held while training
        except OSError as exc:
            raise CheckpointError(
                f"cannot write the output folder {self.out_dir}: {exc.strerror or exc}: choose "
                "a writable --out"
            ) from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise CheckpointError(
                f"the output folder {self.out_dir} is being trained into by {holder}: wait for "
                "it to finish, or stop it and rerun with --resume (a killed run releases the "
                "folder), or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._created_out_dir = created
        return handle

    def _release_out_dir(self, handle: Any, *, remove: bool) -> None:
        """Drop the lock; ``remove`` deletes the folder if this start created it (a refused
        start leaves no trace; a folder that existed keeps its lock file, as unlinking a lock
        file another process may have opened would let two processes hold it)."""
        if remove and self._created_out_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)
        handle.close()

    # -- the loop
    def train(self) -> TrainSummary:
        # rank 0 alone locks and checks the output folder (data-parallel replicas and the
        # other ranks of a spread sweep write their runs under rank 0's lock); every rank
        # learns the verdict
        lock = None
        failure = None
        if self.dist.is_main:
            lock = self._lock_out_dir()
            try:
                self._check_out_dir()
            except BaseException as exc:
                self._release_out_dir(lock, remove=True)
                if not self.dist.distributed or not isinstance(exc, MasksaeError):
                    raise
                failure = describe_failure(exc)
        if self.dist.distributed:
            raise_first_failure([self.dist.broadcast(failure)], f"training into {self.out_dir}")
        try:
            return self._train_locked()
        except OSError as exc:  # metrics, sweep.json, publishing: the folder became unusable
            name = str(exc.filename or "")
            if exc.errno not in _WRITE_ERRNOS or not name.startswith(str(self.out_dir)):
                raise
            raise CheckpointError(
                f"training into {self.out_dir} failed writing "
                f"{exc.filename or 'its files'}: {exc.strerror or exc}{_free_space(self.out_dir)}; "
                "the checkpoints written so far are kept: free disk space (or fix the folder) "
                "and rerun the same command with --resume"
            ) from exc
        finally:
            if lock is not None:
                self._release_out_dir(lock, remove=False)

    def _train_locked(self) -> TrainSummary:
        global_rng = torch.get_rng_state()  # runs seed/consume their own; restore the caller's
        threads = torch.get_num_threads()
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        self._interrupt_requested = False
        previous_handler = self._install_sigint_handler()
        try:
            return self._train()
        finally:
            from masksae.train.kernels.workspace import release_workspace

            release_workspace()  # the fused step's scratch buffers (worker threads' die with them)
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            torch.set_rng_state(global_rng)
            torch.set_num_threads(threads)

    def run_device(self, index: int) -> torch.device:
        """Device of run ``index`` of the sweep on this rank."""
        return self.device

    def _install_sigint_handler(self) -> Any:
        """First Ctrl-C: finish the step, checkpoint, stop; second: stop at once.

        Only in the main thread with Python's default handler in place (signal handlers
        cannot be set elsewhere, and a caller's own handler is left alone). Returns the
        handler to restore, or None when nothing was installed.
        """
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:
            return None

        def handler(signum: int, frame: Any) -> None:
            if self._interrupt_requested:
                raise KeyboardInterrupt
            self._interrupt_requested = True
            log.warning(
                "interrupted: finishing the current step and writing a checkpoint "
                "(press Ctrl-C again to stop at once)"
            )

        signal.signal(signal.SIGINT, handler)
        return previous

    def _train(self) -> TrainSummary:
        if self.writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume and self.dist.is_main:
            atomic_write_json(self.out_dir / SWEEP_FILE, self.manifest)
        self.dist.barrier()  # the sweep file exists before any rank writes a run
        runs = [
            _Run(
                self.runs_spec[i],
                self.sae_configs[i],
                self.cfg,
                self.total_steps,
                self.device,
                self.out_dir,
                data_parallel=self.mode == "data",
            )
            for i in self.local_runs
        ]
        if self.cfg.fused:
            chosen = sorted({f"{r.select_dtype} on {r.device}" for r in runs})
            log.info("fused step: selection product in %s", ", ".join(chosen))
        start = self._resume_step(runs) if self.resume else 0
        if self.mode == "data":
            start = self.dist.broadcast(start)  # rank 0's checkpoints are the run's
        for run in runs:
            if self.writes:
                run.dir.mkdir(parents=True, exist_ok=True)
                for step in ckpt.list_checkpoints(run.dir):
                    if step > start:  # written by some runs only, before the crash
                        shutil.rmtree(ckpt.checkpoint_dir(run.dir, step), ignore_errors=True)
                ckpt.remove_partial_checkpoints(run.dir)  # a kill during a checkpoint write
            if start > 0:
                self._load_run_state(run, start)
        if start > 0 and runs:
            log.info(
                "resuming %d run(s) in %s from step %d of %d",
                len(runs),
                self.out_dir,
                start,
                self.total_steps,
            )
        wall = wait = 0.0
        try:
            self._open_logs(runs, start)
            if runs:
                wall, wait = self._loop(runs, start)
            if self.writes:
                self._finish(runs)
        finally:
            for run in runs:
                if run.metrics is not None:
                    run.metrics.close()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        mine = [
            (i, RunResult(r.spec.name, r.dir, self.total_steps, r.last_record))
            for i, r in zip(self.local_runs, runs, strict=True)
        ]
        gathered = self.dist.gather(mine if self.writes else [])
        self.dist.barrier()  # every run is published before any rank returns
        by_index = dict(item for part in gathered for item in part)
        results = [by_index[i] for i in sorted(by_index)]
        summary = TrainSummary(results, self.total_steps, self.total_steps - start, wall, wait)
        log.info(
            "trained %d SAE(s) for %d steps in %.1f s; %.1f%% of the step time waited for data",
            len(runs),
            summary.steps_this_session,
            wall,
            100 * summary.data_wait_frac,
        )
        return summary

    def _open_logs(self, runs: list[_Run], start: int) -> None:
        if not self.writes:  # a data-parallel replica: rank 0 logs the run
            return
        for run in runs:
            jsonl = JsonlLog(run.dir)
            jsonl.truncate_after(start)
            previous = read_metrics(run.dir)
            run.last_record = previous[-1] if previous else {}
            sinks: list[Any] = [jsonl]
            if self.cfg.tensorboard:
                sinks.append(TensorBoardLog(run.dir))
            if self.cfg.wandb:
                sinks.append(
                    WandbLog(
                        run.dir,
                        self.cfg.wandb_project,
                        run.spec.name,
                        {"sae": run.sae.cfg.to_dict(), "train": run.train_dict},
                    )
                )
            run.metrics = MetricsLog(sinks)
        if self.progress and self.dist.is_main and runs:
            from masksae.progress import progress_bar, show_progress

            # one bar for the sweep: every SAE takes the same steps on the same batches
            desc = runs[0].spec.name if len(runs) == 1 else f"train {len(runs)} SAEs"
            with show_progress(True):
                self._bar = progress_bar(self.total_steps, desc, "step", initial=start, leave=True)

    def _stream(self, start: int) -> Iterator[torch.Tensor]:
        # the stream delivers on the training device (pinned + non_blocking for CUDA)
        kwargs: dict[str, Any] = {}
        if self.cfg.shuffle_buffer_tokens is not None:
            kwargs["shuffle_buffer_tokens"] = self.cfg.shuffle_buffer_tokens
        return self.store.stream(
            self.cfg.batch_size,
            seed=self.cfg.data_seed,
            include_masked=self.cfg.include_masked_positions,
            dtype="float32",
            device=str(self.device),
            skip_batches=start,
            epochs=self.epochs,
            **kwargs,
        )

    def _place(self, x_BD: torch.Tensor) -> torch.Tensor:
        """The (scaled) batch on the training device."""
        x = x_BD.to(self.device, non_blocking=True)
        return x * self.scale if self.scale is not None else x

    def _mean_over_ranks(self, records: list[dict[str, float] | None]) -> list[Any]:
        """Data-parallel metrics: each value averaged over the ranks' slices."""
        gathered = self.dist.gather(records)
        out: list[Any] = []
        for i, record in enumerate(records):
            if record is None:
                out.append(None)
                continue
            parts = [g[i] for g in gathered]
            out.append(
                {
                    k: sum(p[k] for p in parts) / len(parts)
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                    else v
                    for k, v in record.items()
                }
            )
        return out

    def _loop(self, runs: list[_Run], start: int) -> tuple[float, float]:
        """The step loop; on KeyboardInterrupt between steps, checkpoint the last step."""
        self._position = (start, True)
        try:
            return self._loop_steps(runs, start)
        except KeyboardInterrupt:
            done, consistent = self._position
            if not consistent:
                log.warning(
                    "interrupted in the middle of step %d: the last periodic checkpoint is "
                    "kept; `--resume` continues from it",
                    done + 1,
                )
            elif (
                self.writes
                and done > start
                and not all(done in ckpt.list_checkpoints(r.dir) for r in runs)
            ):
                self._checkpoint(runs, done, complete=done == self.total_steps)
                log.warning(
                    "interrupted after step %d of %d: checkpoint written; rerun with "
                    "--resume to continue",
                    done,
                    self.total_steps,
                )
            raise

    def _loop_steps(self, runs: list[_Run], start: int) -> tuple[float, float]:
        cfg, total = self.cfg, self.total_steps
        stream = self._stream(start)
        wall = wait = 0.0
        win_wall = win_wait = 0.0
        win_steps = 0
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                try:
                    x_BD = next(stream)
                except StopIteration:
                    raise StoreError(
                        f"the store stream ended after {step} batches but {total} steps were "
                        "planned: the store changed while training? verify it with "
                        "`masksae store verify`"
                    ) from None
                t1 = time.perf_counter()
                # NaN/inf, and values so large that squaring them overflows (garbage bits of a
                # damaged store read as floats): one reduction, one host sync
                if not bool(torch.isfinite(x_BD.square().sum(dim=-1)).all()):
                    raise self._bad_input_error(step)
                x = self._place(x_BD)
                done = step + 1
                want = done % cfg.log_every == 0 or done == total
                self._position = (step, False)
                try:
                    if self.mode == "data":
                        rows = x.shape[0] // self.dist.world
                        mine = x[self.dist.rank * rows : (self.dist.rank + 1) * rows]
                        records = [
                            run.step(mine, step, total, want_metrics=want, full_x_BD=x)
                            for run in runs
                        ]
                        if want:
                            records = self._mean_over_ranks(records)
                    else:
                        records = [run.step(x, step, total, want_metrics=want) for run in runs]
                except TrainingDivergedError as exc:
                    raise self._diverged_error(exc, x_BD, step) from exc
                self._position = (done, True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t2 = time.perf_counter()
                wall += t2 - t0
                wait += t1 - t0
                win_wall += t2 - t0
                win_wait += t1 - t0
                win_steps += 1
                if want:
                    tokens_per_s = win_steps * x_BD.shape[0] / max(win_wall, 1e-9)
                    for run, record in zip(runs, records, strict=True):
                        assert record is not None
                        record = {
                            "step": done,
                            "tokens": done * cfg.batch_size,
                            **record,
                            "tokens_per_s": tokens_per_s,
                            "data_wait_frac": win_wait / max(win_wall, 1e-9),
                        }
                        run.last_record = record
                        if run.metrics is not None:
                            run.metrics.write(record)
                    if self._bar is not None:
                        self._bar.set_postfix(
                            _bar_postfix([r.last_record for r in runs], tokens_per_s),
                            refresh=False,
                        )
                    win_wall = win_wait = 0.0
                    win_steps = 0
                if self._bar is not None:
                    self._bar.update(1)
                if (
                    cfg.checkpoint_every
                    and done % cfg.checkpoint_every == 0
                    and done < total
                    and self.writes
                ):
                    self._checkpoint(runs, done, complete=False)
                if self.on_step is not None:
                    self.on_step(done)
                if self._interrupt_requested:
                    raise KeyboardInterrupt
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return wall, wait

    def _meta(self, run: _Run, step: int, complete: bool) -> dict[str, Any]:
        return ckpt.build_meta(
            sae=run.sae,
            train=run.train_dict,
            store=self.store,
            step=step,
            tokens=step * self.cfg.batch_size,
            scale=self.scale,
            run_name=run.spec.name,
            complete=complete,
        )

    def _checkpoint(self, runs: list[_Run], step: int, *, complete: bool) -> None:
        for run in runs:
            target = ckpt.checkpoint_dir(run.dir, step)
            try:
                ckpt.write_checkpoint(
                    target, run.sae, self._meta(run, step, complete), run.state(step), self.scale
                )
            except MasksaeError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch/safetensors/OS write failures
                raise self._checkpoint_write_error(runs, step, target, exc) from exc
            if not complete:
                ckpt.prune_checkpoints(run.dir, self.cfg.keep_checkpoints)
        log.debug("checkpoint at step %d written for %d run(s)", step, len(runs))

    def _checkpoint_write_error(
        self, runs: list[_Run], step: int, target: Path, exc: Exception
    ) -> CheckpointError:
        """One line: what failed, why (a full disk named as such), what survived, how to go on.

        A checkpoint is written to a temporary folder and renamed, so a failed write leaves
        the previous ones intact (``write_checkpoint`` removes its temporary folder)."""
        text = str(exc)
        full = (
            isinstance(exc, OSError)
            and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            or "unexpected pos" in text  # torch's zip writer on a short write
            or "failed writing" in text
            or "StorageFull" in text  # safetensors
        )
        first = (text.strip().splitlines() or [""])[0][:160]
        cause = "no space left on device" if full else f"{type(exc).__name__}: {first}"
        last = self._resume_step(runs)
        kept = (
            f"the last complete checkpoint (step {last}) is intact"
            if last
            else "no earlier checkpoint exists, so a resume starts from step 0"
        )
        return CheckpointError(
            f"writing the checkpoint of step {step} to {target} failed: {cause}"
            f"{_free_space(self.out_dir)}; {kept}: free disk space (or fix the folder) and rerun "
            "the same command with --resume to continue"
        )

    def _finish(self, runs: list[_Run]) -> None:
        total = self.total_steps
        if not all(total in ckpt.list_checkpoints(r.dir) for r in runs):
            self._checkpoint(runs, total, complete=True)
        for run in runs:
            ckpt.publish(run.dir, ckpt.checkpoint_dir(run.dir, total))
        for run in runs:  # only once every run is published: resume needs a common step
            if self.cfg.keep_checkpoints > 0:
                shutil.rmtree(run.dir / ckpt.CHECKPOINTS_DIR, ignore_errors=True)
            else:
                shutil.rmtree(ckpt.checkpoint_dir(run.dir, total), ignore_errors=True)

    def _bad_input_error(self, step: int) -> MasksaeError:
        bad = find_nonfinite_chunks(self.store)
        where = (
            f"chunk(s) {bad} of the store hold them (NaN/inf, or values whose square "
            "overflows float32)"
            if bad
            else "the store's chunks read back finite, so the stream itself is suspect"
        )
        return StoreError(
            f"the batch of step {step} holds non-finite activations: {where}. Check the store "
            "with `masksae store verify` (a damaged chunk fails its checksum: delete its record "
            "and rerun the harvest to rewrite it); activations that really overflow need a "
            f"harvest with --store-dtype float32; store: {self.store.path}"
        )

    def _diverged_error(
        self, exc: TrainingDivergedError, x_BD: torch.Tensor, step: int
    ) -> MasksaeError:
        """The divergence error, or a StoreError naming the chunks when the batch itself is
        absurd (rows far above the store's norm statistics: damaged data, not the lr)."""
        mean_norm = float(self.store.stats.mean_norm)
        batch_max = float(x_BD.double().norm(dim=-1).max())
        if not (mean_norm > 0 and batch_max > _ABSURD_NORM_FACTOR * mean_norm):
            return exc
        bad = find_nonfinite_chunks(self.store, max_norm=_ABSURD_NORM_FACTOR * mean_norm)
        where = f"chunk(s) {bad} hold such rows" if bad else "no chunk holds such rows on disk"
        return StoreError(
            f"the loss became non-finite at step {step}, and its batch holds an activation of "
            f"norm {batch_max:.3g}, {batch_max / mean_norm:.3g} x the store's mean norm "
            f"{mean_norm:.3g}: the data, not the lr, is the likely cause; {where}. Check the "
            "store with `masksae store verify` (delete a damaged chunk's record and rerun the "
            f"harvest to rewrite it); store: {self.store.path}"
        )


def _free_space(path: Path) -> str:
    """`` (N MiB free on PATH)`` when it can be measured, else ``""``."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    return f" ({free / 2**20:.1f} MiB free on {path})"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def _span(values: list[Any]) -> str:
    """``a`` for one value, ``lo-hi`` over several (None values skipped)."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    lo, hi = min(present), max(present)
    return _fmt(lo) if len(present) == 1 or lo == hi else f"{_fmt(lo)}-{_fmt(hi)}"


def _bar_postfix(records: list[dict[str, Any]], tokens_per_s: float) -> dict[str, str]:
    """The sweep bar's postfix: throughput, then each metric over the SAEs (a range when
    there are several; the per-SAE values are in each run's metrics.jsonl)."""
    return {
        "tok/s": f"{tokens_per_s:.0f}",
        "loss": _span([r.get("loss") for r in records]),
        "fvu": _span([r.get("fvu") for r in records]),
        "l0": _span([r.get("l0") for r in records]),
        "dead": _span([r.get("dead_frac") for r in records]),
    }


#: a row this many times the store's mean norm is taken as damaged data
_ABSURD_NORM_FACTOR = 1e4


def find_nonfinite_chunks(
    store: Any, limit: int = 20, *, max_norm: float | None = None
) -> list[int]:
    """Indices of chunks (first ``limit``) whose training rows (not excluded) hold NaN/inf,
    a squared norm that overflows float32, or (with ``max_norm``) a norm above it."""
    import numpy as np

    from masksae.storage.stream import bf16_bits_to_float32

    bad: list[int] = []
    for index in sorted(store.completed_chunks):
        arrays = store.read_chunk(index, ("activations", "excluded"))
        acts = arrays["activations"]
        if store.spec.dtype == "bfloat16":  # stored as uint16 bits
            acts = bf16_bits_to_float32(acts.view(np.uint16))
        rows = acts[~arrays["excluded"]].astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            sq = np.square(rows).sum(axis=-1)
        suspect = not bool(np.isfinite(sq).all())
        if not suspect and max_norm is not None and sq.size:
            suspect = bool(np.sqrt(sq.astype(np.float64)).max() > max_norm)
        if suspect:
            bad.append(index)
            if len(bad) >= limit:
                break
    return bad
