"""Training-step throughput: today's fused MatryoshkaBatchTopK step against its floor, its
pre-issue-14 self, the dense reference, and with each of its optimisations taken out.

Every variant runs one full optimizer step (forward, backward, parallel-gradient removal,
grad clipping, Adam, decoder renormalisation) on the same batches from the same initial
weights; the variants' steps are interleaved (one step of each in turn), so load from other
processes on a shared machine hits all alike, and only ratios within this run are compared.

- ``gemm fp32`` / ``gemm bf16``: the encoder's one dense product alone (the floor).
- ``legacy``: the step before issue 14 (``legacy_step.py``, frozen), foreach Adam.
- ``fp32`` / ``bf16``: today's step, selection product in fp32 / in bf16 re-ranked in fp32.
- ``bf16 -X``: today's bf16 step with optimisation X undone (fresh buffers each step,
  foreach Adam, torch's fused Adam copying W_enc's latent-major layout (``-layout``),
  autograd prefix loss, plain float compare + nonzero, plain sample stride):
  the ratio to ``bf16`` is that optimisation's own gain.
- ``dense``: the dense reference path (F 4096 only).
- ``+auxk``: with a quarter of the latents dead (AuxK on).

Activations: real ones from the store named by ``MASKSAE_BENCH_STORE`` (scaled like training,
E||x||^2 = d), else synthetic sparse codes. ``main(quick=False)`` writes
``docs/bench/train_step.md``.
"""

from __future__ import annotations

from masksae.allocator import keep_freed_memory
from masksae.threads import apply_thread_env_defaults

apply_thread_env_defaults()  # as the CLI does, before torch starts OpenMP
keep_freed_memory()  # as the CLI does (masksae.allocator)

import contextlib
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import legacy_step
from masksae.train.kernels import native as native_mod
from masksae.train.kernels import prefix as prefix_mod
from masksae.train.kernels.workspace import Workspace, release_workspace, workspace
from masksae.train.optim import clip_grad_norm, make_adam
from masksae.train.sae import MatryoshkaBatchTopKConfig, StepContext, build_sae, topk_family
from masksae.train.sae import base as base_mod
from masksae.train.sae import batch_topk as batch_topk_mod
from masksae.train.sae import metrics as metrics_mod
from masksae.train.sae import selection as selection_mod
from masksae.train.sae.refine import RefineStats
from masksae.train.sae.selection import batch_topk_select

log = logging.getLogger(__name__)
DOC = Path(__file__).resolve().parent.parent / "docs" / "bench" / "train_step.md"


# ---------------------------------------------------------------------------- data
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


def store_batches(path: str, n: int, batch: int) -> list[torch.Tensor]:
    """``n`` shuffled batches of a real store, scaled as training scales them."""
    from masksae.storage import ActivationStore

    store = ActivationStore.open(path)
    scale = store.norm_scale()
    stream = store.stream(batch, seed=0, dtype="float32", epochs=1000)
    try:
        return [next(stream) * scale for _ in range(n)]
    finally:
        getattr(stream, "close", lambda: None)()


def batches(n: int, batch: int, d: int) -> tuple[list[torch.Tensor], str]:
    path = os.environ.get("MASKSAE_BENCH_STORE")
    if path:
        data = store_batches(path, n, batch)
        return data, f"real activations from {path} (d {data[0].shape[1]})"
    return synthetic_batches(n, batch, d), "synthetic sparse codes"


# ---------------------------------------------------------------------------- ablations
def _autograd_prefix(x_BD, b_dec_D, parts_BGD):
    x_hat_BD = b_dec_D.expand_as(x_BD)
    errs = []
    for part_BD in parts_BGD.unbind(1):
        x_hat_BD = x_hat_BD + part_BD
        errs.append((x_BD - x_hat_BD).pow(2).sum(-1))
    return torch.stack(errs, 1), (x_BD - x_hat_BD).detach()


