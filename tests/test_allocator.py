"""masksae.allocator: glibc thresholds set once, left to the user's environment when given."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc only",
)

# A fresh process: the settings are per process. Like a forward pass, each "batch"
# allocates (and touches) four 24 MB temporaries and frees them; the page faults of ten more
# batches are counted: with freed memory kept they reuse pages already mapped, with glibc's
# defaults the freed heap top goes back to the kernel and is faulted in again.
PROBE = """
import json, resource
from masksae.allocator import keep_freed_memory
import numpy as np
applied = keep_freed_memory()
def batch():
    blocks = [np.ones(24 << 20, dtype=np.uint8) for _ in range(4)]
    del blocks
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "faults": faults}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("MASKSAE_KEEP_FREED_MEMORY", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_blocks_are_reused_without_page_faults():
    kept, default = _probe(), _probe(MASKSAE_KEEP_FREED_MEMORY="0")
    assert kept["applied"] and kept["again"] and not default["applied"]
    # 10 batches x 96 MB = 245,760 pages if all were mapped afresh
    assert kept["faults"] < 1_000 < 10_000 < default["faults"], (kept, default)


@glibc
@pytest.mark.parametrize(
    "env", [{"MASKSAE_KEEP_FREED_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}]
)
def test_user_settings_win(env):
    assert _probe(**env)["applied"] is False
