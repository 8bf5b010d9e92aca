"""OpenMP defaults for a shared machine, applied before torch is imported.

torch's CPU kernels run in OpenMP parallel regions (libgomp in the Linux wheels). Between
regions libgomp's worker threads spin-wait for the next one (300,000 spins by default)
before sleeping. On a machine whose cores are busy with other jobs those spinning threads
take the cores the other threads of the same region need, and a step made of many short
regions slows down many-fold: measured 4.8x (issue 14) and up to 50x at load 15 on 2 cores
(docs/benchmarks.md). ``OMP_WAIT_POLICY=PASSIVE`` makes idle workers sleep at once; on an
idle machine it costs a thread wake-up per region (measured in the same benchmark).

These are defaults: a value already in the environment wins. They only take effect if set
before the OpenMP runtime starts, i.e. before torch is imported, so the CLI applies them
first thing; library users who import torch themselves set them in their environment.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

THREAD_ENV_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Environment defaults for the OpenMP runtime (see module docstring)."""


def apply_thread_env_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every default of ``THREAD_ENV_DEFAULTS`` not already in ``environ`` (default:
    ``os.environ``); return the ones set. Logs a debug note when torch is already imported
    (the OpenMP runtime has then read its environment already)."""
    env = os.environ if environ is None else environ
    applied = {k: v for k, v in THREAD_ENV_DEFAULTS.items() if k not in env}
    env.update(applied)
    if applied and environ is None and "torch" in sys.modules:
        log.debug("torch was imported before the OpenMP defaults %s were set", applied)
    return applied