WORKSPACE_USERS = (topk_family, batch_topk_mod, base_mod, metrics_mod, prefix_mod, native_mod)


def _plain_nonzero(mask):
    return mask.nonzero().squeeze(1)


@contextlib.contextmanager
def patched(obj, name, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


ABLATIONS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "bf16 -buffers": lambda: _fresh_buffers(),
    "bf16 -native": lambda: _native_off(),
    "bf16 -prefix": lambda: _autograd_prefix_loss(),
    "bf16 -scan": lambda: _plain_scan(),
    "bf16 -stride": lambda: patched(
        selection_mod,
        "sample_stride",
        lambda n, _f, block=1: max(block, n // max(1, selection_mod._SAMPLE // block)),
    ),
}


@contextlib.contextmanager
def _fresh_buffers() -> Iterator[None]:
    # every call for a scratch buffer gets a new one, as before issue 14 (and the thread's
    # shared workspace, which the other variants use, is left alone)
    with contextlib.ExitStack() as stack:
        for module in WORKSPACE_USERS:
            stack.enter_context(patched(module, "workspace", Workspace))
        yield


@contextlib.contextmanager
def _native_off() -> Iterator[None]:
    # the PyTorch kernels a machine without a C compiler runs (kernels/native.py)
    old = os.environ.get("MASKSAE_NATIVE_KERNELS")
    os.environ["MASKSAE_NATIVE_KERNELS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MASKSAE_NATIVE_KERNELS")
        else:
            os.environ["MASKSAE_NATIVE_KERNELS"] = old


@contextlib.contextmanager
def _autograd_prefix_loss() -> Iterator[None]:
    # the prefix loss as plain autograd ops after the sparse decode (no C kernel either)
    with _native_off(), patched(prefix_mod, "prefix_squared_errors", _autograd_prefix):
        yield


@contextlib.contextmanager
def _plain_scan() -> Iterator[None]:
    with patched(selection_mod, "_nonzero", _plain_nonzero):
        with patched(selection_mod, "_SAME_WIDTH_INT", {}):
            yield


def _legacy_remove_parallel(sae) -> None:
    with torch.no_grad():
        grad_FD = sae.W_dec.grad
        unit_FD = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        grad_FD -= (grad_FD * unit_FD).sum(dim=-1, keepdim=True) * unit_FD


# ---------------------------------------------------------------------------- variants
class Variant:
    """One way of running the step, with its own SAE (same init) and optimizer."""

    def __init__(self, name: str, d: int, f: int, k: int, x0: torch.Tensor) -> None:
        self.name = name
        self.times: list[float] = []
        self.losses: list[float] = []
        self.refine = RefineStats()
        torch.manual_seed(0)
        self.sae = build_sae(MatryoshkaBatchTopKConfig(d_in=d, d_sae=f, k=k))
        self.sae.init_from_data(x0)
        self.dead = None
        if "auxk" in name:
            self.dead = torch.zeros(f, dtype=torch.bool)
            self.dead[torch.randperm(f, generator=torch.Generator().manual_seed(1))[: f // 4]] = (
                True
            )
        foreach = name == "legacy" or name == "bf16 -adam"
        if foreach:
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=4e-4, foreach=True)
        elif name == "bf16 -layout":  # torch's fused Adam: copies W_enc's layout each step
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=4e-4, fused=True)
        else:
            self.opt = make_adam(self.sae.parameters(), 4e-4, (0.9, 0.999), torch.device("cpu"))
        self.select_dtype = "float32" if name.startswith(("fp32", "dense")) else "bfloat16"
        if name.startswith("gemm"):
            W = self.sae.W_enc.detach()
            self.W_lp = torch.cat([W.t(), self.sae.b_enc.detach()[:, None]], 1).bfloat16()
            self.out32 = torch.empty(x0.shape[0], f)
            self.out16 = torch.empty(x0.shape[0], f, dtype=torch.bfloat16)

    def step(self, x: torch.Tensor, i: int, total: int) -> None:
        t0 = time.perf_counter()
        loss = self._step(x, i, total)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(loss)

    def _step(self, x: torch.Tensor, i: int, total: int) -> float:
        sae = self.sae
        if self.name == "gemm fp32":
            torch.mm(x, sae.W_enc.detach(), out=self.out32)
            return float("nan")
        if self.name == "gemm bf16":
            x_lp = torch.cat([x, torch.ones(x.shape[0], 1)], 1).bfloat16()
            torch.mm(x_lp, self.W_lp.t(), out=self.out16)
            return float("nan")
        if self.name == "legacy":
            loss = legacy_step.training_loss(sae, x)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            _legacy_remove_parallel(sae)
        else:
            ablation = ABLATIONS.get(self.name, contextlib.nullcontext)
            with ablation():
                # as the trainer between logging steps (metrics every log_every = 50 steps)
                ctx = StepContext(
                    i, total, self.dead, self.name != "dense", self.select_dtype, want_metrics=False
                )
                out = sae.training_loss(x, ctx)
                loss = out.loss
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                known_norms = sae.remove_parallel_decoder_grad()
            stats = getattr(sae, "last_refine_stats", None)
            if stats is not None:
                self.refine.entries += stats.entries
                self.refine.widened += stats.widened
                self.refine.dense_rows += stats.dense_rows
        if self.name == "legacy":
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        else:  # the trainer's
            clip_grad_norm(sae.parameters(), 1.0, known_norms, self.opt)
        self.opt.step()
        sae.normalize_decoder()
        return loss.item()


