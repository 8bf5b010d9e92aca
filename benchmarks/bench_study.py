"""Per-stage throughput behind the sizing of `make study` (docs/study.md).

Measured in one process, interleaved so that load from other jobs hits every variant alike:

1. **Harvest**: the truncated forward of the bundled SmolLM2-135M to layer 15 (what a harvest
   spends >90% of its time on, see docs/bench/harvest.md) at context 128, float32 vs bfloat16
   model weights, batch 8 vs 32 sequences; plus the CPU cost of the corruption draws per token
   (masking's draws, random replacement, the Gaussian noise of d_model floats).
2. **Training**: the real Trainer on a synthetic float32 store (d_model 576): one pass of
   MatryoshkaBatchTopK SAEs - the sweep of four (k = 20, 40, 80, 160) and one (k = 20) - at
   several dictionary sizes F and batch sizes B, fp32 vs bf16 autocast. Step time is
   (wall of 16 steps - wall of 4 steps) / 12, so setup and the geometric-median init cancel.

``main(quick=True)`` uses a tiny random model and sizes (smoke run). Results go to
docs/bench/study.md; docs/study.md turns them into the study's sizing.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "bench" / "study.md"
log = logging.getLogger("bench_study")


def _forward_tok_s(lm: Any, layer: int, ids: torch.Tensor, batch: int) -> float:
    from masksae.models import capture_resid_post

    start = time.perf_counter()
    for lo in range(0, len(ids), batch):
        part = ids[lo : lo + batch]
        capture_resid_post(lm, part, torch.ones_like(part), layer).float().cpu()
    return ids.numel() / (time.perf_counter() - start)


def harvest_figures(quick: bool, work: Path) -> dict[str, Any]:
    """Forward tok/s per (dtype, batch) and the corruption draws' tok/s."""
    from masksae.harvest import HarvestConfig, plan_harvest
    from masksae.harvest.corruption import (
        Corruption,
        block_noise,
        corrupt_block,
        uniform_table,
    )
    from masksae.models import load_model

    if quick:
        from masksae.models.tiny import build_tiny_model

        model = str(build_tiny_model(work / "tiny", "llama", n_layers=4, d_model=64))
        layer, n_seqs, context = 2, 16, 64
    else:
        model, layer, n_seqs, context = "bundled:smollm2-135m", 15, 64, 128
    lms = {dtype: load_model(model, dtype=dtype, device="cpu") for dtype in ("float32", "bfloat16")}
    cfg = HarvestConfig(
        out=str(work / "unused"), model=model, layer=layer, tokens=n_seqs * context,
        context_length=context, mask_prob=0.3, device="cpu",
    )  # fmt: skip
    plan = plan_harvest(cfg, lm=lms["float32"])
    ids_np = np.stack(list(plan.sequences()))
    ids = torch.from_numpy(ids_np.astype(np.int64))
    variants = list(itertools.product(("float32", "bfloat16"), (8, 32)))
    for dtype, batch in variants[:2]:  # warm-up
        _forward_tok_s(lms[dtype], layer, ids[:batch], batch)
    samples: dict[str, list[float]] = {f"{d} b{b}": [] for d, b in variants}
    for _ in range(2):
        for dtype, batch in variants:
            samples[f"{dtype} b{batch}"].append(_forward_tok_s(lms[dtype], layer, ids, batch))
    forward = {name: float(np.mean(v)) for name, v in samples.items()}
    # corruption draws (CPU, numpy) per token
    d_model = lms["float32"].d_model
    seqs = np.arange(len(ids_np))
    specials = plan.special_ids
    rep_ids, rep_cdf = uniform_table(len(lms["float32"].tokenizer), specials)
    kinds = {
        "mask": Corruption("mask", 0.3, 0, plan.mask_id),
        "random_uniform": Corruption(
            "random_uniform", 0.3, 0, plan.mask_id, replacement_ids=rep_ids, replacement_cdf=rep_cdf
        ),
        "delete": Corruption("delete", 0.3, 0, plan.mask_id, fill_id=0),
    }
    draws: dict[str, float] = {}
    for name, corruption in kinds.items():
        start = time.perf_counter()
        corrupt_block(ids_np, seqs, corruption, specials)
        draws[name] = ids_np.size / (time.perf_counter() - start)
    noise = Corruption("noise", 0.3, 0, plan.mask_id, noise_sigma=1.0)
    excluded = np.zeros(ids_np.shape, dtype=bool)
    start = time.perf_counter()
    block_noise(seqs, excluded, d_model, noise)
    draws["noise (d_model floats)"] = ids_np.size / (time.perf_counter() - start)
    return {
        "model": model,
        "layer": layer,
        "tokens": int(ids.numel()),
        "context": context,
        "forward_tok_s": forward,
        "draws_tok_s": draws,
    }


