"""CPU kernels in C (``native_cpu.c``), built on first use with the machine's C compiler.

On the CPU the fused step is a chain of PyTorch calls, each its own pass over memory (and
its own OpenMP region): the sparse decode, then one subtraction per Matryoshka group, then
the norms; backward the mirror image plus a sampled product. ``native_cpu.c`` does each
chain in one pass per token, and scans the bf16 selection scores for candidates in one pass
instead of compare + nonzero + gather. The library is compiled once per machine (well under
a second, no PyTorch headers) into ``$MASKSAE_CACHE/kernels`` (default
``~/.cache/masksae/kernels``), keyed by the source, the compiler and the CPU, written
atomically, and called through ctypes, which releases the GIL: a batch's rows are split
across ``torch.get_num_threads()`` threads.

Without a compiler (or with ``MASKSAE_NATIVE_KERNELS=0``, or ``MASKSAE_KERNEL_BACKEND=torch``)
the PyTorch path runs instead; the two are compared by ``tests/test_native_kernels.py``.
``CC`` picks the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from masksae.cache_dirs import cache_dir
from masksae.train.kernels.workspace import workspace

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_cpu.c")
_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared"]
# fewer rows than this per thread are not worth a thread hand-off (~20 us)
_MIN_ROWS_PER_THREAD = 64
_OFF_VALUES = {"0", "false", "no", "off"}

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "prefix_decode_forward": [_i64] * 4 + [_ptr, _i64] + [_ptr] * 7,
    "prefix_decode_backward": [_i64] * 4 + [_ptr] * 7,
    "greater_i16": ([_i64, _i64, _ptr, ctypes.c_int16, _ptr, _i64], _i64),
    "greater_i32": ([_i64, _i64, _ptr, ctypes.c_int32, _ptr, _i64], _i64),
}


def enabled_for(t: Tensor) -> bool:
    """True when the C kernels serve tensors living where ``t`` lives (a CPU tensor, not
    switched off, the library built)."""
    if t.device.type != "cpu":
        return False
    if os.environ.get("MASKSAE_NATIVE_KERNELS", "").strip().lower() in _OFF_VALUES:
        return False
    if os.environ.get("MASKSAE_KERNEL_BACKEND", "").strip().lower() in ("torch", "triton"):
        return False
    return library() is not None


def _compiler() -> list[str] | None:
    """``$CC`` when set (and only it: a compiler asked for by name is not swapped for
    another), else Python's own compiler, else cc / gcc / clang on the PATH."""
    if os.environ.get("CC"):
        argv = shlex.split(os.environ["CC"])
        return argv if argv and shutil.which(argv[0]) else None
    argv = shlex.split(sysconfig.get_config_var("CC") or "")
    if argv and shutil.which(argv[0]):
        return argv
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compile(cc: list[str], out: Path) -> list[str]:
    """Compile SOURCE into ``out`` atomically; returns the flags that worked."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    # -march=native where the compiler knows it (the library is keyed by this CPU), else
    # the compiler's baseline for the architecture
    for flags in (_FLAGS + ["-march=native"], _FLAGS):
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run(
                [*cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300
            )
            if proc.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent process sees all of it or none
                return flags
            errors.append(proc.stderr.strip()[-500:])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The built library (None when it cannot be built: the PyTorch path runs instead)."""
    cc = _compiler()
    if cc is None:
        log.info(
            "no C compiler found (CC=%r): the CPU step runs its slower PyTorch kernels",
            os.environ.get("CC", ""),
        )
        return None
    try:
        version = subprocess.run(
            [*cc, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
        key = hashlib.sha256(
            b"\0".join(
                s.encode() for s in (SOURCE.read_text(), " ".join(cc), version, _cpu_signature())
            )
        ).hexdigest()[:16]
        path = (
            cache_dir("kernels")
            / f"native_cpu-{key}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
        )
        if not path.exists():
            start = time.perf_counter()
            flags = _compile(cc, path)
            log.info(
                "built the CPU kernels in %.1f s (%s %s): %s",
                time.perf_counter() - start,
                " ".join(cc),
                " ".join(flags),
                path,
            )
        lib = ctypes.CDLL(str(path))
        for name, sig in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = sig if isinstance(sig, tuple) else (sig, None)
        return lib
    except Exception as exc:  # any failure only costs speed: say so once and carry on
        log.warning(
            "could not build the CPU kernels with %s (%s); the step runs its slower PyTorch "
            "kernels. Fix the compiler (CC=...) or set MASKSAE_NATIVE_KERNELS=0 to skip this.",
            " ".join(cc),
            str(exc)[-300:] or type(exc).__name__,
        )
        return None


# ---- threads ----------------------------------------------------------------------------
_POOL: ThreadPoolExecutor | None = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()


def _reset_pool_after_fork() -> None:
    # a forked child inherits the pool object but not its threads: work sent to it would wait
    # forever, so the child starts a pool of its own
    global _POOL, _POOL_WORKERS
    _POOL, _POOL_WORKERS = None, 0


os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_WORKERS
    with _POOL_LOCK:
        if _POOL is None or _POOL_WORKERS < workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="masksae-cpu-kernel")
            _POOL_WORKERS = workers
        return _POOL


def _ranges(n: int) -> list[tuple[int, int]]:
    """[start, end) pieces of range(n), one per thread."""
    parts = max(1, min(torch.get_num_threads(), n // _MIN_ROWS_PER_THREAD))
    step = -(-n // parts)
    return [(s, min(n, s + step)) for s in range(0, n, step)] or [(0, 0)]


def _run_pieces(call, pieces: list[tuple[int, int]]) -> list:
    """[call(i, start, end) for each piece], the first piece in this thread."""
    futures = []
    if len(pieces) > 1:
        pool = _pool(len(pieces) - 1)
        futures = [pool.submit(call, i, s, e) for i, (s, e) in enumerate(pieces) if i > 0]
    return [call(0, *pieces[0])] + [f.result() for f in futures]


def _p(t: Tensor) -> int:
    return t.data_ptr()


def _check(*tensors: Tensor, floats: tuple[Tensor, ...] = ()) -> None:
    for t in tensors + floats:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("native kernels take contiguous CPU tensors")
    if any(t.dtype != torch.float32 for t in floats):
        raise ValueError("native kernels take float32 values")


def _check_bags(n_bags: int, bag_offsets: Tensor, lat_N: Tensor, n_latents: int) -> None:
    """The C code trusts its indices: refuse any that would read outside the tables."""
    n = lat_N.numel()
    if bag_offsets.numel() != n_bags + 1 or bag_offsets.dtype != torch.int64:
        raise ValueError(f"bag_offsets: expected int64 [{n_bags + 1}]")
    if lat_N.dtype != torch.int64 or int(bag_offsets[0]) != 0 or int(bag_offsets[-1]) != n:
        raise ValueError(f"bag_offsets must run from 0 to the {n} int64 entries")
    if n:
        lo, hi = torch.aminmax(lat_N)
        if int(lo) < 0 or int(hi) >= n_latents:
            raise ValueError(f"latent indices outside [0, {n_latents})")


# ---- kernels ----------------------------------------------------------------------------
def prefix_decode_forward(
    x_BD: Tensor,
    b_dec_D: Tensor,
    bag_offsets: Tensor,
    lat_N: Tensor,
    vals_N: Tensor,
    W_dec_FD: Tensor,
    resid_BGD: Tensor,
    err_BG: Tensor,
) -> None:
    """Fill ``resid_BGD`` (every prefix residual) and ``err_BG`` (their squared norms); see
    ``prefix_decode_forward`` in native_cpu.c. fp32 throughout, int64 indices."""
    B, G, D = resid_BGD.shape
    _check(bag_offsets, lat_N, floats=(x_BD, b_dec_D, vals_N, W_dec_FD, resid_BGD, err_BG))
    _check_bags(B * G, bag_offsets, lat_N, W_dec_FD.shape[0])
    if x_BD.shape != (B, D) or W_dec_FD.shape[1] != D or vals_N.shape != lat_N.shape:
        raise ValueError("prefix_decode_forward: shapes do not match")
    fn = library().prefix_decode_forward
    ptrs = [_p(t) for t in (b_dec_D, bag_offsets, lat_N, vals_N, W_dec_FD, resid_BGD, err_BG)]
    _run_pieces(lambda _, s, e: fn(s, e, G, D, _p(x_BD), D, *ptrs), _ranges(B))


def prefix_decode_backward(
    resid_BGD: Tensor,
    grad_err_BG: Tensor,
    bag_offsets: Tensor,
    lat_N: Tensor,
    W_dec_FD: Tensor,
    grad_parts_BGD: Tensor,
    grad_vals_N: Tensor,
) -> None:
    """Fill ``grad_parts_BGD`` (gradient of each group's decoded sum) and ``grad_vals_N``."""
    B, G, D = resid_BGD.shape
    floats = (resid_BGD, grad_err_BG, W_dec_FD, grad_parts_BGD, grad_vals_N)
    _check(bag_offsets, lat_N, floats=floats)
    _check_bags(B * G, bag_offsets, lat_N, W_dec_FD.shape[0])
    if grad_parts_BGD.shape != resid_BGD.shape or grad_vals_N.shape != lat_N.shape:
        raise ValueError("prefix_decode_backward: shapes do not match")
    fn = library().prefix_decode_backward
    args = [_p(t) for t in (resid_BGD, grad_err_BG, bag_offsets, lat_N, W_dec_FD)]
    args += [_p(grad_parts_BGD), _p(grad_vals_N)]
    _run_pieces(lambda _, s, e: fn(s, e, G, D, *args), _ranges(B))


_GREATER = {
    torch.int16: ("greater_i16", ctypes.c_int16),
    torch.int32: ("greater_i32", ctypes.c_int32),
}


def greater(flat: Tensor, t: int, capacity: int) -> Tensor | None:
    """Increasing int64 indices of the entries of the flat int16 / int32 ``flat`` above
    ``t``; None when there are more than ``capacity`` (the caller counts another way)."""
    _check(flat)
    name, ctype = _GREATER[flat.dtype]
    fn = getattr(library(), name)
    n = flat.numel()
    pieces = _ranges(n)
    cap = min(capacity, max(e - s for s, e in pieces))
    # scratch reused across steps (only the pages written are touched)
    out = workspace().get("greater_hits", (len(pieces), max(cap, 1)), torch.int64, flat.device)
    base, t_c = _p(flat), ctype(t)
    counts = _run_pieces(lambda i, s, e: fn(s, e, base, t_c, _p(out[i]), cap), pieces)
    if min(counts) < 0 or sum(counts) > capacity:
        return None
    return torch.cat([out[i, :c] for i, c in enumerate(counts)])
