"""Our training step beside the peers' (dictionary_learning's MatryoshkaBatchTopK trainer,
sparsify's TopK), on a quiet machine and under artificial background load, with torch's
default OpenMP wait policy and with masksae's (``masksae.threads``).

For each OpenMP setting a child process (the policy must be in the environment before torch
starts) steps the four SAEs in turn on the same batches: first as the machine is, then with
N busy processes (pure-Python spin loops, N = 4 x cores) running beside it. Reported per
library: ms/step without and with the load, the degradation (loaded / unloaded), and
ours against the peer (throughput ratio; degradation ratio, goal <= 1.3). Needs the peers'
venv: ``bash benchmarks/setup_peers.sh`` (skipped otherwise). Writes ``docs/bench/peers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "bench" / "peers.md"
SETTINGS = {
    "torch default (spin-wait)": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None},
    "OMP_WAIT_POLICY=PASSIVE alone": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None},
    "masksae default (PASSIVE, GOMP_SPINCOUNT=3000)": {
        "OMP_WAIT_POLICY": "PASSIVE",
        "GOMP_SPINCOUNT": "3000",
    },
}
PAIRS = (("ours matryoshka", "dictionary_learning matryoshka"), ("ours topk", "sparsify topk"))


def child(args: argparse.Namespace) -> dict:
    import torch

    import peers
    from bench_train_step import batches

    mods = peers.load()
    if mods is None:
        return {"skipped": "peers not installed: run `bash benchmarks/setup_peers.sh`"}
    d, f, k, b = args.d, args.f, args.k, args.batch
    data, source = batches(args.steps, b, d)
    d = data[0].shape[1]
    steps = {
        "ours matryoshka": peers.Ours("matryoshka_batch_topk", d, f, k),
        "dictionary_learning matryoshka": peers.DictionaryLearningMatryoshka(
            mods, d, f, k, 2 * args.steps
        ),
        "ours topk": peers.Ours("topk", d, f, k),
        "sparsify topk": peers.SparsifyTopK(mods, d, f, k),
    }
    result: dict = {"source": source, "threads": torch.get_num_threads()}
    i = 0
    for phase in ("unloaded", "loaded"):
        busy = []
        if phase == "loaded":
            busy = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.busy)
            ]
            time.sleep(0.5)
        try:
            times: dict[str, list[float]] = {name: [] for name in steps}
            for x in data:
                for name, runner in steps.items():
                    t0 = time.perf_counter()
                    runner.step(x, i)
                    times[name].append(time.perf_counter() - t0)
                i += 1
        finally:
            for p in busy:
                p.terminate()
            for p in busy:
                p.wait()
        result[phase] = {n: 1e3 * statistics.median(t[args.warmup :]) for n, t in times.items()}
    return result


def run_setting(env_update: dict, args: list[str]) -> dict:
    env = dict(os.environ)
    for key, value in env_update.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--json", str(out), *args]
        proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_peers child failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(quick: bool = False) -> dict:
    cpus = os.cpu_count() or 1
    if quick:
        sizes = dict(d=64, f=1024, k=8, batch=256, steps=4, warmup=1, busy=1)
    else:
        sizes = dict(d=576, f=4096, k=20, batch=2048, steps=16, warmup=3, busy=4 * cpus)
    args = [f"--{k}={v}" for k, v in sizes.items()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = {name: run_setting(env, args) for name, env in SETTINGS.items()}
    first = next(iter(results.values()))
    if "skipped" in first:
        print(first["skipped"])
        return {"skipped": first["skipped"]}
    lines = [
        "# Our step beside the peers', unloaded and under background load",
        "",
        f"{first['source']}, d {sizes['d']}, F {sizes['f']}, batch {sizes['batch']}, k {sizes['k']}; each "
        f"library's own full step; {sizes['steps']} interleaved steps per phase (median after "
        f"{sizes['warmup']}); load = {sizes['busy']} busy processes on {cpus} CPUs, "
        f"{first['threads']} torch threads; machine load average {load:.1f} at start.",
        "",
        "| OpenMP setting | library | unloaded ms | loaded ms | degradation | ours vs peer "
        "(speed, unloaded) | our degradation / peer's |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, r in results.items():
        for ours, peer in PAIRS:
            for name in (ours, peer):
                u, lo = r["unloaded"][name], r["loaded"][name]
                cells = ["", ""]
                if name == ours:
                    speed = r["unloaded"][peer] / u
                    deg = (lo / u) / (r["loaded"][peer] / r["unloaded"][peer])
                    cells = [f"{speed:.2f}x", f"{deg:.2f}"]
                lines.append(
                    f"| {setting} | {name} | {u:.0f} | {lo:.0f} | {lo / u:.2f}x | "
                    f"{cells[0]} | {cells[1]} |"
                )
    lines += [
        "",
        "The unloaded phase is not idle on a shared machine: other jobs' load is in both",
        "phases. Rerun on a quiet machine: `make bench-peers`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not quick:
        DOC.write_text(text, encoding="utf-8")
    return {"sizes": sizes, "results": results}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true")
    for name in ("d", "f", "k", "batch", "steps", "warmup", "busy"):
        p.add_argument(f"--{name}", type=int, default=0)
    a = p.parse_args()
    if a.child:
        sys.path.insert(0, str(HERE))
        res = child(a)
        a.json.write_text(json.dumps(res))
    else:
        main(quick=a.quick)
