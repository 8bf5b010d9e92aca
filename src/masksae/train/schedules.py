"""Learning-rate schedules for SAE training.

The reference recipe (dictionary_learning's ``get_lr_schedule``): linear warmup from 0 to the
peak lr over ``warmup_steps`` (the update at step 0 uses lr 0, as in the reference), constant,
then linear decay to 0 starting at ``decay_start`` and ending at ``total_steps``. The schedule
is a picklable callable so ``LambdaLR.state_dict`` keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from masksae.errors import ConfigError


@dataclass(frozen=True)
class WarmupConstantDecay:
    """lr multiplier for the update made at 0-based ``step``.

    ``min(warmup, decay)`` where ``warmup = min(1, step / warmup_steps)`` (the reference's
    rule: step 0 trains at lr 0, step ``warmup_steps`` at the peak) and
    ``decay = (total_steps - step) / (total_steps - decay_start)`` once
    ``step >= decay_start`` (1 before), so the last update (step total_steps - 1) uses
    ``1 / (total_steps - decay_start)`` of the peak and the multiplier reaches 0 at
    ``total_steps``. Where the reference's preconditions hold (warmup_steps < decay_start)
    this equals its piecewise rule; ``min`` only matters for the configurations the
    reference refuses (a decay that starts during the warmup).
    """

    total_steps: int
    warmup_steps: int
    decay_start: int

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ConfigError(f"total steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.decay_start <= self.total_steps:
            raise ConfigError(
                f"decay start step {self.decay_start} must lie in [0, {self.total_steps}]"
            )

    def __call__(self, step: int) -> float:
        warm = 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)
        if step < self.decay_start or self.decay_start == self.total_steps:
            decay = 1.0
        else:
            decay = max(0.0, (self.total_steps - step) / (self.total_steps - self.decay_start))
        return min(warm, decay)


def make_schedule(
    total_steps: int, warmup_steps: int, decay_start_frac: float
) -> WarmupConstantDecay:
    """Schedule from the train config's fields (``decay_start = int(frac * total_steps)``)."""
    if not 0.0 <= decay_start_frac <= 1.0:
        raise ConfigError(
            f"decay_start_frac must lie in [0, 1], got {decay_start_frac}: e.g. 0.8 decays "
            "over the last 20% of steps, 1.0 disables the decay"
        )
    return WarmupConstantDecay(total_steps, warmup_steps, int(decay_start_frac * total_steps))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: WarmupConstantDecay
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR driving ``optimizer`` with ``schedule`` (call ``.step()`` after each update)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
