"""Per-stage throughput behind the sizing of `make study` (docs/study.md).

Measured in one process, interleaved so that load from other jobs hits every variant alike:

1. **Harvest**: the truncated forward of the bundled SmolLM2-135M to layer 15 (what a harvest
   spends >90% of its time on, see docs/bench/harvest.md) at context 128, float32 vs bfloat16
   model weights, batch 8 vs 32 sequences, 3 interleaved rounds, the fastest per variant; plus
   the CPU cost of the corruption draws per token (masking's draws, random replacement, the
   Gaussian noise of d_model floats).
2. **Training**: full MatryoshkaBatchTopK optimizer steps as the Trainer takes them (fused
   sparse path, parallel-gradient removal, clipping, Adam, decoder renorm; d_model 576) at
   several dictionary sizes F and batch sizes B, fp32 vs bf16 autocast, for k = 20, 40, 80,
   160: one step of every variant per round, 7 rounds, the minimum per variant. The sweep of
   four SAEs costs the sum of its SAEs' steps (the Trainer steps them one after another); one
   SAE is k = 20. The store stream is not timed: it waits < 3% (docs/bench/train.md).

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
        model, layer, n_seqs, context = "bundled:smollm2-135m", 15, 32, 128
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
    for _ in range(3):
        for dtype, batch in variants:
            samples[f"{dtype} b{batch}"].append(_forward_tok_s(lms[dtype], layer, ids, batch))
    # the fastest of the interleaved rounds: the closest to an uncontended run
    forward = {name: float(np.max(v)) for name, v in samples.items()}
    log.info("harvest forward tok/s %s (samples %s)", forward, samples)
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
    log.info("corruption draws tok/s %s", draws)
    return {
        "model": model,
        "layer": layer,
        "tokens": int(ids.numel()),
        "context": context,
        "forward_tok_s": forward,
        "draws_tok_s": draws,
    }


def _sae_step(sae, opt, x, step: int, total: int, bf16: bool) -> None:
    """One optimizer step as the Trainer takes it (fused path)."""
    from contextlib import nullcontext

    from masksae.train.sae import StepContext

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        out = sae.training_loss(x, StepContext(step, total, None, True))
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    sae.normalize_decoder()


def training_figures(quick: bool, work: Path) -> dict[str, Any]:
    """Seconds per step of each (F, B, precision, k), interleaved, min over rounds.

    On a machine shared with other jobs the minimum of several interleaved one-step timings
    is the closest to an uncontended step; a sweep step is the sum over its SAEs (the
    Trainer steps them one after the other on one device) and a single SAE is k = 20.
    """
    from masksae.train.sae import MatryoshkaBatchTopKConfig, build_sae

    if quick:
        d_model, grid, ks, rounds = 64, [(256, 256, False), (256, 256, True)], (4, 8), 2
    else:
        d_model, ks, rounds = 576, (20, 40, 80, 160), 7
        grid = [
            (2048, 1024, False),
            (2048, 2048, False),
            (3072, 2048, False),
            (4096, 1024, False),
            (4096, 2048, False),
            (3072, 2048, True),
            (4096, 2048, True),
        ]
    gen = torch.Generator().manual_seed(0)
    batches = {b: torch.randn(b, d_model, generator=gen) for b in {b for _, b, _ in grid}}
    models = {}
    for d_sae, batch, bf16 in grid:
        for k in ks:
            torch.manual_seed(0)
            sae = build_sae(MatryoshkaBatchTopKConfig(d_in=d_model, d_sae=d_sae, k=k))
            sae.init_from_data(batches[batch])
            opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
            _sae_step(sae, opt, batches[batch], 0, 100, bf16)  # warm-up
            models[(d_sae, batch, bf16, k)] = (sae, opt)
    best: dict[tuple, float] = {key: float("inf") for key in models}
    for r in range(rounds):
        for key, (sae, opt) in models.items():
            t0 = time.perf_counter()
            _sae_step(sae, opt, batches[key[1]], 1 + r, 100, key[2])
            best[key] = min(best[key], time.perf_counter() - t0)
    rows = []
    for d_sae, batch, bf16 in grid:
        sweep = sum(best[(d_sae, batch, bf16, k)] for k in ks)
        single = best[(d_sae, batch, bf16, ks[0])]
        row = {
            "d_sae": d_sae,
            "batch": batch,
            "bf16": bf16,
            "sweep_step_s": sweep,
            "sweep_tok_s": batch / sweep,
            "single_step_s": single,
            "single_tok_s": batch / single,
        }
        rows.append(row)
        log.info("train %s", row)
    return {"d_model": d_model, "sweep_ks": ks, "rounds": rounds, "rows": rows}


def main(quick: bool = False, parts: tuple[str, ...] = ("harvest", "train")) -> dict[str, Any]:
    """Run the measurements (``parts``: harvest, train); print and record them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-study-"))
    try:
        start = time.perf_counter()
        harvest = harvest_figures(quick, work) if "harvest" in parts else None
        train = training_figures(quick, work) if "train" in parts else None
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
    if not quick and harvest is not None and train is not None:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
    return result


def _doc(r: dict[str, Any]) -> str:
    h = r["harvest"] or {"model": "-", "layer": "-", "tokens": 0, "context": "-"}
    t = r["train"] or {"d_model": "-", "sweep_ks": (), "rows": []}
    fwd = "\n".join(f"| {name} | {v:,.0f} |" for name, v in h.get("forward_tok_s", {}).items())
    draws = "\n".join(f"| {name} | {v:,.0f} |" for name, v in h.get("draws_tok_s", {}).items())
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

## Harvest: truncated forward of {h["model"]} to layer {h["layer"]} ({h["tokens"]} tokens, context {h["context"]}, fastest of 3 interleaved rounds)

| model dtype, batch (sequences) | tok/s |
|---|---|
{fwd}

Corruption draws on the CPU (numpy), same tokens:

| draw | tok/s |
|---|---|
{draws}

## Training: MatryoshkaBatchTopK step, d_model {t["d_model"]}, fused, CPU (min of {t.get("rounds", "-")} interleaved rounds)

sweep = the {len(t["sweep_ks"])} SAEs k = {", ".join(map(str, t["sweep_ks"]))} stepping on each batch; single = the first alone.

| F | batch | precision | sweep s/step | sweep tok/s | single s/step | single tok/s |
|---|---|---|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument(
        "--parts", default="harvest,train", help="comma list of harvest, train (default both)"
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parser.parse_args()
    main(quick=args.quick, parts=tuple(args.parts.split(",")))
