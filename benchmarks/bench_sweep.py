"""Sweep efficiency and data wait of `masksae train`.

1. N = 4 MatryoshkaBatchTopK SAEs (k = 20, 40, 80, 160) trained from ONE pass over a store
   vs 4 separate passes (one Trainer per SAE): wall-time ratio separate / sweep.
2. Fraction of step time spent waiting for the store stream (target < 5%), for the sweep and
   for a single SAE (the fastest consumer, so the hardest case for the reader).

The store is synthetic (Gaussian activations, d_model 576 as SmolLM2-135M) written with the
store's default compression, so the reader does its real work (decompress, shuffle).
Results go to docs/bench/train.md.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bench_sweep")
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bench" / "train.md"


def _write_store(path: Path, n_tokens: int, d_model: int, chunk_tokens: int):
    from masksae.storage import ActivationStore, ChunkData, StoreSpec, StoreWriter

    rng = np.random.default_rng(0)
    spec = StoreSpec(
        d_model=d_model,
        dtype="float32",
        chunk_tokens=chunk_tokens,
        total_tokens=n_tokens,
        provenance={"model": "synthetic-bench", "layer": 0},
    )
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


def _train(store, runs, cfg, out: Path):
    from masksae.train.trainer import Trainer

    start = time.perf_counter()
    summary = Trainer(store, runs, cfg, out, progress=False).train()
    return time.perf_counter() - start, summary


def main(quick: bool = False) -> dict:
    from masksae.train.config import RunSpec, TrainConfig

    d_model, d_sae, batch, steps = (64, 256, 256, 8) if quick else (576, 2048, 1024, 40)
    ks = (4, 8, 16, 32) if quick else (20, 40, 80, 160)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        store = _write_store(tmp / "store", (steps + 2) * batch, d_model, 16 * 128)
        cfg = TrainConfig(
            steps=steps,
            batch_size=batch,
            warmup_steps=steps // 4,
            checkpoint_every=0,
            log_every=steps,
            device="cpu",
        )
        runs = [
            RunSpec(
                f"k{k}", {"architecture": "matryoshka_batch_topk", "d_sae": d_sae, "k": k}, None, 0
            )
            for k in ks
        ]
        _train(
            store,
            runs[:1],
            TrainConfig(
                steps=2, batch_size=batch, warmup_steps=1, checkpoint_every=0, device="cpu"
            ),
            tmp / "warm",
        )
        sweep_s, sweep = _train(store, runs, cfg, tmp / "sweep")
        separate_s, single_wait = 0.0, []
        for run in runs:
            t, summary = _train(store, [run], cfg, tmp / f"solo-{run.name}")
            separate_s += t
            single_wait.append(summary.data_wait_frac)
        result = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
            + f", {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)",
            "load_avg_1min_at_end": round(os.getloadavg()[0], 1),
            "d_model": d_model,
            "d_sae": d_sae,
            "batch_size": batch,
            "steps": steps,
            "ks": ks,
            "sweep_wall_s": round(sweep_s, 2),
            "separate_wall_s": round(separate_s, 2),
            "speedup_separate_over_sweep": round(separate_s / sweep_s, 2),
            "data_wait_frac_sweep": round(sweep.data_wait_frac, 4),
            "data_wait_frac_single_sae": round(float(np.mean(single_wait)), 4),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"sweep of {len(ks)} SAEs in one pass: {result['sweep_wall_s']} s; "
        f"{len(ks)} separate passes: {result['separate_wall_s']} s "
        f"-> {result['speedup_separate_over_sweep']}x"
    )
    print(
        f"data wait: sweep {100 * result['data_wait_frac_sweep']:.2f}%, single SAE "
        f"{100 * result['data_wait_frac_single_sae']:.2f}% of step time (target < 5%)"
    )
    if not quick:
        _write_doc(result)
    return result


def _write_doc(r: dict) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(f"""# Train benchmarks (`benchmarks/bench_sweep.py`)

Machine: {r["machine"]}; 1-minute load average at the end {r["load_avg_1min_at_end"]}
(a shared machine: wall times are noisy, ratios within one run are the figure to read).
Synthetic store (Gaussian activations, float32, default
compression), d_model {r["d_model"]}, MatryoshkaBatchTopK d_sae {r["d_sae"]}, k in
{list(r["ks"])}, batch {r["batch_size"]}, {r["steps"]} steps, fused kernels, CPU.

| measure | value |
|---|---|
| {len(r["ks"])} SAEs, one pass (sweep) | {r["sweep_wall_s"]} s |
| {len(r["ks"])} SAEs, separate passes | {r["separate_wall_s"]} s |
| separate / sweep wall time | **{r["speedup_separate_over_sweep"]}x** |
| data wait, sweep (share of step time) | {100 * r["data_wait_frac_sweep"]:.2f}% |
| data wait, single SAE | {100 * r["data_wait_frac_single_sae"]:.2f}% (target < 5%) |

The sweep reads and decodes each batch once for all SAEs; on CPU the SAE steps dominate,
so the gain of a sweep is the saved reading/shuffling plus the shared per-step overhead;
on a GPU (SAE steps much faster) the saving grows. Regenerate with
`python benchmarks/run_all.py --only bench_sweep`.
""")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