def selection_agreement(x: torch.Tensor, d: int, f: int, k: int) -> dict:
    """Fraction of the fp32 selection that a plain bf16 selection, and the re-ranked one,
    choose differently (fresh SAE, first batch)."""
    torch.manual_seed(0)
    sae = build_sae(MatryoshkaBatchTopKConfig(d_in=d, d_sae=f, k=k))
    sae.init_from_data(x)
    with torch.no_grad():
        pre32 = sae.pre_activations(x)
        ref = batch_topk_select(pre32, k * x.shape[0])
        pre16, refine = sae.selection_scores(x, "bfloat16")
        plain = batch_topk_select(pre16.clone(), k * x.shape[0])
        reranked = batch_topk_select(pre16, k * x.shape[0], refine)

    def differ(sel) -> float:
        a = set((ref.rows_N * f + ref.lat_N).tolist())
        b = set((sel.rows_N * f + sel.lat_N).tolist())
        return len(a - b) / len(a)

    return {"plain_bf16": differ(plain), "reranked": differ(reranked), "stats": refine.stats}


def measure(d: int, f: int, batch: int, k: int, steps: int, warmup: int) -> dict:
    data, source = batches(steps, batch, d)
    d = data[0].shape[1]
    names = [
        "gemm fp32",
        "gemm bf16",
        "legacy",
        "fp32",
        "bf16",
        "bf16 -buffers",
        "bf16 -adam",
        "bf16 -layout",
        "bf16 -native",
        "bf16 -prefix",
        "bf16 -scan",
        "bf16 -stride",
        "fp32 +auxk",
        "bf16 +auxk",
    ]
    if f <= 4096:
        names.append("dense")
    variants = [Variant(n, d, f, k, data[0]) for n in names]
    for i, x in enumerate(data):
        for v in variants:
            v.step(x, i, steps)
    release_workspace()
    med = {v.name: statistics.median(v.times[warmup:]) for v in variants}
    losses = {v.name: v.losses for v in variants}

    def drift(a: str, b: str) -> float:
        return max(abs(p - q) / abs(q) for p, q in zip(losses[a], losses[b], strict=True))

    agreement = selection_agreement(data[0], d, f, k)
    refine = next(v.refine for v in variants if v.name == "bf16")
    n_steps = len(data)
    return {
        "d": d,
        "f": f,
        "k": k,
        "batch": batch,
        "source": source,
        "ms": {n: 1e3 * t for n, t in med.items()},
        "tokens_per_s": {n: batch / t for n, t in med.items()},
        "loss_drift": {
            "fp32 vs legacy": drift("fp32", "legacy"),
            "bf16 vs fp32": drift("bf16", "fp32"),
            "bf16 +auxk vs fp32 +auxk": drift("bf16 +auxk", "fp32 +auxk"),
        },
        "agreement": {k2: v for k2, v in agreement.items() if k2 != "stats"},
        "refine_per_step": {
            "entries": refine.entries / n_steps,
            "widened": refine.widened / n_steps,
            "dense_rows": refine.dense_rows / n_steps,
        },
        "workspace_mb": workspace().nbytes() / 2**20,
    }


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '<unset>')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '<unset>')}, "
        f"load average {load:.1f} at start"
    )


