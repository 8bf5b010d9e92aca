"""Scale-out benchmark: 2 processes vs 1 (harvest, sweep training, one SAE with DDP), and a
remote store (S3-compatible server on loopback) vs the same store on local disk.

All figures of one run come from the same machine and data:

- *harvest*: ``masksae harvest --devices cpu,cpu`` (two ranks, one torch thread each) vs one
  process with as many threads as ranks; wall time of the whole command (process start-up,
  model loading, the harvest and finalising).
- *sweep*: a sweep of 4 SAEs with ``--devices cpu,cpu`` (each rank trains 2 runs, reading
  the same stream) vs one process training all 4; wall time.
- *DDP*: one SAE data-parallel on 2 ranks (each half of every batch, gradients all-reduced
  over gloo) vs one process; wall time.
- *remote stream*: the training stream (bf16 at rest -> fp32 batches) of a store on a moto
  S3 server on 127.0.0.1 through the local chunk cache: the first epoch (every chunk fetched
  whole and checksum-verified) and the next epochs (from the cache), vs the local store.

``main(quick=False)`` prints the table and writes ``docs/bench/scaleout.md``. Needs the dev
extras (s3fs, moto[server]) for the remote part, which is skipped without them.
"""

from __future__ import annotations

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
DOC = HERE.parent / "docs" / "bench" / "scaleout.md"
log = logging.getLogger("bench_scaleout")


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------- harvest
def bench_harvest(work: Path, quick: bool) -> dict[str, Any]:
    from masksae.harvest import HarvestConfig, run_harvest

    if quick:
        from masksae.models.tiny import build_tiny_model

        model = str(build_tiny_model(work / "tiny", "llama", n_layers=4, d_model=64))
        kw = dict(model=model, layer=2, tokens=16_384, context_length=64)
    else:
        kw = dict(model="bundled:smollm2-135m", layer=15, tokens=16_384, context_length=128)
    base = dict(corpus="bundled", mask_prob=0.3, batch_size=8, device="cpu", seed=0, **kw)
    threads = torch.get_num_threads()
    one, t_one = _timed(
        lambda: run_harvest(HarvestConfig(out=str(work / "h1"), **base), progress=False)
    )
    two, t_two = _timed(
        lambda: run_harvest(
            HarvestConfig(out=str(work / "h2"), devices=("cpu", "cpu"), **base), progress=False
        )
    )
    from masksae.storage import ActivationStore

    same = (
        ActivationStore.open(work / "h1").fingerprint
        == ActivationStore.open(work / "h2").fingerprint
    )
    return {
        "model": kw["model"] if not quick else "tiny random llama (4 x 64)",
        "tokens": one.total_tokens,
        "one_process_s": t_one,
        "one_process_threads": threads,
        "two_ranks_s": t_two,
        "speedup": t_one / t_two,
        "identical_store": same,
    }


# ---------------------------------------------------------------------------- training
def _train_store(work: Path, quick: bool) -> Path:
    from masksae.storage import ChunkData, StoreSpec, StoreWriter

    n, d = (16_384, 128) if quick else (131_072, 576)
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n, d), dtype=np.float32)
    spec = StoreSpec(d_model=d, dtype="float32", chunk_tokens=8192, total_tokens=n)
    path = work / "train-store"
    with StoreWriter.open(path, spec) as writer:
        for i in range(writer.n_chunks):
            lo, hi = writer.chunk_bounds(i)
            writer.write_chunk(
                i,
                ChunkData(
                    activations=acts[lo:hi],
                    token_ids=np.zeros(hi - lo, np.int32),
                    masked=np.zeros(hi - lo, bool),
                    excluded=np.zeros(hi - lo, bool),
                    seq_index=np.arange(lo, hi) // 128,
                    position=(np.arange(lo, hi) % 128).astype(np.int32),
                ),
            )
    return path


def bench_training(work: Path, quick: bool) -> dict[str, Any]:
    from masksae.train.config import SweepConfig, TrainConfig
    from masksae.train.sweep import train_sweep

    store = _train_store(work, quick)
    d_sae, steps = (256, 20) if quick else (2048, 60)
    train = dict(steps=steps, batch_size=1024, warmup_steps=5, log_every=10, device="cpu")
    sae = {"architecture": "matryoshka_batch_topk", "d_sae": d_sae, "k": 20}
    sweep = SweepConfig(train=TrainConfig(**train), sae=sae, grid={"k": [10, 20, 40, 80]})
    sweep2 = SweepConfig(
        train=TrainConfig(**{**train, "device": "auto", "devices": ["cpu", "cpu"]}),
        sae=sae,
        grid={"k": [10, 20, 40, 80]},
    )
    _, t_one = _timed(lambda: train_sweep(store, sweep, work / "s1", progress=False))
    _, t_two = _timed(lambda: train_sweep(store, sweep2, work / "s2", progress=False))
    single = SweepConfig(train=TrainConfig(**train), sae={**sae, "architecture": "topk"})
    ddp = SweepConfig(
        train=TrainConfig(**{**train, "device": "auto", "devices": ["cpu", "cpu"]}),
        sae={**sae, "architecture": "topk"},
    )
    _, t_single = _timed(lambda: train_sweep(store, single, work / "d1", progress=False))
    _, t_ddp = _timed(lambda: train_sweep(store, ddp, work / "d2", progress=False))
    return {
        "d_sae": d_sae,
        "steps": steps,
        "sweep_one_process_s": t_one,
        "sweep_two_ranks_s": t_two,
        "sweep_speedup": t_one / t_two,
        "sae_one_process_s": t_single,
        "sae_ddp_two_ranks_s": t_ddp,
        "ddp_speedup": t_single / t_ddp,
    }


