"""OpenMP defaults for a shared machine, applied before torch is imported.

torch's CPU kernels run in OpenMP parallel regions (libgomp in the Linux wheels). Between
regions libgomp's worker threads spin-wait for the next one (300,000 spins by default)
before sleeping. On a machine whose cores are busy with other jobs those spinning threads
take the cores the other threads of the same region need, and a step made of many short
regions slows down many-fold: measured 4.8x (issue 14) and up to 50x at load 15 on 2 cores
(docs/benchmarks.md). ``OMP_WAIT_POLICY=PASSIVE`` makes idle workers sleep at once, which
on an idle machine costs a futex wake-up per region; ``GOMP_SPINCOUNT=3000`` (it overrides
the policy's zero) lets them spin briefly first, about a hundredth of the default: the SAE
step's back-to-back small regions then find their workers awake. Measured on the training
step (``benchmarks/bench_peers.py``, 2 cores): 40-41 -> 37 ms unloaded, and under 8 busy
processes 218-245 ms against 234-270 with PASSIVE alone and 920 spinning by default.

These are defaults, as a pair: if the environment sets either variable, neither is set (a
user's ``OMP_WAIT_POLICY=ACTIVE`` must not be cut short by our spin count). They only take
effect if set before the OpenMP runtime starts, i.e. before torch is imported, so the CLI
applies them first thing; library users who import torch themselves set them in their
environment. ``GOMP_SPINCOUNT`` is libgomp's (the Linux wheels' OpenMP); other runtimes
ignore it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

THREAD_ENV_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}
"""Environment defaults for the OpenMP runtime (see module docstring)."""


def apply_thread_env_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``THREAD_ENV_DEFAULTS`` in ``environ`` (default: ``os.environ``) unless it sets
    any of them already; return the ones set. Logs a debug note when torch is already
    imported (the OpenMP runtime has then read its environment already)."""
    env = os.environ if environ is None else environ
    user_chose = any(k in env for k in THREAD_ENV_DEFAULTS)
    applied = {} if user_chose else dict(THREAD_ENV_DEFAULTS)
    env.update(applied)
    if applied and environ is None and "torch" in sys.modules:
        log.debug("torch was imported before the OpenMP defaults %s were set", applied)
    return applied
