"""Activation store benchmark: compression options, and shuffled-stream read throughput
against a raw numpy memmap baseline, measured in one run on this machine.

``main(quick=False)`` prints two tables, writes them to ``docs/bench/store.md`` and returns
the figures. Activations come from a real model when ``MASKSAE_BENCH_STORE`` names an
existing store (its first tokens are used); otherwise they are synthetic: Gaussian with
log-normal per-dimension scales, a few heavy-tailed (Student-t) dimensions and a mean
offset, like a residual stream.
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

from masksae.storage import ActivationStore, ChunkData, StoreSpec, StoreWriter
from masksae.storage.codecs import DEFAULT_COMPRESSION
from masksae.storage.layout import directory_bytes
from masksae.storage.stream import bf16_bits_to_float32

log = logging.getLogger("bench_store")
DOC = Path(__file__).resolve().parents[1] / "docs" / "bench" / "store.md"
CODECS = (
    "none",
    "zstd:1",
    "zstd:3",
    "blosc-lz4-shuffle",
    "blosc-lz4-bitshuffle",
    "blosc-zstd-shuffle:1",
    "blosc-zstd-bitshuffle:1",
)
DTYPES = ("float32", "float16", "bfloat16")
SEQ_LEN = 1024
DECISION = f"""## Default codec: `{DEFAULT_COMPRESSION}`

