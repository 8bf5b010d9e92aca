"""glibc malloc settings for CPU forward passes: keep freed memory for the next batch.

A transformer forward on the CPU allocates and frees the same few large temporaries every
batch (the MLP's [tokens, d_mlp] products, attention scores: megabytes each). With glibc's
defaults (a dynamic mmap threshold and a trim threshold of twice it) the heap top is handed
back to the kernel after a batch frees its temporaries and faulted in again, page by page,
by the next one. Measured on the bundled SmolLM2-135M (bf16, batch 32 x 128, 2 cores): about
3 million page faults per 65K tokens, 5 s of kernel time, and 6,000-7,500 tok/s; with the
settings below about zero faults and 8,700-9,400 tok/s (``benchmarks/bench_harvest.py``,
docs/benchmarks.md). The SAE step keeps its own buffers (masksae.kernels.workspace) and
does not depend on this.

The cost is memory: up to ``TRIM_THRESHOLD_BYTES`` of freed heap stays with the process.
Applied once per process by the CLI and the harvest; glibc reads ``MALLOC_TRIM_THRESHOLD_``
/ ``MALLOC_MMAP_THRESHOLD_`` from the environment at start, and a user who sets either (or
``MASKSAE_KEEP_FREED_MEMORY=0``) keeps glibc's behaviour. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks at least this large are mapped separately (glibc's largest allowed threshold on
64-bit; fixing it also turns off glibc's dynamic adjustment)."""
TRIM_THRESHOLD_BYTES = 256 << 20
"""Free memory at the heap top beyond this goes back to the kernel."""

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_ENV_OVERRIDES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set the thresholds above (once per process); True if they are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("MASKSAE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if any(name in os.environ for name in _ENV_OVERRIDES):
        log.debug("malloc thresholds left to the environment (%s)", ", ".join(_ENV_OVERRIDES))
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    done = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and done
    log.debug(
        "malloc thresholds: mmap %d, trim %d bytes (%s)",
        MMAP_THRESHOLD_BYTES,
        TRIM_THRESHOLD_BYTES,
        "set" if done else "refused",
    )
    return done
