"""`make gpu-check`: the CUDA checks and figures a CPU machine cannot give, in one run that
fits in 8 minutes on one GPU. Started by scripts/gpu_check.sh (which sets up the Python);
run directly with ``--dry-run`` to exercise every step on the CPU at toy sizes.

Steps (each timed, each skipped with a reason when the remaining budget is too short):
1. kernel tests on the device: Triton kernels vs PyTorch, fused vs dense, bf16 selection
   (pytest on tests/test_kernels_triton.py and tests/test_cuda.py);
2. a bf16 harvest of the bundled model on the device, against the bare truncated forward;
3. the training step at F 4096 and 16384: the bf16 and fp32 encoder products (the floor),
   the fused step with fp32 / bf16 selection through the Triton kernels, the bf16 one through
   the PyTorch kernels, and the dense reference;
4. a multi-SAE sweep (4 SAEs in one pass over the harvested store) against one SAE.
The figures go to docs/bench/gpu.md and gpu.json, and a summary replaces the GPU section of
docs/benchmarks.md (between its gpu-check markers). Exit status 0 when every step that ran
passed; 2 when a step failed; 3 when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from masksae.threads import apply_thread_env_defaults

apply_thread_env_defaults()

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
DEFAULT_TESTS = ["tests/test_kernels_triton.py", "tests/test_cuda.py"]


class Budget:
    """Wall-clock budget shared by the steps."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# ---------------------------------------------------------------------------- 1. tests
