"""CE/KL with the SAE spliced in (``evaluate.downstream``): passes that resume after the hooked
block vs passes from the embeddings, on the bundled SmolLM2 (layer 15 of 30), interleaved.

Two situations, each timed both ways in turn on the same data:
- first checkpoint: no cache; clean + spliced + zero-ablation passes per batch;
- next checkpoint: clean log-probs, residual and baseline cached; the spliced pass only.
The SAE is random (MatryoshkaBatchTopK, F 4096): the cost does not depend on its quality.
Writes ``docs/bench/downstream.md``.
"""

from __future__ import annotations

from masksae.allocator import keep_freed_memory
from masksae.threads import apply_thread_env_defaults

apply_thread_env_defaults()  # as the CLI does, before torch starts OpenMP
keep_freed_memory()  # as the CLI does (masksae.allocator)

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "bench" / "downstream.md"
MODEL, LAYER = "bundled:smollm2-135m", 15


def main(quick: bool = False) -> dict:
    from masksae.evaluate import downstream as ds
    from masksae.models import load_model
    from masksae.train.sae import build_sae, sae_config_from_dict

    n_seq, T, reps = (2, 32, 2) if quick else (8, 128, 2)
    lm = load_model(MODEL, dtype="float32", device="cpu")
    torch.manual_seed(0)
    sae = build_sae(
        sae_config_from_dict(
            {"architecture": "matryoshka_batch_topk", "d_in": lm.d_model, "d_sae": 4096, "k": 20}
        )
    ).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(lm.tokenizer), (n_seq, T), generator=g)
    attn = torch.ones_like(ids)
    keep = ds.keep_positions(ids, attn, special_ids=lm.tokenizer.all_special_ids)
    cfg = ds.DownstreamConfig(n_sequences=n_seq, batch_size=8)

    @contextlib.contextmanager
    def from_embeddings():
        import masksae.models as models

        real = models.resume_after_layer
        models.resume_after_layer = lambda *a, **k: contextlib.nullcontext()
        try:
            yield
        finally:
            models.resume_after_layer = real

    warm = {True: ds.CleanCache(1 << 30), False: ds.CleanCache(1 << 30)}
    baseline = ds.downstream_metrics(lm, sae, LAYER, ids, attn, keep, cfg)["baseline"]
    for resume in (True, False):  # fill the caches (one per way: the residual differs)
        with contextlib.nullcontext() if resume else from_embeddings():
            ds.downstream_metrics(
                lm, sae, LAYER, ids, attn, keep, cfg, baseline=baseline, clean_cache=warm[resume]
            )
    times: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    for _ in range(reps):
        for situation in ("first", "next"):
            for resume in (True, False):
                name = f"{situation} checkpoint, {'resumed' if resume else 'from embeddings'}"
                kwargs = {} if situation == "first" else {"baseline": baseline}
                cache = None if situation == "first" else warm[resume]
                with torch.no_grad(), contextlib.nullcontext() if resume else from_embeddings():
                    t0 = time.perf_counter()
                    results[name] = ds.downstream_metrics(
                        lm, sae, LAYER, ids, attn, keep, cfg, clean_cache=cache, **kwargs
                    )
                    times.setdefault(name, []).append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# CE/KL passes resumed after the hooked block (evaluate.downstream)",
        "",
        f"{MODEL} layer {LAYER} of {lm.n_layers}, {n_seq} sequences x {T} tokens, batch 8, "
        f"fp32 CPU, {torch.get_num_threads()} threads, load average {load:.1f}; median of "
        f"{reps} interleaved repetitions. Machine: {platform.machine()}, {os.cpu_count()} CPUs.",
        "",
        "| situation | from embeddings s | resumed s | speed-up |",
        "|---|---|---|---|",
    ]
    for situation in ("first", "next"):
        a = med[f"{situation} checkpoint, from embeddings"]
        b = med[f"{situation} checkpoint, resumed"]
        lines.append(f"| {situation} checkpoint | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    diff = max(
        abs(
            results[f"{s} checkpoint, resumed"][key]
            - results[f"{s} checkpoint, from embeddings"][key]
        )
        / abs(results[f"{s} checkpoint, from embeddings"][key])
        for s in ("first", "next")
        for key in ("ce_loss_sae", "kl_div_sae")
    )
    same = diff < 1e-6
    lines += [
        "",
        f"Largest relative difference of ce_loss_sae / kl_div_sae between the two: {diff:.1e}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not quick:
        DOC.write_text(text, encoding="utf-8")
    return {"seconds": med, "same_result": same}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    main(quick=p.parse_args().quick)
