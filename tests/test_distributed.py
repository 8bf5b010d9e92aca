"""Harvest and training on 2 CPU ranks (gloo), launched as a user would: torchrun -m masksae.

Each torchrun launch costs two Python start-ups (torch imports); the tests are few and
each covers several guarantees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from masksae.harvest import HarvestConfig, run_harvest
from masksae.storage import ActivationStore
from masksae.storage.schema import ARRAY_NAMES


def torchrun(args: list[str], *, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m masksae ARGS`` (one thread per rank)."""
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "masksae", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert a.is_complete and b.is_complete and a.verify() == [] and b.verify() == []
    assert a.provenance == b.provenance and a.spec == b.spec
    x, y = a.read(0, a.n_tokens), b.read(0, b.n_tokens)
    for name in ARRAY_NAMES:
        u, v = np.asarray(getattr(x, name)), np.asarray(getattr(y, name))
        assert u.dtype == v.dtype and np.array_equal(u, v), name  # bit-exact
    assert a.records == b.records  # checksums, counts, partial statistics, outlier counts
    assert a.attrs["statistics"] == b.attrs["statistics"]
    assert a.fingerprint == b.fingerprint


def harvest_args(out: Path, model_dir: Path, corpus: Path) -> dict:
    return dict(
        out=str(out),
        model=str(model_dir),
        layer=1,
        corpus=str(corpus),
        tokens=1536,
        mask_prob=0.3,
        context_length=32,
        batch_size=4,
        chunk_sequences=8,
        device="cpu",
        seed=7,
        outlier_norm_factor=1.2,  # low: some outliers
    )


def test_torchrun_harvest_equals_single_process_and_resumes(
    tmp_path, tiny_model_dir, tiny_corpus_jsonl
):
    kw = harvest_args(tmp_path / "single", tiny_model_dir, tiny_corpus_jsonl)
    single = run_harvest(HarvestConfig(**kw), progress=False)
    assert single.n_chunks == 6 and single.norm_outliers > 0
    out = tmp_path / "ranks"
    flags = [
        "harvest",
        "--no-progress",
        *("--out", str(out), "--model", str(tiny_model_dir), "--layer", "1"),
        *("--corpus", str(tiny_corpus_jsonl), "--tokens", "1536", "--mask-prob", "0.3"),
        *("--context-length", "32", "--batch-size", "4", "--chunk-sequences", "8"),
        *("--device", "cpu", "--seed", "7", "--outlier-norm-factor", "1.2"),
    ]
    proc = torchrun(flags)
    assert "rank 0 computes 3 of 6 pending chunks" in proc.stderr
    assert_same_store(ActivationStore.open(out), ActivationStore.open(tmp_path / "single"))
    # resume with --devices (the same code path, ranks spawned here): drop two chunks
    for index in (1, 4):
        (out / "_chunks" / f"{index:06d}.json").unlink()
    again = run_harvest(
        HarvestConfig(**{**kw, "out": str(out), "devices": ("cpu", "cpu")}), progress=False
    )
    assert again.skipped_chunks == 4 and again.new_tokens == 2 * 8 * 32
    assert again.norm_outliers <= single.norm_outliers
    assert_same_store(ActivationStore.open(out), ActivationStore.open(tmp_path / "single"))


def _harvest_rank_without_weights(device: str, cfg: HarvestConfig, bad_layer_on: int) -> None:
    """One rank of a distributed harvest (spawned as torchrun would) whose weights loader
    fails the test; rank ``bad_layer_on`` alone asks for layer 99. Writes what the rank saw
    to rank<N>.json beside the store, and returns normally so that the parent sees every
    rank's outcome (spawn_local stops all ranks at the first one that raises)."""
    import dataclasses
    import json

    import transformers

    rank = int(os.environ["RANK"])
    # a rank left waiting at a collective fails after this instead of hanging the test
    os.environ["MASKSAE_DIST_TIMEOUT_S"] = "60"
    loads: list[str] = []

    def refuse(*args, **kwargs):
        loads.append(str(args[0]) if args else "?")
        raise AssertionError("the model's weights were loaded")

    transformers.AutoModelForCausalLM.from_pretrained = refuse
    if rank == bad_layer_on:
        cfg = dataclasses.replace(cfg, layer=99)
    try:
        result = run_harvest(dataclasses.replace(cfg, device=device), progress=False)
        seen = {"new_tokens": result.new_tokens, "summary": result.summary()}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        seen = {"error": type(exc).__name__, "message": str(exc)}
    seen["weight_loads"] = loads
    (Path(cfg.out).parent / f"rank{rank}.json").write_text(json.dumps(seen))