bf16 activations compress little (the mantissa bits are noise; only the sign/exponent byte
has structure): the best codecs save about a fifth of the disk, and every codec costs
decode time on each epoch of every SAE trained on the cache. Uncompressed shards also let
the reader memory-map each shard and copy every row exactly once (page cache -> shuffle
buffer), which is what keeps the shuffled stream near the raw-memmap rate; through zarr's
decode path even `zstd:1` reads are several times slower. So the default is `none`; pass
`zstd:1` (the best ratio at the lowest cost) when disk or transfer size matters more than
read speed, e.g. for caches shipped to teammates. Writing is bounded by checksum, float64
statistics, fsync and zarr overhead rather than by the codec, and the background writer
overlaps it with the model's forward pass.
"""


def synthetic_activations(n_tokens: int, d_model: int, seed: int = 0) -> np.ndarray:
    """Residual-stream-like float32 activations [n_tokens, d_model]."""
    rng = np.random.default_rng(seed)
    scale_D = rng.lognormal(0.0, 0.5, d_model).astype(np.float32)
    mean_D = rng.normal(0.0, 0.3, d_model).astype(np.float32)
    acts = rng.standard_normal((n_tokens, d_model), dtype=np.float32) * scale_D + mean_D
    heavy = rng.choice(d_model, size=max(1, d_model // 100), replace=False)
    acts[:, heavy] = rng.standard_t(3, (n_tokens, heavy.size)).astype(np.float32) * 20
    return acts


def real_activations(n_tokens: int) -> tuple[np.ndarray, str] | None:
    """The first ``n_tokens`` activations of the store named by $MASKSAE_BENCH_STORE."""
    path = os.environ.get("MASKSAE_BENCH_STORE")
    if not path:
        return None
    store = ActivationStore.open(path, require_complete=False)
    n = min(
        n_tokens,
        max(
            (stop for i in store.completed_chunks for _, stop in [store.chunk_bounds(i)]), default=0
        ),
    )
    data = store.read(0, n)
    acts = data.activations_torch(store.spec.dtype).float().numpy()[~data.excluded]
    prov = store.provenance
    corpus = prov.get("corpus", {})
    corpus = corpus.get("source", corpus) if isinstance(corpus, dict) else corpus
    return acts, (
        f"real activations: {prov.get('model', '?')} layer {prov.get('layer', '?')}, "
        f"context {prov.get('context_length', '?')}, p={prov.get('mask_prob', '?')}, "
        f"corpus {corpus} (`masksae harvest` store {path})"
    )


def chunk_of(acts: np.ndarray, start: int, stop: int) -> ChunkData:
    n = stop - start
    position = (np.arange(start, stop) % SEQ_LEN).astype(np.int32)
    return ChunkData(
        activations=acts[start:stop],
        token_ids=(np.arange(start, stop) % 49152).astype(np.int32),
        masked=np.zeros(n, dtype=bool),
        excluded=position == 0,
        seq_index=(np.arange(start, stop) // SEQ_LEN).astype(np.int64),
        position=position,
    )


def write(path: Path, acts: np.ndarray, dtype: str, compression: str, chunk_tokens: int) -> float:
    """Write a store; seconds from open to close (checksums and statistics included)."""
    spec = StoreSpec(
        d_model=acts.shape[1],
        dtype=dtype,
        chunk_tokens=chunk_tokens,
        total_tokens=acts.shape[0],
        provenance={"bench": True},
        compression=compression,
    )
    start = time.perf_counter()
    with StoreWriter.open(path, spec) as writer:
        for index in range(writer.n_chunks):
            writer.write_chunk(index, chunk_of(acts, *writer.chunk_bounds(index)))
    return time.perf_counter() - start


def writer_vs_raw(acts32: np.ndarray, root: Path, chunk_tokens: int, rounds: int = 3) -> dict:
    """The store writer (bf16, default codec) against writing the same bytes to plain files
    with one fsync each: the writer's ceiling for a harvest whose forward is faster than it
    (a GPU). Interleaved rounds, best of each."""
    import os

    n = acts32.shape[0] // chunk_tokens * chunk_tokens
    bits = torch.from_numpy(np.ascontiguousarray(acts32[:n])).to(torch.bfloat16)
    bits = bits.view(torch.int16).numpy().view(np.uint16)
    writer_s, raw_s = [], []
    for r in range(rounds):
        writer_s.append(
            write(root / f"writer{r}", bits, "bfloat16", DEFAULT_COMPRESSION, chunk_tokens)
        )
        raw_dir = root / f"raw{r}"
        raw_dir.mkdir()
        start = time.perf_counter()
        for i, lo in enumerate(range(0, n, chunk_tokens)):
            with open(raw_dir / f"{i}.bin", "wb") as fh:
                fh.write(memoryview(bits[lo : lo + chunk_tokens]).cast("B"))
                fh.flush()
                os.fsync(fh.fileno())
        raw_s.append(time.perf_counter() - start)
        shutil.rmtree(root / f"writer{r}", ignore_errors=True)
        shutil.rmtree(raw_dir, ignore_errors=True)
    best_writer, best_raw = min(writer_s), min(raw_s)
    return {
        "n_tokens": n,
        "d_model": acts32.shape[1],
        "chunk_tokens": chunk_tokens,
        "writer_tokens_per_s": n / best_writer,
        "raw_tokens_per_s": n / best_raw,
        "writer_ms_per_chunk": 1e3 * best_writer / (n // chunk_tokens),
        "raw_ms_per_chunk": 1e3 * best_raw / (n // chunk_tokens),
        "ratio": best_raw / best_writer,
    }


def compression_table(acts32: np.ndarray, root: Path, chunk_tokens: int) -> list[dict]:
    """Ratio and write/read MB/s (of raw at-rest bytes) per dtype x codec."""
    rows = []
    for dtype in DTYPES:
        acts = torch.from_numpy(acts32).to(getattr(torch, dtype))
        acts_np = (
            acts.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else acts.numpy()
        )
        raw = acts_np.nbytes
        for codec in CODECS:
            path = root / f"c-{dtype}-{codec.replace(':', '_')}"
            seconds_w = write(path, acts_np, dtype, codec, chunk_tokens)
            store = ActivationStore.open(path)
            start = time.perf_counter()
            for index in range(store.n_chunks):
                store.read_chunk(index, ("activations",))
            seconds_r = time.perf_counter() - start
            disk = directory_bytes(path / "activations")
            rows.append(
                {
                    "dtype": dtype,
                    "codec": codec,
                    "ratio": raw / disk,
                    "write_MBps": raw / seconds_w / 1e6,
                    "read_MBps": raw / seconds_r / 1e6,
                }
            )
            log.info(
                "%s %s: ratio %.3f write %.0f MB/s read %.0f MB/s",
                dtype,
                codec,
                rows[-1]["ratio"],
                rows[-1]["write_MBps"],
                rows[-1]["read_MBps"],
            )
            shutil.rmtree(path)
    return rows


def stream_vs_memmap(
    acts32: np.ndarray, root: Path, chunk_tokens: int, batch_size: int, codecs: tuple[str, ...]
) -> dict[str, Any]:
    """Shuffled-stream tokens/s of stores (one per codec) vs shuffled gathers from a memmap."""
    bits = torch.from_numpy(acts32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    n_tokens, d_model = bits.shape
    mm_path = root / "acts.u16"
    mm = np.memmap(mm_path, dtype=np.uint16, mode="w+", shape=bits.shape)
    mm[:] = bits
    mm.flush()
    del mm
    mm = np.memmap(mm_path, dtype=np.uint16, mode="r", shape=bits.shape)

    def run_memmap() -> tuple[int, float]:
        perm = np.random.default_rng(0).permutation(n_tokens)
        start = time.perf_counter()
        n = 0
        for lo in range(0, n_tokens - batch_size + 1, batch_size):
            idx = np.sort(perm[lo : lo + batch_size])
            batch = torch.from_numpy(bf16_bits_to_float32(mm[idx]))  # same as the stream
            n += batch.shape[0]
        return n, time.perf_counter() - start

    def runner(store: ActivationStore):
        def run_store() -> tuple[int, float]:
            start = time.perf_counter()
            n = 0
            for batch in store.stream(batch_size, seed=0):  # excluded tokens filtered
                n += batch.shape[0]
            return n, time.perf_counter() - start

        return run_store

    runs = {"memmap": run_memmap}
    for codec in codecs:
        path = root / f"stream-{codec.replace(':', '_')}"
        write(path, bits, "bfloat16", codec, chunk_tokens)
        runs[codec] = runner(ActivationStore.open(path))
    best: dict[str, float] = {}
    for _round in range(4):  # interleaved, first round is the page-cache warm-up
        for name, fn in runs.items():
            n, seconds = fn()
            if _round:
                best[name] = max(best.get(name, 0.0), n / seconds)
    result: dict[str, Any] = {
        "n_tokens": n_tokens,
        "d_model": d_model,
        "batch_size": batch_size,
        "chunk_tokens": chunk_tokens,
        "memmap_tokens_per_s": best["memmap"],
        "memmap_GBps_at_rest": best["memmap"] * d_model * 2 / 1e9,
        "codecs": {},
    }
    for codec in codecs:
        result["codecs"][codec] = {
            "tokens_per_s": best[codec],
            "GBps_at_rest": best[codec] * d_model * 2 / 1e9,
            "GBps_float32_out": best[codec] * d_model * 4 / 1e9,
            "ratio": best[codec] / best["memmap"],
        }
    result["ratio"] = result["codecs"][codecs[0]]["ratio"]
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs visible, Linux {platform.release()}, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


def render(
    comp: list[dict], stream: dict[str, Any], writer: dict[str, Any], source: str, quick: bool
) -> str:
    lines = [
        "# Activation store benchmark (`benchmarks/bench_store.py`)",
        "",
        f"Machine: {machine()}.",
        f"Data: {source}.",
        "Run: " + ("--quick (smoke sizes)" if quick else "full sizes") + "; regenerate "
        "with `MASKSAE_BENCH_STORE=<a harvested store> .venv/bin/python "
        "benchmarks/bench_store.py` (without the variable: synthetic activations).",
        "",
        "## Compression (activations array only; MB/s of raw at-rest bytes)",
        "",
        "Write = StoreWriter open..close (background writer, SHA-256 checksum, float64 "
        "statistics, fsync); read = whole chunks of `activations` decoded via zarr.",
        "",
        "| dtype | codec | ratio | write MB/s | read MB/s |",
        "|---|---|---:|---:|---:|",
    ]
    for r in comp:
        lines.append(
            f"| {r['dtype']} | {r['codec']} | {r['ratio']:.3f} | "
            f"{r['write_MBps']:.0f} | {r['read_MBps']:.0f} |"
        )
    w = writer
    lines += [
        "",
        "## Store writer vs plain file writes (bf16, default codec)",
        "",
        f"{w['n_tokens']} tokens x {w['d_model']} in chunks of {w['chunk_tokens']} tokens (the "
        "harvest's default), best of 3 interleaved rounds. Writer = StoreWriter open..close "
        "(at-rest copy, SHA-256, statistics, shard and token files, fsync, completion "
        "records); baseline = the same activation bytes written to one plain file per chunk "
        "with an fsync each. The writer's rate is the most a harvest can reach when the "
        "model's forward is faster (a GPU).",
        "",
        "| writer | tokens/s | ms per chunk | ratio to plain writes |",
        "|---|---:|---:|---:|",
        f"| plain file writes | {w['raw_tokens_per_s']:,.0f} | {w['raw_ms_per_chunk']:.0f} | 1.00 |",
        f"| StoreWriter | {w['writer_tokens_per_s']:,.0f} | {w['writer_ms_per_chunk']:.0f} | "
        f"{w['ratio']:.2f} |",
    ]
    s = stream
    lines += [
        "",
        "## Shuffled stream vs raw memmap (bf16 at rest, float32 batches out)",
        "",
        f"{s['n_tokens']} tokens x {s['d_model']}, batch {s['batch_size']}, chunk "
        f"{s['chunk_tokens']} tokens, shuffle buffer 131072 tokens, page cache warm, "
        "best of 3 interleaved rounds. The stream filters excluded tokens (its default). "
        "Baseline: the same bf16 bits in a numpy memmap, a random permutation gathered "
        "batch by batch (sorted indices) and converted to float32 with the same bit-shift "
        "conversion the stream uses.",
        "",
        "| reader | tokens/s | GB/s (bf16 at rest) | ratio to memmap |",
        "|---|---:|---:|---:|",
        f"| memmap gather | {s['memmap_tokens_per_s']:,.0f} | "
        f"{s['memmap_GBps_at_rest']:.2f} | 1.00 |",
    ]
    for codec, r in s["codecs"].items():
        path = "zero-copy mmap of shards" if codec == "none" else "zarr decode"
        lines.append(
            f"| store.stream, {codec} ({path}) | {r['tokens_per_s']:,.0f} | "
            f"{r['GBps_at_rest']:.2f} | {r['ratio']:.2f} |"
        )
    lines += [
        "",
        f"Ratio store / memmap with the default codec: **{s['ratio']:.2f}** (target >= 0.5).",
        "",
        DECISION,
    ]
    return "\n".join(lines) + "\n"


def main(quick: bool = False) -> dict:
    """Run both measurements, print the tables, record them in docs/bench/store.md."""
    n_comp = 16_384 if quick else 131_072
    n_stream = 32_768 if quick else 200_000
    d_model = 576  # SmolLM2-135M
    chunk_tokens = 8 * SEQ_LEN if quick else 32 * SEQ_LEN
    batch_size = 4096
    real = real_activations(max(n_comp, n_stream))
    if real is not None and real[0].shape[0] >= 4 * batch_size:
        acts, source = real
        d_model = acts.shape[1]
        reps = -(-max(n_comp, n_stream) // acts.shape[0])
        if reps > 1:
            source += f"; its {acts.shape[0]} non-excluded tokens repeated x{reps}"
            acts = np.concatenate([acts] * reps)
    else:
        acts = synthetic_activations(max(n_comp, n_stream), d_model)
        source = (
            "synthetic Gaussian activations, log-normal per-dim scales, 1% Student-t(3) "
            "heavy dims x20 (no real harvested store was available)"
        )
    root = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        comp = compression_table(acts[:n_comp], root, chunk_tokens)
        stream = stream_vs_memmap(
            acts[:n_stream], root, chunk_tokens, batch_size, (DEFAULT_COMPRESSION, "zstd:1")
        )
        writer = writer_vs_raw(acts, root, 4 * chunk_tokens if quick else 32_768)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = render(comp, stream, writer, source, quick)
    print(text)
    if not quick:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text, encoding="utf-8")
    return {
        "compression": comp,
        "stream": stream,
        "writer": writer,
        "data": source,
        "machine": machine(),
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