def table(r: dict) -> list[str]:
    ms = r["ms"]
    gemm = ms["gemm fp32"]
    rows = [
        f"F {r['f']} (d {r['d']}, batch {r['batch']}, k {r['k']}; {r['source']}):",
        "",
        "| variant | ms/step | tok/s | vs legacy | step / fp32 GEMM | own gain |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in ms.items():
        own = ""
        if name.startswith("bf16 -"):
            own = f"{t / ms['bf16']:.2f}x"
        elif name == "bf16":
            own = f"{ms['fp32'] / t:.2f}x (vs fp32 selection)"
        elif name == "fp32":
            own = f"{ms['legacy'] / t:.2f}x (vs legacy)"
        rows.append(
            f"| {name} | {t:.1f} | {r['tokens_per_s'][name]:,.0f} | {ms['legacy'] / t:.2f}x | "
            f"{t / gemm:.2f} | {own} |"
        )
    a, d = r["agreement"], r["loss_drift"]
    rp = r["refine_per_step"]
    rows += [
        "",
        f"Selection vs fp32 at step 0: plain bf16 differs on {100 * a['plain_bf16']:.2f}% of "
        f"the entries, re-ranked bf16 on {100 * a['reranked']:.2f}%. Re-ranking per step: "
        f"{rp['entries']:,.0f} entries recomputed in fp32, {rp['widened']:.2f} widenings, "
        f"{rp['dense_rows']:.1f} rows recomputed densely. Max relative loss difference over "
        f"the run: fp32 vs legacy {d['fp32 vs legacy']:.1e}, bf16 vs fp32 "
        f"{d['bf16 vs fp32']:.1e} (with AuxK {d['bf16 +auxk vs fp32 +auxk']:.1e}). "
        f"Scratch buffers held: {r['workspace_mb']:.0f} MB.",
        "",
    ]
    return rows


def main(quick: bool = False) -> dict:
    if quick:
        configs = [(128, 1024, 256, 8, 6, 2)]
    else:
        configs = [(576, 4096, 2048, 20, 16, 3), (576, 16384, 2048, 20, 8, 2)]
    where = machine()
    results = [measure(d, f, b, k, s, w) for d, f, b, k, s, w in configs]
    lines = [
        "# Training step: fused MatryoshkaBatchTopK, variants interleaved in one process",
        "",
        "Full step = forward + backward + parallel-grad removal + clip + Adam + decoder renorm;",
        "same batches and initial weights for every variant; one step of each in turn; medians",
        "after warm-up. `own gain` = time with that optimisation undone / time of `bf16`.",
        f"Machine: {where}.",
        "",
    ]
    for r in results:
        lines += table(r)
    text = "\n".join(lines)
    print(text)
    if not quick:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text, encoding="utf-8")
    return {"machine": where, "quick": quick, "results": results}


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO)
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    main(quick=p.parse_args().quick)
