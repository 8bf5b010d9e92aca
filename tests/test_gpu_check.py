"""`make gpu-check`'s driver and script, as far as a CPU machine can run them: every step at
toy sizes (--dry-run), the docs it writes, and the clear refusal without a GPU."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
def test_dry_run_runs_every_step_and_writes_the_gpu_section(tmp_path):
    gc = _driver()
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# Benchmarks\n\nbefore\n\n{gc.START}\nold figures\n{gc.END}\n\nafter\n")
    page = tmp_path / "gpu.md"
    rc = gc.main(
        [
            "--dry-run",
            "--device=cpu",
            "--tests",
            "tests/test_threads.py::test_defaults_fill_only_what_is_missing",
            f"--out={out}",
            f"--page={page}",
        ]
    )
    assert rc == 0
    text = out.read_text()
    assert "old figures" not in text and text.startswith("# Benchmarks\n\nbefore")
    assert text.rstrip().endswith("after") and text.count(gc.START) == 1
    section = text.split(gc.START)[1].split(gc.END)[0]
    assert "DRY RUN" in section
    assert "kernel tests: passed 1 passed" in section
    assert "- harvest " in section and "tok/s vs bare forward" in section
    assert "| 128 |" in section and "| 256 |" in section  # the step table, both sizes
    assert "2 SAEs in one pass" in section
    assert '"dry_run": true' in page.read_text()


def test_write_section_appends_when_the_markers_are_missing(tmp_path):
    gc = _driver()
    out = tmp_path / "b.md"
    out.write_text("# Benchmarks\n")
    gc.write_section(out, "figures 1")
    gc.write_section(out, "figures 2")
    text = out.read_text()
    assert text.count("## GPU") == 1 and "figures 2" in text and "figures 1" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_no_cuda_device_is_refused_clearly(capsys):
    assert _driver().main(["--device=cuda"]) == 3
    assert "no CUDA device visible" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_script_refuses_a_machine_without_gpu():
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 3
    assert "no NVIDIA GPU on this machine" in proc.stderr