def kernel_tests(tests: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {
        "ok": proc.returncode == 0,
        "summary": tail[-1] if tail else "",
        "seconds": time.perf_counter() - t0,
        "output_tail": "\n".join(tail[-30:]) if proc.returncode else "",
    }


# ---------------------------------------------------------------------------- 2. harvest
def harvest(model: str, device: torch.device, dtype: str, sizes: dict, out: Path) -> dict:
    import numpy as np

    from masksae.harvest import HarvestConfig, plan_harvest, run_harvest
    from masksae.harvest.masking import mask_sequences
    from masksae.models import capture_resid_post, load_model

    lm = load_model(model, dtype=dtype, device=str(device))
    cfg = HarvestConfig(
        out=str(out),
        model=model,
        layer=sizes["layer"],
        corpus="bundled",
        tokens=sizes["tokens"],
        mask_prob=0.3,
        context_length=sizes["context"],
        batch_size=sizes["batch"],
        dtype=dtype,
        device=str(device),
        seed=0,
    )
    plan = plan_harvest(cfg, lm=lm)
    ids = np.stack(list(plan.sequences()))
    masked, _, _ = mask_sequences(
        ids, np.arange(len(ids)), seed=0, p=0.3, mask_id=plan.mask_id, special_ids=plan.special_ids
    )

    def bare() -> float:
        batch = cfg.batch_size
        t0 = time.perf_counter()
        for i in range(0, len(masked), batch):
            x = torch.from_numpy(masked[i : i + batch].astype(np.int64))
            capture_resid_post(lm, x, torch.ones_like(x), cfg.layer).to("cpu")
        sync(device)
        return masked.size / (time.perf_counter() - t0)

    bare()  # warm-up (kernels, allocator)
    bare_tps = bare()
    result = run_harvest(cfg, lm=lm, progress=False)
    return {
        "model": model,
        "layer": cfg.layer,
        "dtype": dtype,
        "tokens": result.total_tokens,
        "context": cfg.context_length,
        "batch": cfg.batch_size,
        "harvest_tokens_per_s": result.tokens_per_s,
        "bare_tokens_per_s": bare_tps,
        "ratio": result.tokens_per_s / bare_tps,
        "store": str(out),
    }


# ---------------------------------------------------------------------------- 3. step
def step_bench(device: torch.device, sizes: dict, steps: int, warmup: int) -> list[dict]:
    from masksae.train.optim import make_adam
    from masksae.train.sae import MatryoshkaBatchTopKConfig, StepContext, build_sae

    d, batch, k = sizes["d"], sizes["batch"], sizes["k"]
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(8 * d, d, generator=g) / d**0.5 * 4
    data = []
    for _ in range(steps):
        codes = torch.rand(batch, 8 * d, generator=g)
        x = torch.where(codes > 0.99, codes, 0.0) @ atoms + 0.1 * torch.randn(batch, d, generator=g)
        data.append(x.to(device))
    rows = []
    for f in sizes["fs"]:
        variants = {
            "gemm bf16": None,
            "gemm fp32": None,
            "fused fp32 select (triton)": ("float32", "triton", True),
            "fused bf16 select (triton)": ("bfloat16", "triton", True),
            "fused bf16 select (torch kernels)": ("bfloat16", "torch", True),
            "dense": ("float32", "torch", False),
        }
        saes, opts = {}, {}
        for name in variants:
            torch.manual_seed(0)
            sae = build_sae(MatryoshkaBatchTopKConfig(d_in=d, d_sae=f, k=k)).to(device)
            sae.init_from_data(data[0])
            saes[name], opts[name] = sae, make_adam(sae.parameters(), 4e-4, (0.9, 0.999), device)
        W = saes["gemm fp32"].W_enc.detach()
        W16, out16 = W.bfloat16(), torch.empty(batch, f, device=device, dtype=torch.bfloat16)
        out32 = torch.empty(batch, f, device=device)
        times: dict[str, list[float]] = {n: [] for n in variants}
        losses: dict[str, list[float]] = {n: [] for n in variants}
        for i, x in enumerate(data):
            for name, spec in variants.items():
                sync(device)
                t0 = time.perf_counter()
                if spec is None:
                    if name == "gemm bf16":
                        torch.mm(x.bfloat16(), W16, out=out16)
                    else:
                        torch.mm(x, W, out=out32)
                else:
                    select, backend, fused = spec
                    # Triton runs CUDA tensors (a CPU dry run uses the PyTorch kernels)
                    os.environ["MASKSAE_KERNEL_BACKEND"] = (
                        backend if device.type == "cuda" else "torch"
                    )
                    sae, opt = saes[name], opts[name]
                    out = sae.training_loss(x, StepContext(i, steps, None, fused, select))
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    sae.remove_parallel_decoder_grad()
                    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
                    opt.step()
                    sae.normalize_decoder()
                    losses[name].append(float(out.loss))
                sync(device)
                times[name].append(time.perf_counter() - t0)
        os.environ.pop("MASKSAE_KERNEL_BACKEND", None)
        ms = {n: 1e3 * statistics.median(t[warmup:]) for n, t in times.items()}
        ref = losses["fused fp32 select (triton)"]
        drift = max(
            abs(a - b) / abs(b)
            for a, b in zip(losses["fused bf16 select (triton)"], ref, strict=True)
        )
        rows.append({"f": f, "d": d, "batch": batch, "k": k, "ms": ms, "bf16_vs_fp32": drift})
        del saes, opts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------- 4. sweep
def sweep(store_path: Path, device: torch.device, sizes: dict, work: Path) -> dict:
    from masksae.storage import ActivationStore
    from masksae.train.config import RunSpec, TrainConfig
    from masksae.train.trainer import Trainer

    store = ActivationStore.open(store_path)
    cfg = TrainConfig(
        steps=sizes["steps"],
        batch_size=sizes["batch"],
        warmup_steps=sizes["steps"] // 4,
        checkpoint_every=0,
        log_every=sizes["steps"],
        device=str(device),
    )
    runs = [
        RunSpec(f"k{k}", {"architecture": "matryoshka_batch_topk", "d_sae": sizes["f"], "k": k})
        for k in sizes["ks"]
    ]
    out: dict[str, Any] = {"f": sizes["f"], "batch": sizes["batch"], "steps": sizes["steps"]}
    for label, chosen in (("one SAE", runs[:1]), (f"{len(runs)} SAEs in one pass", runs)):
        t0 = time.perf_counter()
        summary = Trainer(
            store, chosen, cfg, work / label.replace(" ", "-"), progress=False
        ).train()
        wall = time.perf_counter() - t0
        out[label] = {
            "wall_s": wall,
            "tokens_per_s_per_sae": summary.total_steps * sizes["batch"] / summary.wall_s,
            "data_wait_frac": summary.data_wait_frac,
            "last_loss": [r.last_metrics.get("loss") for r in summary.runs],
        }
    return out


# ---------------------------------------------------------------------------- report
def report(results: dict[str, Any]) -> tuple[str, str]:
    env = results["environment"]
    lines = [
        f"Run on {env.get('gpu', env['device'])}: torch {env['torch']} (CUDA {env['cuda']}), "
        f"triton {env['triton']}, {env['cpus']} CPUs, {results['date']}"
        + (" - DRY RUN on the CPU at toy sizes, not GPU figures" if results["dry_run"] else "")
        + ".",
        "",
    ]
    steps = results["steps"]
    t = steps.get("tests", {})
    lines.append(f"- kernel tests: {_status(t)} {t.get('summary', '')}".rstrip())
    h = steps.get("harvest", {})
    if h.get("ok"):
        f = h["figures"]
        lines.append(
            f"- harvest {f['model']} layer {f['layer']} {f['dtype']}: "
            f"{f['harvest_tokens_per_s']:,.0f} tok/s vs bare forward "
            f"{f['bare_tokens_per_s']:,.0f} tok/s = **{f['ratio']:.3f}**"
        )
    else:
        lines.append(f"- harvest: {_status(h)}")
    s = steps.get("step", {})
    if s.get("ok"):
        lines += [
            "",
            "| F | gemm bf16 ms | gemm fp32 ms | fused fp32-select (Triton) ms | fused "
            "bf16-select (Triton) ms | bf16-select, torch kernels ms | dense ms | bf16 step / "
            "bf16 gemm | fused vs dense | loss bf16 vs fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["figures"]:
            m = r["ms"]
            lines.append(
                f"| {r['f']} | {m['gemm bf16']:.2f} | {m['gemm fp32']:.2f} | "
                f"{m['fused fp32 select (triton)']:.2f} | {m['fused bf16 select (triton)']:.2f} | "
                f"{m['fused bf16 select (torch kernels)']:.2f} | {m['dense']:.2f} | "
                f"{m['fused bf16 select (triton)'] / m['gemm bf16']:.2f} | "
                f"{m['dense'] / m['fused bf16 select (triton)']:.2f}x | {r['bf16_vs_fp32']:.1e} |"
            )
        r0 = s["figures"][0]
        lines += [
            "",
            f"(d {r0['d']}, batch {r0['batch']}, k {r0['k']}, MatryoshkaBatchTopK, full step "
            "with fused Adam; medians.)",
            "",
        ]
    else:
        lines.append(f"- training step: {_status(s)}")
    w = steps.get("sweep", {})
    if w.get("ok"):
        f = w["figures"]
        many = next(k for k in f if k.endswith("one pass"))
        lines.append(
            f"- sweep F {f['f']}, batch {f['batch']}, {f['steps']} steps: one SAE "
            f"{f['one SAE']['tokens_per_s_per_sae']:,.0f} tok/s (data wait "
            f"{100 * f['one SAE']['data_wait_frac']:.1f}%); {many}: "
            f"{f[many]['tokens_per_s_per_sae']:,.0f} tok/s per SAE (data wait "
            f"{100 * f[many]['data_wait_frac']:.1f}%)"
        )
    else:
        lines.append(f"- sweep: {_status(w)}")
    summary = "\n".join(lines)
    page = "# GPU check (`make gpu-check`)\n\n" + summary + "\n\n```json\n"
    page += json.dumps(results, indent=2, default=str) + "\n```\n"
    return summary, page


def _status(step: dict) -> str:
    if not step:
        return "not run"
    if step.get("skipped"):
        return f"skipped ({step['skipped']})"
    if not step.get("ok"):
        return f"FAILED ({step.get('error', '')})"
    return "passed"


def write_section(path: Path, summary: str) -> None:
    """Replace the text between the gpu-check markers of ``path`` (append the section if the
    markers are missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{START}\n{summary}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## GPU (`make gpu-check`)\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu with --dry-run")
    p.add_argument("--dry-run", action="store_true", help="toy sizes, CPU allowed, no install")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget")
    p.add_argument("--model", default="bundled:smollm2-135m", help="model to harvest")
    p.add_argument("--tests", nargs="*", default=None, help="pytest targets of step 1")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--page", type=Path, default=ROOT / "docs" / "bench" / "gpu.md")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device visible to torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda}): run it on a machine with an NVIDIA GPU and a CUDA build of "
            "torch, or pass --dry-run --device cpu to exercise the steps on the CPU",
            file=sys.stderr,
        )
        return 3
    if device.type != "cuda" and not a.dry_run:
        print(
            f"gpu-check: --device {a.device} needs --dry-run (this is a GPU check)", file=sys.stderr
        )
        return 2
    budget = Budget(a.budget_s)
    if a.dry_run:
        hv = dict(layer=1, tokens=1024, context=32, batch=8)
        st = dict(d=16, batch=128, k=4, fs=[128, 256])
        sw = dict(f=128, batch=64, steps=3, ks=[4, 8])
        n_steps, warmup = 2, 1
    else:
        hv = dict(layer=15, tokens=262_144, context=128, batch=64)
        st = dict(d=576, batch=4096, k=20, fs=[4096, 16384])
        sw = dict(f=4096, batch=4096, steps=200, ks=[20, 40, 80, 160])
        n_steps, warmup = 25, 5
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dry_run": a.dry_run,
        "environment": environment(device),
        "steps": {},
    }
    steps = results["steps"]
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def run(name: str, need_s: float, fn) -> Any:
        if budget.left() < need_s:
            steps[name] = {"skipped": f"{budget.left():.0f} s of budget left, needs ~{need_s:.0f}"}
            return None
        t0 = time.perf_counter()
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        try:
            figures = fn()
            steps[name] = {"ok": True, "figures": figures, "seconds": time.perf_counter() - t0}
            return figures
        except Exception as exc:  # noqa: BLE001 - report the step, go on with the others
            steps[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
            return None

    tests = DEFAULT_TESTS if a.tests is None else a.tests
    if tests:
        t = run("tests", 60, lambda: kernel_tests(tests, max(30.0, budget.left() - 240)))
        if t is not None:
            steps["tests"].update(ok=t["ok"], summary=t["summary"])
            if not t["ok"]:
                steps["tests"]["error"] = t["output_tail"]
    else:
        steps["tests"] = {"skipped": "no test targets given"}
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    model = a.model
    if a.dry_run and model.startswith("bundled:"):
        from masksae.models.tiny import build_tiny_model

        model = str(build_tiny_model(work / "tiny", "llama", n_layers=2, d_model=32))
    h = run("harvest", 60, lambda: harvest(model, device, dtype, hv, work / "store"))
    run("step", 60, lambda: step_bench(device, st, n_steps, warmup))
    if h is not None:
        run("sweep", 45, lambda: sweep(Path(h["store"]), device, {**sw}, work / "sweep"))
    else:
        steps["sweep"] = {"skipped": "no store (the harvest step did not run)"}

    summary, page = report(results)
    write_section(a.out, summary)
    a.page.parent.mkdir(parents=True, exist_ok=True)
    a.page.write_text(page, encoding="utf-8")
    print(summary)
    failed = [n for n, s in steps.items() if s.get("ok") is False]
    if failed:
        print(f"gpu-check: FAILED steps: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
