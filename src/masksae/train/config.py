"""Training and sweep configuration.

A sweep TOML file has three tables::

    [train]            # TrainConfig fields shared by every run of the sweep
    steps = 400
    batch_size = 512

    [sae]              # SAE config defaults (architecture, d_sae, k, ...)
    architecture = "matryoshka_batch_topk"
    d_sae = 1024

    [grid]             # lists crossed into runs (architecture, k, d_sae, lr, seed, or any
    k = [20, 40]       # other SAE config field)

Every SAE of a sweep reads the same batches (one pass over the store), so only the SAE
config, the learning rate and the init seed may vary between runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masksae.config import from_dict, load_toml, to_dict
from masksae.errors import ConfigError

#: TrainConfig fields that may change on --resume (they do not change the weights).
OPERATIONAL_FIELDS = frozenset(
    {
        "device",
        "devices",
        "threads",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "tensorboard",
        "wandb",
        "wandb_project",
        "distributed",
        "storage_options",
        "cache_dir",
        "cache_size",
    }
)
#: values of TrainConfig.distributed
DISTRIBUTED_MODES = ("auto", "runs", "data")
#: values of TrainConfig.select_dtype
SELECT_DTYPES = ("auto", "float32", "bfloat16")
NORMALIZE_TARGETS = ("d_model", "unit")
"""Values of TrainConfig.normalize_target: the mean squared norm normalisation aims at."""
#: grid keys handled by the trainer rather than the SAE config.
RUN_KEYS = ("lr", "seed")


@dataclass
class TrainConfig:
    """Loop-level settings of one training pass (shared by every SAE of a sweep)."""

    steps: int | None = None
    """Optimizer steps; None derives them from ``tokens`` or one pass over the store."""
    tokens: int | None = None
    """Training tokens (steps = tokens // batch_size) when ``steps`` is None."""
    batch_size: int = 2048
    """Activations per step (the reference's SAE batch)."""
    lr: float | None = None
    """Peak learning rate; None -> 2e-4 / sqrt(d_sae / 16384) per SAE (reference rule)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    warmup_steps: int | None = None
    """Linear lr warmup length in steps; None = the recipe's 1000, capped at a tenth of the
    run's steps (a short run gets a short warmup; see ``fit_recipe_to_run``)."""
    decay_start_frac: float = 0.8
    """Linear decay to 0 starts at this fraction of the steps (1.0: no decay)."""
    grad_clip: float = 1.0
    """Max global gradient norm per SAE (0 disables clipping)."""
    seed: int = 0
    """SAE init seed (a grid ``seed`` overrides it per run)."""
    data_seed: int = 0
    """Seed of the store's shuffled stream (shared: every run reads the same batches)."""
    normalize_activations: bool = True
    """Train on s*x with E||s x||^2 = d_model (see ``normalize_target``; s from the store's
    statistics); s is folded back into the saved weights, so saved SAEs act on raw
    activations."""
    normalize_target: str = "d_model"
    """Mean squared norm the scale s aims at: ``d_model`` (E||s x||^2 = d_model, the project's
    protocol, SAELens' convention) or ``unit`` (E||s x||^2 = 1, dictionary_learning's
    get_norm_factor). With Adam the two differ in how far one lr step moves the biases and
    encoder relative to the data scale, so match the reference whose hyperparameters you copy."""
    autocast_bf16: bool = False
    """Run the SAE forward under bf16 autocast (threshold updates stay fp32)."""
    include_masked_positions: bool = True
    """Train on masked positions too (the paper trains on every position of the masked
    sequence); special tokens are always excluded by the reader."""
    shuffle_buffer_tokens: int | None = None
    """Shuffle buffer of the store stream; None keeps the store's default."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N: where every SAE trains (see ``devices`` for several)."""
    devices: list[str] | None = None
    """Several devices of this machine for one sweep, e.g. ``["cuda:0", "cuda:1"]`` (CLI:
    ``--devices cuda:0,cuda:1``): one rank per device is spawned in a local process group,
    exactly as ``torchrun --nproc-per-node N -m masksae train ...`` would start them, and
    the ranks share the work as ``distributed`` says. None (default): one process on
    ``device``. Set ``device`` or ``devices``, not both; may change on --resume."""
    distributed: str = "auto"
    """How the ranks of a distributed launch (torchrun, accelerate launch, --devices) share a
    sweep. "runs": rank r trains the runs i with i % world == r, each rank reading the same
    deterministic stream (every SAE gets the weights it would get alone). "data": every
    run trains data-parallel with DDP: each rank takes a 1/world slice of every batch and
    gradients are averaged (batch_size must divide by the world size; the batch top-k of
    the BatchTopK family is then taken per slice, with k x slice rows). "auto": "data" for a
    single-run sweep, "runs" otherwise. May change on --resume."""
    storage_options: dict | None = None
    """Options of a remote store's filesystem (CLI: --storage-option KEY=VALUE)."""
    cache_dir: str | None = None
    """Local chunk cache of a remote store (None: $MASKSAE_CACHE/store-cache); whole shard
    files are fetched ahead of the stream, so epochs after the first read at local speed
    when the cache holds the store."""
    cache_size: str = "20GiB"
    """Size limit of the chunk cache (e.g. 20GiB, 500MB; least recently used chunks are
    evicted beyond it)."""
    threads: int | None = None
    """CPU threads for torch during training (None: torch's default). On a busy machine
    fewer threads than cores can be much faster (no oversubscription)."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every N steps (0: only the final one)."""
    keep_checkpoints: int = 2
    """Periodic checkpoints kept per run (0 keeps all); removed once the run completes."""
    log_every: int = 50
    """Metrics (JSONL, progress bar, optional TensorBoard/W&B) every N steps."""
    fused: bool = True
    """Use the SAE's fused sparse kernel (StepContext.fused); False uses the dense path."""
    select_dtype: str = "auto"
    """Precision of the fused TopK-family step's one dense product, which only chooses the
    top-k: "float32"; "bfloat16" (choose on a bf16 product, then re-rank the candidates on
    their fp32 values and compute everything after in fp32, so the selection equals the fp32
    one barring a bf16 error beyond twice the largest seen among the candidates); "auto":
    bfloat16 where the device multiplies bf16 natively (CUDA with bf16, CPUs with AMX or
    AVX512-BF16), float32 elsewhere (measured in docs/benchmarks.md)."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package and a login)."""
    wandb_project: str = "masksae"
    """W&B project name."""

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        checks = [
            (self.steps is None or self.steps >= 1, "steps", self.steps, "an integer >= 1"),
            (self.tokens is None or self.tokens >= 1, "tokens", self.tokens, "an integer >= 1"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1"),
            (self.lr is None or self.lr > 0, "lr", self.lr, "a positive float (or unset)"),
            (
                len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                "adam_betas",
                self.adam_betas,
                "two floats in [0, 1)",
            ),
            (
                self.warmup_steps is None or self.warmup_steps >= 0,
                "warmup_steps",
                self.warmup_steps,
                ">= 0 (or unset)",
            ),
            (
                0 <= self.decay_start_frac <= 1,
                "decay_start_frac",
                self.decay_start_frac,
                "a float in [0, 1]",
            ),
            (self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0"),
            (
                self.normalize_target in NORMALIZE_TARGETS,
                "normalize_target",
                self.normalize_target,
                " | ".join(NORMALIZE_TARGETS),
            ),
            (self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0"),
            (self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints, ">= 0"),
            (self.log_every >= 1, "log_every", self.log_every, ">= 1"),
            (self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1 or unset"),
            (
                self.select_dtype in SELECT_DTYPES,
                "select_dtype",
                self.select_dtype,
                " | ".join(SELECT_DTYPES),
            ),
            (
                self.devices is None
                or (
                    isinstance(self.devices, list)
                    and len(self.devices) >= 1
                    and all(isinstance(d, str) and d.strip() for d in self.devices)
                ),
                "devices",
                self.devices,
                'a non-empty list of device names such as ["cuda:0", "cuda:1"] (or unset)',
            ),
        ]
        checks.append(
            (
                self.distributed in DISTRIBUTED_MODES,
                "distributed",
                self.distributed,
                " | ".join(DISTRIBUTED_MODES),
            )
        )
        for ok, name, value, expected in checks:
            if not ok:
                raise ConfigError(f"train.{name} = {value!r} is invalid: expected {expected}")
        from masksae.storage.cache import parse_size

        parse_size(self.cache_size)  # ConfigError naming the bad size
        if self.devices is not None:
            self.devices = [d.strip() for d in self.devices]
            if self.device != "auto":
                raise ConfigError(
                    f"train.device = {self.device!r} and train.devices = {self.devices!r} are "
                    "both set: use devices alone to spread a sweep over several devices"
                )


RECIPE_WARMUP_STEPS = 1000
"""dictionary_learning's warmup (steps), used when ``warmup_steps`` is unset."""
SHORT_RUN_DIVISOR = 10
"""Unset step-valued recipe knobs are capped at total_steps // SHORT_RUN_DIVISOR."""
DEAD_WINDOW_DIVISOR = 5
"""An unset dead-latent window is capped at a fifth of the run's training tokens."""
#: SAE config fields counted in steps that are scaled to a short run when left unset
SCALED_SAE_STEP_FIELDS = ("threshold_start_step", "sparsity_warmup_steps")


def fit_recipe_to_run(
    train: TrainConfig, runs: list[RunSpec], total_steps: int
) -> tuple[TrainConfig, list[RunSpec], list[str]]:
    """Fill the recipe knobs the user left unset, scaled to a run of ``total_steps``.

    The reference recipe (warmup 1000 steps, threshold updates from step 1000, a 10M-token
    dead-latent window) is sized for runs of ~10^5 steps; a short run would end still in
    its warmup with no learned inference threshold. Unset values become
    ``min(recipe, total_steps // 10)`` for warmup_steps, threshold_start_step and
    sparsity_warmup_steps, ``min(recipe, tokens // 5)`` for dead_tokens_threshold (never
    less than one batch), and ``min(0.999, 1 - 3 / U)`` for threshold_beta with U threshold
    updates (the EMA settles within a third of them; the demo and study configs chose
    0.98 by hand for ~150-200 updates); the lr decay start is already a fraction of the run.
    Values set in a config file or by a flag are kept. Returns (train, runs, notes of what
    was scaled, e.g. "warmup_steps 1000 -> 0").
    """
    from masksae.train.sae_config import config_class

    notes: dict[str, None] = {}
    cap = total_steps // SHORT_RUN_DIVISOR
    if train.warmup_steps is None:
        warmup = min(RECIPE_WARMUP_STEPS, cap)
        if warmup != RECIPE_WARMUP_STEPS:
            notes[f"warmup_steps {RECIPE_WARMUP_STEPS} -> {warmup}"] = None
        train = dataclasses.replace(train, warmup_steps=warmup)
    window = max(train.batch_size, total_steps * train.batch_size // DEAD_WINDOW_DIVISOR)
    fitted: list[RunSpec] = []
    for run in runs:
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(config_class(str(run.sae.get("architecture"))))
            if isinstance(f.default, int) and not isinstance(f.default, bool)
        }
        sae = dict(run.sae)
        targets = {name: cap for name in SCALED_SAE_STEP_FIELDS}
        targets["dead_tokens_threshold"] = window
        for name, limit in targets.items():
            if name in defaults and name not in sae and limit < defaults[name]:
                sae[name] = limit
                notes[f"{name} {defaults[name]} -> {limit}"] = None
        beta = _fitted_threshold_beta(run.sae, sae, total_steps)
        if beta is not None:
            notes[f"threshold_beta {THRESHOLD_BETA_RECIPE} -> {beta}"] = None
            sae["threshold_beta"] = beta
        fitted.append(dataclasses.replace(run, sae=sae))
    return train, fitted, list(notes)


THRESHOLD_BETA_RECIPE = 0.999
"""dictionary_learning's EMA decay of the inference threshold (time constant 1000 updates)."""
THRESHOLD_SETTLE_FRACTION = 3
"""An unset threshold EMA is made to settle within a third of a short run's updates."""


def _fitted_threshold_beta(given: dict[str, Any], sae: dict[str, Any], total_steps: int) -> Any:
    """The threshold EMA decay for a short run, or None to keep the recipe's: with U threshold
    updates, ``1 - 3 / U`` (time constant U / 3, so the EMA forgets its first estimates),
    capped at the recipe's 0.999, when the user left it unset."""
    from masksae.train.sae_config import config_class

    cls = config_class(str(sae.get("architecture")))
    if "threshold_beta" in given or "threshold_beta" not in {
        f.name for f in dataclasses.fields(cls)
    }:
        return None
    start = sae.get("threshold_start_step")
    if start is None:
        start = next(f.default for f in dataclasses.fields(cls) if f.name == "threshold_start_step")
    updates = total_steps - int(start)
    if updates <= 0:
        return None
    beta = round(max(0.0, 1.0 - THRESHOLD_SETTLE_FRACTION / updates), 4)
    return beta if beta < THRESHOLD_BETA_RECIPE else None


def check_recipe_fits(
    train: TrainConfig, runs: list[RunSpec], sae_configs: list[Any], total_steps: int
) -> None:
    """Refuse, before anything is written, a run that could only produce a useless SAE: a
    threshold_start_step at or past the last step (no inference threshold is ever learned,
    so the SAE cannot be used or exported). Warns when the warmup outlasts the run."""
    import logging

    for run, cfg in zip(runs, sae_configs, strict=True):
        start = getattr(cfg, "threshold_start_step", None)
        if start is not None and start >= total_steps:
            raise ConfigError(
                f"run {run.name}: threshold_start_step = {start} but the run has only "
                f"{total_steps} steps, so the SAE would never learn its inference threshold: "
                f"lower it (--sae.threshold-start-step {total_steps // SHORT_RUN_DIVISOR}, or "
                "threshold_start_step in the [sae] table) or train longer (--steps)"
            )
    if train.warmup_steps is not None and train.warmup_steps >= total_steps:
        logging.getLogger(__name__).warning(
            "warmup_steps = %d >= the %d training steps: the lr never reaches its peak; "
            "lower it with --train.warmup-steps (or warmup_steps in the [train] table)",
            train.warmup_steps,
            total_steps,
        )


def resolve_select_dtype(name: str, device: Any) -> str:
    """ "float32" or "bfloat16" for ``TrainConfig.select_dtype`` on ``device`` ("auto": bf16
    where the device multiplies bf16 natively)."""
    if name != "auto":
        return name
    from masksae.devices import native_bf16_matmul

    return "bfloat16" if native_bf16_matmul(device) else "float32"


def default_lr(d_sae: int) -> float:
    """The reference's lr rule: 2e-4 / sqrt(d_sae / 16384) (4e-4 at d_sae 4096)."""
    return 2e-4 / math.sqrt(d_sae / 16384)


@dataclass
class RunSpec:
    """One SAE of a sweep: its name, SAE config dict, lr and init seed."""

    name: str
    """Run directory name, e.g. ``matryoshka_batch_topk-k20-F4096-s0``."""
    sae: dict[str, Any]
    """SAE config as a dict (``masksae.train.sae.sae_config_from_dict`` input)."""
    lr: float | None = None
    """Peak lr (None: the TrainConfig's, else the d_sae rule)."""
    seed: int = 0
    """Init seed of this SAE."""

    def resolved_lr(self, train: TrainConfig) -> float:
        if self.lr is not None:
            return self.lr
        if train.lr is not None:
            return train.lr
        return default_lr(int(self.sae["d_sae"]))


@dataclass
class SweepConfig:
    """A sweep file: shared train settings, SAE defaults and the grid."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """[train] table."""
    sae: dict[str, Any] = field(default_factory=dict)
    """[sae] table: SAE config defaults."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """[grid] table: lists crossed into runs."""

    def runs(self) -> list[RunSpec]:
        """Expand the grid into named runs (product in a fixed key order)."""
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"grid.{key} = {values!r}: expected a non-empty list, e.g. {key} = [20, 40]"
                )
        order = ["architecture", "d_sae", "k", "lr", "seed"]
        keys = [k for k in order if k in self.grid] + sorted(k for k in self.grid if k not in order)
        runs: list[RunSpec] = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            chosen = dict(zip(keys, combo, strict=True))
            sae = dict(self.sae)
            sae.update({k: v for k, v in chosen.items() if k not in RUN_KEYS})
            if "architecture" not in sae:
                raise ConfigError(
                    'no SAE architecture given: set [sae] architecture = "matryoshka_batch_topk" '
                    "(or list it in [grid])"
                )
            if "d_sae" not in sae:
                raise ConfigError(
                    "no dictionary size given: set [sae] d_sae = 4096 (or grid.d_sae)"
                )
            lr = chosen.get("lr")
            seed = int(chosen.get("seed", self.train.seed))
            extra = [k for k in keys if k not in ("architecture", "d_sae", "k", "lr", "seed")]
            runs.append(RunSpec(run_name(sae, lr, seed, extra), sae, lr, seed))
        if not runs:
            runs = []
        names = [r.name for r in runs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"the grid gives duplicate runs {dupes}: remove repeated values")
        return runs


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(_fmt(v) for v in value)
    return str(value)


def run_name(sae: dict[str, Any], lr: float | None, seed: int, extra: list[str] = ()) -> str:  # type: ignore[assignment]
    """Readable run name: ``{architecture}[-k{k}]-F{d_sae}[-lr{lr}][-{key}{value}]-s{seed}``."""
    parts = [str(sae["architecture"])]
    if sae.get("k") is not None:
        parts.append(f"k{_fmt(sae['k'])}")
    parts.append(f"F{sae['d_sae']}")
    if lr is not None:
        parts.append(f"lr{_fmt(lr)}")
    parts.extend(f"{key}{_fmt(sae[key])}" for key in extra if key in sae)
    parts.append(f"s{seed}")
    return "-".join(parts).replace("/", "_").replace(" ", "")


def load_sweep(path: str | Path) -> SweepConfig:
    """Read a sweep TOML file ([train], [sae], [grid]); unknown tables/keys are errors."""
    data = load_toml(path)
    unknown = sorted(set(data) - {"train", "sae", "grid"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown table(s) {unknown}; a sweep file has [train], [sae] and [grid]"
        )
    train = from_dict(TrainConfig, data.get("train", {}), where=f"{path} [train]")
    return SweepConfig(train=train, sae=dict(data.get("sae", {})), grid=dict(data.get("grid", {})))


def train_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON-able dict of a TrainConfig."""
    return to_dict(cfg)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, data)


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)
