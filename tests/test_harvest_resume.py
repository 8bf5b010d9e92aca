"""Resume after SIGKILL: the finished store equals an uninterrupted harvest, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from masksae.harvest import HarvestConfig, run_harvest
from masksae.storage import ActivationStore
from masksae.storage.schema import ARRAY_NAMES

# the real CLI, with every chunk slowed down so that the kill lands mid-harvest
SLOW_CLI = """
import time
import masksae.harvest.runner as runner
original = runner._harvest_chunk
def slow(*args):
    time.sleep(0.5)
    return original(*args)
runner._harvest_chunk = slow
from masksae.cli import app
app(prog_name="masksae")
"""
TOKENS, CONTEXT, CHUNK_SEQS = 2048, 32, 4  # 16 chunks


def _args(model: Path, corpus: Path, out: Path) -> list[str]:
    return [
        "harvest",
        "--model",
        str(model),
        "--layer",
        "1",
        "--corpus",
        str(corpus),
        "--tokens",
        str(TOKENS),
        "--mask-prob",
        "0.3",
        "--context-length",
        str(CONTEXT),
        "--batch-size",
        "4",
        "--chunk-sequences",
        str(CHUNK_SEQS),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_corpus_jsonl):
    out = tmp_path / "killed"
    args = _args(tiny_model_dir, tiny_corpus_jsonl, out)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    manifests = out / "_chunks"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifests.is_dir() and len(list(manifests.glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    n_done = len(list(manifests.glob("*.json")))
    assert 1 <= n_done < TOKENS // (CONTEXT * CHUNK_SEQS)
    assert not ActivationStore.open(out, require_complete=False).is_complete

    rerun = subprocess.run(
        [sys.executable, "-c", "from masksae.cli import app; app(prog_name='masksae')", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed" in rerun.stderr

    ref_out = tmp_path / "uninterrupted"
    run_harvest(
        HarvestConfig(
            out=str(ref_out),
            model=str(tiny_model_dir),
            layer=1,
            corpus=str(tiny_corpus_jsonl),
            tokens=TOKENS,
            mask_prob=0.3,
            context_length=CONTEXT,
            batch_size=4,
            chunk_sequences=CHUNK_SEQS,
            dtype="float32",
            device="cpu",
            seed=3,
        ),
        progress=False,
    )
    resumed, ref = ActivationStore.open(out), ActivationStore.open(ref_out)
    assert resumed.is_complete and resumed.verify() == []
    assert resumed.provenance == ref.provenance
    a, b = resumed.read(0, TOKENS), ref.read(0, TOKENS)
    for name in ARRAY_NAMES:
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and np.array_equal(x, y), name  # bit-exact
    assert resumed.fingerprint == ref.fingerprint
