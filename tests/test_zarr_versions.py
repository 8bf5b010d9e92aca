"""The lowest zarr the project declares (pyproject: zarr>=3.0.8) still writes stores that
verify, all-fill chunks included, and reads them back bit-exact.

Runs the store tests in a subprocess with zarr 3.0.8 installed into a temporary folder
placed first on the path (PyPI is reachable wherever `make setup` works).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LOWEST_ZARR = "3.0.8"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_store_tests_pass_on_the_lowest_supported_zarr(tmp_path):
    target = tmp_path / "zarr-lowest"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            f"zarr=={LOWEST_ZARR}",
            "crc32c",
        ],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        pytest.skip(f"cannot install zarr=={LOWEST_ZARR}: {install.stderr.strip()[-300:]}")
    env = {**os.environ, "PYTHONPATH": str(target)}
    version = subprocess.run(
        [sys.executable, "-c", "import zarr; print(zarr.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == LOWEST_ZARR
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "test_storage.py"),
            "-k",
            "roundtrip or all_fill or repairs or missing_shard or resume",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert " passed" in tests.stdout
