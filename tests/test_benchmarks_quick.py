"""Every benchmark runs at its smoke size (`make bench BENCH_ARGS=--quick`) and leaves the
recorded figures under docs/ alone: benchmarks that are never run rot (a workspace bug
that only the study benchmark hit went unnoticed until the full suite was run by hand)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _docs_digest() -> dict[str, str]:
    return {
        str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((ROOT / "docs").rglob("*"))
        if p.is_file()
    }


def test_quick_benchmarks_run_and_keep_the_recorded_figures(tmp_path):
    before = _docs_digest()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MASKSAE_CACHE": str(tmp_path / "cache")}
    env.pop("MASKSAE_BENCH_STORE", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "failed: none" in proc.stdout, tail
    assert _docs_digest() == before, "a --quick benchmark rewrote a page under docs/"