def _write_store(path: Path, n_tokens: int, d_model: int):
    from masksae.storage import ActivationStore, ChunkData, StoreSpec, StoreWriter

    rng = np.random.default_rng(0)
    spec = StoreSpec(
        d_model=d_model, dtype="float32", chunk_tokens=16 * 128, total_tokens=n_tokens,
        provenance={"model": "synthetic-bench", "layer": 0},
    )  # fmt: skip
    with StoreWriter.open(path, spec) as writer:
        for c in range(spec.n_chunks):
            a, b = spec.chunk_bounds(c)
            n = b - a
            writer.write_chunk(
                c,
                ChunkData(
                    activations=rng.standard_normal((n, d_model), dtype=np.float32),
                    token_ids=np.zeros(n, np.int32),
                    masked=np.zeros(n, bool),
                    excluded=np.zeros(n, bool),
                    seq_index=(np.arange(a, b) // 128).astype(np.int64),
                    position=(np.arange(a, b) % 128).astype(np.int32),
                ),
            )
    return ActivationStore.open(path)


def _train_wall(store, ks, d_sae, batch, steps, bf16, out: Path) -> float:
    from masksae.train.config import RunSpec, TrainConfig
    from masksae.train.trainer import Trainer

    cfg = TrainConfig(
        steps=steps, batch_size=batch, warmup_steps=2, checkpoint_every=0, log_every=steps,
        device="cpu", autocast_bf16=bf16,
    )  # fmt: skip
    runs = [
        RunSpec(f"k{k}", {"architecture": "matryoshka_batch_topk", "d_sae": d_sae, "k": k}, None, 0)
        for k in ks
    ]
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    Trainer(store, runs, cfg, out, progress=False).train()
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return wall


def training_figures(quick: bool, work: Path) -> dict[str, Any]:
    """Seconds per step of the 4-SAE sweep and of one SAE, per (F, B, precision)."""
    if quick:
        d_model, grid, sweep_ks, short, long = (
            64,
            [(256, 256, False), (256, 256, True)],
            (4, 8),
            2,
            4,
        )
    else:
        d_model, short, long = 576, 4, 16
        sweep_ks = (20, 40, 80, 160)
        grid = [
            (1024, 1024, False),
            (2048, 1024, False),
            (2048, 2048, False),
            (4096, 1024, False),
            (4096, 2048, False),
            (2048, 1024, True),
            (4096, 2048, True),
        ]
    max_batch = max(b for _, b, _ in grid)
    store = _write_store(work / "store", (long + 2) * max_batch, d_model)
    rows = []
    for d_sae, batch, bf16 in grid:
        row: dict[str, Any] = {"d_sae": d_sae, "batch": batch, "bf16": bf16}
        for label, ks in (("sweep", sweep_ks), ("single", sweep_ks[:1])):
            t_short = _train_wall(store, ks, d_sae, batch, short, bf16, work / "run")
            t_long = _train_wall(store, ks, d_sae, batch, long, bf16, work / "run")
            step_s = max(t_long - t_short, 1e-9) / (long - short)
            row[f"{label}_step_s"] = step_s
            row[f"{label}_tok_s"] = batch / step_s
        rows.append(row)
        log.info("train %s", row)
    return {"d_model": d_model, "sweep_ks": sweep_ks, "rows": rows}


def main(quick: bool = False) -> dict[str, Any]:
    """Run both measurements; print and record them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-study-"))
    try:
        start = time.perf_counter()
        harvest = harvest_figures(quick, work)
        train = training_figures(quick, work)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "harvest": harvest,
        "train": train,
        "seconds": seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)",
        "load_avg_1min_at_end": round(os.getloadavg()[0], 1),
        "quick": quick,
    }
    text = _doc(result)
    print(text)
    if not quick:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
    return result


def _doc(r: dict[str, Any]) -> str:
    h, t = r["harvest"], r["train"]
    fwd = "\n".join(f"| {name} | {v:,.0f} |" for name, v in h["forward_tok_s"].items())
    draws = "\n".join(f"| {name} | {v:,.0f} |" for name, v in h["draws_tok_s"].items())
    rows = "\n".join(
        f"| {row['d_sae']} | {row['batch']} | {'bf16' if row['bf16'] else 'fp32'} | "
        f"{row['sweep_step_s']:.3f} | {row['sweep_tok_s']:,.0f} | {row['single_step_s']:.3f} | "
        f"{row['single_tok_s']:,.0f} |"
        for row in t["rows"]
    )
    return f"""# Study sizing benchmarks (`benchmarks/bench_study.py`)

Machine: {r["machine"]}; 1-minute load average at the end {r["load_avg_1min_at_end"]}; total
{r["seconds"]:.0f} s. A shared machine: read ratios within this run, and re-measure on a quiet
one before trusting absolute figures.

## Harvest: truncated forward of {h["model"]} to layer {h["layer"]} ({h["tokens"]} tokens, context {h["context"]}, mean of 2 interleaved rounds)

| model dtype, batch (sequences) | tok/s |
|---|---|
{fwd}

Corruption draws on the CPU (numpy), same tokens:

| draw | tok/s |
|---|---|
{draws}

## Training: MatryoshkaBatchTopK, d_model {t["d_model"]}, one pass, fused step, CPU

sweep = the {len(t["sweep_ks"])} SAEs k = {", ".join(map(str, t["sweep_ks"]))} stepping on each batch; single = k = {t["sweep_ks"][0]} alone.

| F | batch | precision | sweep s/step | sweep tok/s | single s/step | single tok/s |
|---|---|---|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(quick=parser.parse_args().quick)