def test_torchrun_harvest_checks_before_weights_on_every_rank(
    tmp_path, tiny_model_dir, tiny_corpus_jsonl
):
    """The launched (torchrun) path makes the weight-free checks first, as one process
    does: a complete store ends every rank without loading weights, and one rank's refusal
    fails every rank (no rank left at a barrier), also before any weights."""
    import json

    from masksae.distributed import spawn_local

    kw = {**harvest_args(tmp_path / "done" / "store", tiny_model_dir, tiny_corpus_jsonl)}
    kw.update(tokens=512, chunk_sequences=4)
    cfg = HarvestConfig(**kw)
    run_harvest(cfg, progress=False)  # the complete store (weights loaded here, not below)
    bad = HarvestConfig(**{**kw, "out": str(tmp_path / "bad" / "store")})
    (tmp_path / "bad").mkdir()
    for case, bad_rank in ((cfg, -1), (bad, 1)):
        spawn_local(_harvest_rank_without_weights, (case, bad_rank), ("cpu", "cpu"))
    done = [json.loads((tmp_path / "done" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in done:
        assert seen["weight_loads"] == [] and seen["new_tokens"] == 0, seen
        assert "nothing to compute" in seen["summary"]
    refused = [json.loads((tmp_path / "bad" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in refused:
        assert seen["weight_loads"] == [], seen
        assert seen["error"] == "ModelError", seen  # the same decision on both ranks
        assert "rank 1 failed" in seen["message"] and "99" in seen["message"], seen
    assert not (tmp_path / "bad" / "store").exists()  # nothing created


def test_torchrun_data_parallel_resumes_and_matches_single_process(tmp_path):
    """One TopK SAE trained data-parallel (DDP, each rank half of every batch) after
    resuming from a single-process checkpoint: close to single-process training on the
    whole batch (averaged gradients equal the full-batch gradient up to rounding; a wrong
    resume or unsynchronised ranks would be far off)."""
    from masksae.train.config import RunSpec, TrainConfig
    from masksae.train.trainer import Trainer
    from test_train_fixtures import make_store

    store = make_store(tmp_path / "store", n_tokens=2048)
    sae = {"architecture": "topk", "d_sae": 32, "k": 4}
    name = "topk-k4-F32-s0"
    cfg = TrainConfig(
        steps=12, batch_size=128, warmup_steps=2, log_every=3, checkpoint_every=6, lr=3e-3
    )
    Trainer(store, [RunSpec(name, sae, None, 0)], cfg, tmp_path / "ref", progress=False).train()

    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 8:
            raise Stop

    with pytest.raises(Stop):
        Trainer(
            store,
            [RunSpec(name, sae, None, 0)],
            cfg,
            tmp_path / "ddp",
            progress=False,
            on_step=stop,
        ).train()
    sweep = tmp_path / "one.toml"
    sweep.write_text(
        "[train]\nsteps = 12\nbatch_size = 128\nwarmup_steps = 2\nlog_every = 3\n"
        'checkpoint_every = 6\nlr = 3e-3\ndevice = "cpu"\n'
        '[sae]\narchitecture = "topk"\nd_sae = 32\nk = 4\n'
    )
    proc = torchrun(
        [
            "train",
            "--no-progress",
            *("--store", str(tmp_path / "store"), "--out", str(tmp_path / "ddp"), "--resume"),
            *("--config", str(sweep), "--distributed", "data"),
        ]
    )
    assert proc.stdout.count(name) == 1  # rank 0 prints the summary
    got = load_file(str(tmp_path / "ddp" / name / "sae.safetensors"))
    ref = load_file(str(tmp_path / "ref" / name / "sae.safetensors"))

    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5)
    from masksae.train.metrics_log import read_metrics

    steps = [r["step"] for r in read_metrics(tmp_path / "ddp" / name)]
    assert steps == [3, 6, 9, 12]  # rank 0 logged once per step, resumed without duplicates
