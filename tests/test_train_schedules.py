"""lr schedule: linear warmup, constant, linear decay to 0 from decay_start_frac * steps."""

from __future__ import annotations

import pytest
import torch

from masksae.errors import ConfigError
from masksae.train.schedules import WarmupConstantDecay, make_schedule, make_scheduler


def test_schedule_values_at_key_steps():
    s = make_schedule(total_steps=1000, warmup_steps=100, decay_start_frac=0.8)
    assert s.decay_start == 800
    assert s(0) == 0.0  # dictionary_learning: step / warmup_steps, step 0 trains at lr 0
    assert s(1) == pytest.approx(0.01)
    assert s(50) == pytest.approx(0.5)
    assert s(99) == pytest.approx(0.99)
    assert s(100) == 1.0
    assert s(799) == 1.0
    assert s(800) == 1.0  # (1000 - 800) / 200
    assert s(900) == pytest.approx(0.5)
    assert s(999) == pytest.approx(1 / 200)
    assert s(1000) == 0.0


def test_schedule_without_warmup_or_decay():
    s = make_schedule(total_steps=10, warmup_steps=0, decay_start_frac=1.0)
    assert [s(i) for i in range(10)] == [1.0] * 10


def test_warmup_longer_than_run_is_capped_by_decay():
    s = WarmupConstantDecay(total_steps=10, warmup_steps=100, decay_start=5)
    assert s(9) == pytest.approx(min(9 / 100, 1 / 5))


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-3)
    sched = make_scheduler(opt, make_schedule(100, 10, 0.5))
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(9e-4)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[75] == pytest.approx(1e-3 * 25 / 50)
    assert lrs[99] == pytest.approx(1e-3 / 50)
    # the schedule survives a state_dict round trip (resume)
    opt2 = torch.optim.Adam([p], lr=1e-3)
    sched2 = make_scheduler(opt2, make_schedule(100, 10, 0.5))
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 100


@pytest.mark.parametrize("frac", [-0.1, 1.5])
def test_bad_decay_fraction(frac):
    with pytest.raises(ConfigError, match="decay_start_frac"):
        make_schedule(100, 10, frac)


def test_schedule_equals_reference_rule():
    """dictionary_learning's get_lr_schedule (transcribed): step / W during the warmup, then
    (T - step) / (T - decay_start) from decay_start on, else 1."""

    def reference(step: int, total: int, warmup: int, decay_start: int) -> float:
        if step < warmup:
            return step / warmup
        if step >= decay_start:
            return (total - step) / (total - decay_start)
        return 1.0

    for total, warmup, frac in [(1000, 100, 0.8), (20, 10, 0.8), (50, 0, 0.5), (30, 7, 0.9)]:
        s = make_schedule(total, warmup, frac)
        for step in range(total):
            assert s(step) == pytest.approx(reference(step, total, warmup, s.decay_start), abs=0)
