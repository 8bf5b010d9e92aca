"""Benchmark: the probing suite (sparse probing, SCR, TPP, OOD) for one SAE on the bundled
SmolLM2 layer 15, CPU, demo preset: first checkpoint vs N-th.

One process, an empty cache at the start, three evaluations:
- first checkpoint: loads the LLM, captures every task's activations, fits the LLM-activation
  probes, then scores the SAE;
- N-th checkpoint, same evaluator: activations and LLM probes from the cache (in memory);
- N-th checkpoint, fresh evaluator (a new `masksae evaluate` run): the same read from disk.
The wall time of each is split by phase (LLM load, LLM activations, LLM probes, task data,
SAE encode, SAE probes, ablations) and recorded in docs/bench/probing.md; the target is the
N-th checkpoint under 2 minutes on 2 cores. The SAEs are random MatryoshkaBatchTopK with the
demo's size (F = 1024): the cost does not depend on how well an SAE is trained.
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
DOC = HERE.parent / "docs" / "bench" / "probing.md"
MODEL = "bundled:smollm2-135m"
LAYER = 15
METRICS = ("sparse_probing", "scr", "tpp", "ood")

log = logging.getLogger("bench_probing")


def _checkpoint(path: Path, k: int, seed: int, d_sae: int) -> None:
    from masksae.train.checkpoint import write_checkpoint
    from masksae.train.sae import build_sae, sae_config_from_dict

    torch.manual_seed(seed)
    sae = build_sae(
        sae_config_from_dict(
            {"architecture": "matryoshka_batch_topk", "d_in": 576, "d_sae": d_sae, "k": k}
        )
    )
    meta = {
        "format_version": 1,
        "run_name": path.name,
        "sae": sae.cfg.to_dict(),
        "train": {"seed": seed},
        "store": {"model": MODEL, "revision": None, "layer": LAYER, "mask_prob": 0.0},
        "store_fingerprint": None,
        "step": 0,
        "tokens": 0,
        "complete": True,
    }
    write_checkpoint(path, sae, meta, None, None)


def _phases(doc: dict) -> dict[str, float]:
    """Runner phases plus each metric's inner phases, summed over the four metrics."""
    out: dict[str, float] = {}
    for name, seconds in doc["timings_s"].items():
        if name not in METRICS and name != "total":
            out[f"runner:{name}"] = seconds
    for name in METRICS:
        for phase, seconds in doc["metrics"][name]["timings_s"].items():
            out[phase] = out.get(phase, 0.0) + seconds
        out[f"metric:{name}"] = doc["timings_s"][name]
    out["total"] = doc["timings_s"]["total"]
    return out


def main(quick: bool = False) -> dict:
    from masksae.evaluate.probing import probing_preset
    from masksae.evaluate.runner import EvaluateConfig, Evaluator

    preset = "tiny" if quick else "demo"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # MASKSAE_BENCH_PROBING_CACHE keeps the activation cache for a later look
        cache = Path(os.environ.get("MASKSAE_BENCH_PROBING_CACHE", tmp_path / "cache"))
        ckpts = [tmp_path / "sweep" / f"run{i}" for i in range(3)]
        for i, c in enumerate(ckpts):
            _checkpoint(c, k=20 * (i + 1), seed=i, d_sae=1024)

        def evaluator() -> Evaluator:
            return Evaluator(
                EvaluateConfig(
                    metrics=METRICS,
                    probing=probing_preset(preset),
                    cache_dir=cache,
                    device="cpu",
                    progress=False,
                )
            )

        ev = evaluator()
        runs = {}
        for label, c, e in (
            ("first", ckpts[0], ev),
            ("nth", ckpts[1], ev),
            ("nth_fresh_process", ckpts[2], evaluator()),
        ):
            t0, c0 = time.perf_counter(), time.process_time()
            doc = e.evaluate(c)
            runs[label] = {
                "wall_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0,
                "phases": _phases(doc),
                "scores": {
                    "sparse_probing_sae_top1": doc["metrics"]["sparse_probing"][
                        "sae_top_1_test_accuracy"
                    ],
                    "sparse_probing_llm_top1": doc["metrics"]["sparse_probing"][
                        "llm_top_1_test_accuracy"
                    ],
                    "ood_oracle_auc": doc["metrics"]["ood"]["mean_oracle_test_auc"],
                },
            }
            log.info("%s: %.1f s", label, runs[label]["wall_s"])
        cache_mb = sum(f.stat().st_size for f in cache.rglob("*")) / 2**20
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpu, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "preset": preset,
        "quick": quick,
        "runs": runs,
        "cache_mb": cache_mb,
        "ratio_first_over_nth": runs["first"]["wall_s"] / runs["nth"]["wall_s"],
        "load_avg_1min_end": os.getloadavg()[0],
    }
    if not quick:  # a smoke run at tiny sizes never replaces the recorded figures
        _write_doc(result)
    print(
        f"first checkpoint {runs['first']['wall_s']:.1f}s, N-th {runs['nth']['wall_s']:.1f}s "
        f"(fresh process {runs['nth_fresh_process']['wall_s']:.1f}s), ratio "
        f"{result['ratio_first_over_nth']:.1f}x"
    )
    return result


