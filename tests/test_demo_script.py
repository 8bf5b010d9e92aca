"""`make demo` itself: scripts/demo.sh end to end at a tiny size on the bundled model.

The README's first command must never break silently again (a p = 0 store once failed its
own verify while every other test passed), so CI runs the real script: both harvests with
their `store verify`, the sweep training, evaluation and the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from masksae.storage import ActivationStore

REPO = Path(__file__).resolve().parents[1]

TINY_SWEEP = """
[train]
steps = 12
batch_size = 256
warmup_steps = 2
seed = 0
data_seed = 0
normalize_activations = true
checkpoint_every = 6
log_every = 4
device = "cpu"

[sae]
architecture = "matryoshka_batch_topk"
d_sae = 256
threshold_start_step = 4
threshold_beta = 0.9
dead_tokens_threshold = 2000

[grid]
k = [8, 16]
"""


@pytest.mark.slow
def test_demo_script_end_to_end(tmp_path):
    config = tmp_path / "tiny-sweep.toml"
    config.write_text(TINY_SWEEP)
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "MASKSAE": str(Path(sys.executable).parent / "masksae"),
        "DEMO_OUT": str(out),
        "DEMO_TOKENS": "3000",
        "DEMO_TRAIN_CONFIG": str(config),
        "DEMO_ABSORPTION_WORDS": "4",
        "DEMO_EVAL_TOKENS": "1024",
        "DEMO_CE_SEQUENCES": "2",
        "DEMO_PROBING_PRESET": "tiny",
        "OMP_NUM_THREADS": "2",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"demo finished: report in {out}/report/report.md" in proc.stdout
    assert proc.stdout.count("SMOKE RUN") == 2  # the banner, at the start and the end
    for p in ("0.0", "0.3"):
        store = ActivationStore.open(out / "stores" / f"p{p}")
        assert store.verify() == [] and store.provenance["mask_prob"] == float(p)
        assert sorted(d.name for d in (out / "sae" / f"p{p}").iterdir() if d.is_dir())
    report = (out / "report" / "report.md").read_text()
    assert "0.3" in report and "k" in report
    assert "SCR %" in report and "OOD probing AUC %, SAE" in report  # the probing suite ran
    assert list((out / "report").glob("ood_probing_*.png"))
    results = sorted((out / "eval").rglob("*.json"))
    assert len(results) >= 4  # one result per checkpoint
    metrics = json.loads(results[0].read_text())["metrics"]
    assert {"core", "absorption", "cooccurrence"} <= set(metrics)
    assert metrics["absorption"]["settings"]["bos"]["prepend_bos"]