# ---------------------------------------------------------------------------- remote stream
def bench_remote_stream(work: Path, quick: bool) -> dict[str, Any] | None:
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        log.warning("s3fs / moto[server] not installed (dev extras): remote stream skipped")
        return None
    import bench_store
    from masksae.storage import ActivationStore
    from masksae.storage.copy import copy_store

    n = 65_536 if quick else 262_144
    acts = bench_store.synthetic_activations(n, 576)
    bits = torch.from_numpy(acts).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    local = work / "stream-local"
    bench_store.write(local, bits, "bfloat16", "none", 16_384)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    opts = {"endpoint_url": f"http://{host}:{port}"}
    try:
        s3fs.S3FileSystem(**opts).mkdir("bench")
        url = "s3://bench/stores/stream"
        upload, t_up = _timed(lambda: copy_store(local, url, destination_options=opts))
        batch = 4096

        def epoch(store: ActivationStore, seed: int) -> float:
            start = time.perf_counter()
            rows = sum(x.shape[0] for x in store.stream(batch, seed=seed))
            return rows / (time.perf_counter() - start)

        local_store = ActivationStore.open(local)
        epoch(local_store, 0)  # page cache warm
        local_tps = max(epoch(local_store, s) for s in (1, 2))
        remote = ActivationStore.open(
            url, storage_options=opts, cache_dir=work / "cache", cache_bytes=1 << 40
        )
        first = epoch(remote, 0)
        cached = max(epoch(remote, s) for s in (1, 2))
        return {
            "tokens": n,
            "store_MiB": upload.copied_bytes / 2**20,
            "upload_MBps": upload.copied_bytes / t_up / 1e6,
            "local_tokens_per_s": local_tps,
            "remote_first_epoch_tokens_per_s": first,
            "remote_cached_tokens_per_s": cached,
            "first_epoch_ratio": first / local_tps,
            "cached_ratio": cached / local_tps,
        }
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


# ---------------------------------------------------------------------------- report
def render(f: dict[str, Any], quick: bool) -> str:
    h, t, r = f["harvest"], f["training"], f["remote"]
    lines = [
        "# Scale-out benchmark (`benchmarks/bench_scaleout.py`)",
        "",
        f"Machine: {f['machine']}. Run: {'--quick (smoke sizes)' if quick else 'full sizes'}.",
        "",
        "| what | ours | baseline (same run) | ratio |",
        "|---|---:|---:|---:|",
        f"| harvest {h['tokens']} tokens ({h['model']}), 2 ranks (`--devices cpu,cpu`) | "
        f"{h['two_ranks_s']:.1f} s | one process, {h['one_process_threads']} threads: "
        f"{h['one_process_s']:.1f} s | {h['speedup']:.2f}x |",
        f"| sweep of 4 MatryoshkaBatchTopK SAEs (F {t['d_sae']}, {t['steps']} steps), 2 ranks | "
        f"{t['sweep_two_ranks_s']:.1f} s | one process: {t['sweep_one_process_s']:.1f} s | "
        f"{t['sweep_speedup']:.2f}x |",
        f"| one TopK SAE data-parallel (DDP, gloo), 2 ranks | {t['sae_ddp_two_ranks_s']:.1f} s | "
        f"one process: {t['sae_one_process_s']:.1f} s | {t['ddp_speedup']:.2f}x |",
    ]
    if r is not None:
        lines += [
            f"| training stream from loopback S3, first epoch (fetch + verify + cache) | "
            f"{r['remote_first_epoch_tokens_per_s']:,.0f} tok/s | local store "
            f"{r['local_tokens_per_s']:,.0f} tok/s | {r['first_epoch_ratio']:.2f} |",
            f"| same, later epochs (from the chunk cache) | "
            f"{r['remote_cached_tokens_per_s']:,.0f} tok/s | local store | "
            f"{r['cached_ratio']:.2f} |",
            f"| `store copy` local -> loopback S3 ({r['store_MiB']:.0f} MiB, verified on "
            f"arrival) | {r['upload_MBps']:.0f} MB/s | | |",
        ]
    lines += [
        "",
        f"The 2-rank harvest wrote the same store as one process: {h['identical_store']} "
        "(equal fingerprints). Wall times include process start-up and model loading, which a "
        "short run pays in full. On a 2-core machine two ranks of one thread compete with one "
        "process of two threads for the same cores: the ratios say what the process layer "
        "costs or saves there; on GPUs each rank has its own device.",
    ]
    return "\n".join(lines) + "\n"


def main(quick: bool = False) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    try:
        figures = {
            "harvest": bench_harvest(work, quick),
            "training": bench_training(work, quick),
            "remote": bench_remote_stream(work, quick),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}, load avg {os.getloadavg()[0]:.1f}",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(figures, quick)
    print(text)
    if not quick:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text, encoding="utf-8")
    return figures


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(HERE))
    main(quick="--quick" in sys.argv)
