"""Benchmark: full core + absorption evaluation of SAEs on the bundled SmolLM2 on CPU.

Two checkpoints on the same model and layer are evaluated in one process with an empty
activation cache: the first pays the LLM load, the activation capture, the zero-ablation
baseline and the absorption LLM stage; the second reuses them all (in memory and on disk).
The second also reuses the clean forward's log-probs kept in memory (CE/KL then runs only
the spliced forward). Reports the wall time split by phase and the first / second ratio, and records them in
docs/bench/evaluate.md. The SAEs are random (MatryoshkaBatchTopK, F = 4096): the cost of
evaluation does not depend on how well an SAE is trained.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "bench" / "evaluate.md"
MODEL = "bundled:smollm2-135m"
LAYER = 15

log = logging.getLogger("bench_evaluate")


def _checkpoint(path: Path, k: int, seed: int, d_in: int) -> None:
    from masksae.train.checkpoint import write_checkpoint
    from masksae.train.sae import build_sae, sae_config_from_dict

    torch.manual_seed(seed)
    sae = build_sae(
        sae_config_from_dict(
            {"architecture": "matryoshka_batch_topk", "d_in": d_in, "d_sae": 4096, "k": k}
        )
    )
    meta = {
        "format_version": 1,
        "run_name": path.name,
        "sae": sae.cfg.to_dict(),
        "train": {"seed": seed},
        "store": {"model": MODEL, "revision": None, "layer": LAYER, "mask_prob": 0.3},
        "store_fingerprint": None,
        "step": 0,
        "tokens": 0,
        "complete": True,
    }
    write_checkpoint(path, sae, meta, None, None)


def main(quick: bool = False) -> dict:
    from masksae.evaluate.absorption import AbsorptionConfig
    from masksae.evaluate.data import EvalDataConfig
    from masksae.evaluate.downstream import DownstreamConfig
    from masksae.evaluate.runner import EvaluateConfig, Evaluator

    n_tokens = 2048 if quick else 16384
    ce_seqs = 4 if quick else 32
    words = 8 if quick else 100
    cfg = EvaluateConfig(
        metrics=("core", "absorption"),
        data=EvalDataConfig(n_tokens=n_tokens, context_length=128),
        downstream=DownstreamConfig(n_sequences=ce_seqs),
        absorption=AbsorptionConfig(max_words_per_letter=words),
        device="cpu",
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cfg.cache_dir = tmp_path / "cache"
        ckpts = [tmp_path / "sweep" / f"run{i}" for i in range(2)]
        for i, c in enumerate(ckpts):
            _checkpoint(c, k=20 * (i + 1), seed=i, d_in=576)
        ev = Evaluator(cfg)
        runs = []
        for c in ckpts:
            t0 = time.perf_counter()
            doc = ev.evaluate(c)
            runs.append(
                {
                    "wall_s": time.perf_counter() - t0,
                    "phases": doc["timings_s"],
                    "ev": doc["metrics"]["core"]["explained_variance"],
                    "ce_rec": doc["metrics"]["core"]["downstream"]["ce_loss_recovered"],
                    "absorption_cache_hit": doc["metrics"]["absorption"].get("cache_hit"),
                    "clean_cached_seqs": doc["metrics"]["core"]["downstream"].get(
                        "clean_forward_cached_sequences", 0
                    ),
                }
            )
    first, nth = runs
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpu, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "quick": quick,
        "eval_tokens": n_tokens,
        "ce_sequences": ce_seqs,
        "absorption_words_per_letter": words,
        "first": first,
        "nth": nth,
        "ratio_first_over_nth": first["wall_s"] / nth["wall_s"],
        "load_avg_1min_end": os.getloadavg()[0],
    }
    if not quick:  # a smoke run at tiny sizes never replaces the recorded figures
        _write_doc(result)
    print(
        f"first checkpoint {first['wall_s']:.1f}s, next {nth['wall_s']:.1f}s, "
        f"ratio {result['ratio_first_over_nth']:.1f}x"
    )
    return result


def _write_doc(r: dict) -> None:
    phases = sorted(
        set(r["first"]["phases"]) | set(r["nth"]["phases"]), key=lambda p: (p == "total", p)
    )
    lines = [
        "# Evaluation cost (core + absorption), bundled SmolLM2-135M layer 15, CPU",
        "",
        f"Machine: {r['machine']}, {r['threads']} torch threads. quick={r['quick']}. "
        f"{r['eval_tokens']} held-out tokens for the reconstruction metrics, "
        f"{r['ce_sequences']} x 128-token sequences for CE/KL, absorption vocabulary capped "
        f"at {r['absorption_words_per_letter']} words per letter; MatryoshkaBatchTopK "
        "F = 4096 (random weights: cost does not depend on training). Measured by "
        "`benchmarks/bench_evaluate.py` (one run, empty cache at the start).",
        "",
        "| phase | first checkpoint (s) | next checkpoint, cached (s) |",
        "|---|---|---|",
    ]
    for p in phases:
        a = r["first"]["phases"].get(p)
        b = r["nth"]["phases"].get(p)
        lines.append(
            f"| {p} | {'' if a is None else f'{a:.2f}'} | {'' if b is None else f'{b:.2f}'} |"
        )
    lines += [
        "",
        f"First / next checkpoint wall time: **{r['ratio_first_over_nth']:.1f}x** "
        f"({r['first']['wall_s']:.1f} s vs {r['nth']['wall_s']:.1f} s). 1-minute load average "
        f"at the end: {r['load_avg_1min_end']:.2f} (the machine is shared: above the "
        "core count, phase times are inflated by contention).",
        "",
        "The first checkpoint pays the LLM load, the activation capture (load_llm, "
        "eval_data), the clean and zero-ablation forward passes and the absorption LLM "
        "stage; later ones on the same model/layer read the cache and run only the SAE, "
        "the spliced forward pass for CE/KL (the clean log-probs of "
        f"{r['nth']['clean_cached_seqs']} of {r['ce_sequences']} sequences are kept in "
        "memory, `DownstreamConfig.clean_cache_mb`) and the SAE side of absorption.",
        "",
    ]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    main(quick="--quick" in sys.argv)