def _write_doc(r: dict) -> None:
    from masksae.evaluate.probing import probing_preset

    cfg = probing_preset(r["preset"])
    runs = r["runs"]
    phases = sorted(
        {p for run in runs.values() for p in run["phases"]},
        key=lambda p: (p == "total", p.startswith("metric:"), p.startswith("runner:"), p),
    )
    lines = [
        "# Probing suite cost (sparse probing, SCR, TPP, OOD), bundled SmolLM2-135M layer 15, CPU",
        "",
        f"Machine: {r['machine']}, {r['threads']} torch threads. Preset `{r['preset']}`: "
        f"sparse probing {', '.join(cfg.sparse_probing.tasks)} "
        f"({cfg.sparse_probing.train_per_class}/{cfg.sparse_probing.test_per_class} texts per "
        f"class); SCR {', '.join(cfg.scr.tasks)} ({cfg.scr.train_per_quadrant}/"
        f"{cfg.scr.test_per_quadrant} per quadrant); TPP {', '.join(cfg.tpp.tasks)}; OOD the "
        f"{len(cfg.ood.tasks)} datasets, {cfg.ood.n_train} training texts, top {cfg.ood.k} "
        "latents. MatryoshkaBatchTopK F = 1024 (random weights: the cost does not depend on "
        "training). Measured by `benchmarks/bench_probing.py` (one run, empty cache at the "
        "start).",
        "",
        "| phase | first checkpoint (s) | N-th, same evaluator (s) | N-th, fresh process (s) |",
        "|---|---|---|---|",
    ]
    for p in phases:
        cells = []
        for label in ("first", "nth", "nth_fresh_process"):
            v = runs[label]["phases"].get(p)
            cells.append("" if v is None else f"{v:.2f}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"First / N-th checkpoint wall time: **{r['ratio_first_over_nth']:.1f}x** "
        f"({runs['first']['wall_s']:.1f} s vs {runs['nth']['wall_s']:.1f} s; a fresh process "
        f"reading the disk cache: {runs['nth_fresh_process']['wall_s']:.1f} s). Process CPU "
        f"time (all threads; less sensitive to other load on the machine): first "
        f"{runs['first']['cpu_s']:.1f} s, N-th {runs['nth']['cpu_s']:.1f} s, fresh process "
        f"{runs['nth_fresh_process']['cpu_s']:.1f} s. Cache on disk: "
        f"{r['cache_mb']:.0f} MiB. 1-minute load average at the end: "
        f"{r['load_avg_1min_end']:.2f} (the machine is shared: above the core count, times "
        "are inflated by contention).",
        "",
        "Phases: `llm_activations` = the LLM passes over the task texts (first checkpoint "
        "only); `llm_probes` = fitting the probes on LLM activations (sparse probing's "
        "reference lines, SCR/TPP probes, the OOD oracle; first checkpoint only); "
        "`sae_encode` = encoding the cached activations with the SAE; `sae_probes` = the "
        "SAE-latent probes (sparse probing top-k and full; OOD's L1 probe with its C search); "
        "`sae_ablation` = SCR/TPP ablations; `task_data` = reading and sampling the task "
        "files; `metric:<name>` = each metric's wall time; `runner:load_llm` = loading the "
        "LLM (absent when everything is cached).",
        "",
    ]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    main(quick="--quick" in sys.argv)
