"""CPU kernels in C (``native_cpu.c``), built on first use with the machine's C compiler.

On the CPU the fused step is otherwise a chain of PyTorch calls, each its own pass over
memory (and its own OpenMP region). ``native_cpu.c`` does each chain in one pass:

* forward, per token: the sparse decode, every Matryoshka prefix residual and its squared
  norm, and, given the gradient the loss will send back, the backward's dot products while
  the token's decoder rows are in cache and its prefix gradients (``prefix_decode_forward``);
* backward, per latent: the prefix gradients (from the forward, or rebuilt per token in
  L1), the decoder and encoder weight gradients added into the rows of the latents a thread
  owns (``sparse_backward_by_latent``, used by ``sparse_step``), or, where only the decode's
  backward is wanted, ``prefix_decode_backward`` and the per-latent gathers;
* the selection: the bf16 operands of its product (``rows_to_bf16_padded``), the candidate
  cut from a block sample (``sample_kth_largest_bf16``), the candidate scan over the bf16
  scores with the values it read (``greater``: AVX-512 / AVX2 bit masks where the compiler
  targets them), the re-rank's sampled product with the bias (``pair_dot_rows``), the top k
  of the re-ranked candidates (a radix select, ``top_positions``), the plan's CSR pointers,
  bag ids and latent order (a counting sort), flat-index splits, fired latents, the
  re-rank's tolerance;
* the decoder's parallel-gradient removal and its row renormalisation.

The library is compiled once per machine (well under a second, no PyTorch headers) into
``$MASKSAE_CACHE/kernels`` (default ``~/.cache/masksae/kernels``), keyed by the source, the
compiler and the CPU, written atomically, and called through ctypes, which releases the
GIL: the rows (or latents) are split by work across ``torch.get_num_threads()`` threads.
Index arguments are checked before any C code reads through them.

Without a compiler (or with ``MASKSAE_NATIVE_KERNELS=0``, or ``MASKSAE_KERNEL_BACKEND=torch``)
the PyTorch path runs instead; the two are compared by ``tests/test_native_kernels.py``.
``CC`` picks the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
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
# the one-pass backward's cost of a latent's first entry, in entries (see its caller)
_COLD_LATENT_COST = 8
_OFF_VALUES = {"0", "false", "no", "off"}

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "prefix_decode_forward": [_i64] * 4 + [_ptr, _i64] + [_ptr] * 11,
    "prefix_decode_backward": [_i64] * 4 + [_ptr] * 7,
    "segment_gather_perm": [_i64] * 3 + [_ptr] * 6,
    "pair_dot_rows": [_i64] * 3 + [_ptr] * 6,
    "bag_ids": [_i64, _ptr, _ptr, _ptr, _i64, _ptr],
    "remove_parallel_rows": [_i64] * 3 + [_ptr] * 3,
    "sparse_backward_by_latent": [_i64] * 5 + [_ptr] * 16,
    "counting_sort_perm": [_i64, _ptr, _i64, _ptr, _ptr, _ptr],
    "csr_offsets": ([_i64, _ptr, _i64, _ptr], _i64),
    "top_positions": ([_i64, _ptr, _i64, _ptr, _ptr], ctypes.c_float),
    "split_flat": [_i64, _ptr, _i64, _ptr, _ptr],
    "mark_fired": [_i64, _ptr, _ptr, _ptr],
    "max_abs_diff_finite": ([_i64, _ptr, _ptr, _ptr], ctypes.c_float),
    "normalize_rows": [_i64, _i64, _i64, _ptr, ctypes.c_float],
    "rows_to_bf16_padded": [_i64] * 4 + [_ptr] * 4 + [ctypes.c_float, _ptr],
    "sample_kth_largest_bf16": ([_i64, _ptr, _i64, _i64, _i64], ctypes.c_uint16),
    "indices_in_range": ([_ptr, _i64, _i64], _i64),
    "offsets_valid": ([_ptr, _i64, _i64], _i64),
    "greater_i16": ([_i64, _i64, _ptr, ctypes.c_int16, _ptr, _ptr, _i64], _i64),
    "greater_i32": ([_i64, _i64, _ptr, ctypes.c_int32, _ptr, _ptr, _i64], _i64),
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
                [*cc, *flags, "-o", tmp, str(SOURCE), "-lm"],
                capture_output=True,
                text=True,
                timeout=300,
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
    if bag_offsets.numel() != n_bags + 1:
        raise ValueError(f"bag_offsets: expected [{n_bags + 1}]")
    _check_offsets(bag_offsets, lat_N.numel(), "bag_offsets")
    _check_range(lat_N, n_latents, "latent indices")


def _check_offsets(offsets: Tensor, n: int, what: str) -> None:
    """A CSR pointer: int64, from 0 to the n entries, non-decreasing."""
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{what}: expected a 1-d int64 CSR pointer")
    if not library().offsets_valid(_p(offsets), offsets.numel() - 1, n):
        raise ValueError(f"{what} must run from 0 to the {n} entries without decreasing")


def _check_range(idx_N: Tensor, bound: int, what: str) -> None:
    if idx_N.dtype != torch.int64:
        raise ValueError(f"{what}: expected int64 indices")
    if not library().indices_in_range(_p(idx_N), idx_N.numel(), bound):
        raise ValueError(f"{what} outside [0, {bound})")


def _balanced(offsets: Tensor, stride: int = 1, unit_cost: int = 1) -> list[tuple[int, int]]:
    """Pieces of the segments of CSR pointer ``offsets`` (``stride`` segments per unit)
    holding about equal work (entries + ``unit_cost`` per unit): Matryoshka's first latents
    fire far more often than its last, so equal index ranges would leave one thread most of
    it."""
    n_units = (offsets.numel() - 1) // stride
    parts = max(1, min(torch.get_num_threads(), n_units // _MIN_ROWS_PER_THREAD))
    if parts == 1:
        return [(0, n_units)]
    work = offsets[::stride] + unit_cost * torch.arange(n_units + 1)
    targets = torch.arange(1, parts) * (int(work[-1]) / parts)
    cuts = [0, *torch.searchsorted(work, targets.to(work.dtype)).tolist(), n_units]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a] or [(0, n_units)]


# ---- kernels ----------------------------------------------------------------------------
def prefix_decode_forward(
    x_BD: Tensor,
    b_dec_D: Tensor,
    bag_offsets: Tensor,
    lat_N: Tensor,
    vals_N: Tensor,
    W_dec_FD: Tensor,
    resid_out: Tensor,
    err_BG: Tensor,
    expected_grad_err_BG: Tensor | None = None,
    suffix_out_BGD: Tensor | None = None,
) -> Tensor | None:
    """Fill ``resid_out`` (every prefix residual, [B, G, D]) and ``err_BG`` (their squared
    norms); see ``prefix_decode_forward`` in native_cpu.c. fp32 throughout, int64 indices.
    Given the gradient the loss will send to ``err_BG``, also returns the backward's
    grad_vals [N] for it (computed while the decoder rows are in cache), and with
    ``suffix_out_BGD`` fills it with the gradient of each group's decoded sum for it (the
    backward's other input); ``resid_out`` then gets only the last residual, [B, D]."""
    B, G = err_BG.shape
    D = x_BD.shape[1]
    floats = (x_BD, b_dec_D, vals_N, W_dec_FD, resid_out, err_BG)
    floats += () if expected_grad_err_BG is None else (expected_grad_err_BG,)
    floats += () if suffix_out_BGD is None else (suffix_out_BGD,)
    _check(bag_offsets, lat_N, floats=floats)
    _check_bags(B * G, bag_offsets, lat_N, W_dec_FD.shape[0])
    resid_shape = (B, G, D) if suffix_out_BGD is None else (B, D)
    if resid_out.shape != resid_shape or W_dec_FD.shape[1] != D or vals_N.shape != lat_N.shape:
        raise ValueError("prefix_decode_forward: shapes do not match")
    if expected_grad_err_BG is not None and expected_grad_err_BG.shape != err_BG.shape:
        raise ValueError("prefix_decode_forward: the expected gradient must be [B, G]")
    if suffix_out_BGD is not None and (
        expected_grad_err_BG is None or suffix_out_BGD.shape != (B, G, D)
    ):
        raise ValueError("prefix_decode_forward: suffix_out needs the expected gradient, [B, G, D]")
    fn = library().prefix_decode_forward
    ptrs = [_p(t) for t in (b_dec_D, bag_offsets, lat_N, vals_N, W_dec_FD, resid_out, err_BG)]
    pieces = _balanced(bag_offsets, G)
    grad_vals = scratch = None
    if expected_grad_err_BG is not None:
        grad_vals = torch.empty(lat_N.numel(), dtype=torch.float32)
        # the suffix gradients, and with a suffix table the token's residuals too
        width = G * D * (1 if suffix_out_BGD is None else 2)
        scratch = torch.empty(len(pieces), width, dtype=torch.float32)
        ptrs += [_p(expected_grad_err_BG), _p(grad_vals)]
    else:
        ptrs += [None, None]
    suffix = None if suffix_out_BGD is None else _p(suffix_out_BGD)

    def call(i: int, s: int, e: int) -> None:
        fn(s, e, G, D, _p(x_BD), D, *ptrs, None if scratch is None else _p(scratch[i]), suffix)

    _run_pieces(call, pieces)
    return grad_vals


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
    _run_pieces(lambda _, s, e: fn(s, e, G, D, *args), _balanced(bag_offsets, G))


def segment_gather_perm(
    offsets_F1: Tensor, perm_N: Tensor, cols_N: Tensor, weights_N: Tensor, table_TD: Tensor
) -> Tensor:
    """[F, D] fp32: out[f] = sum of weights[e] * table[cols[e]] over the entries e =
    perm[j], j in [offsets[f], offsets[f + 1]) (``ops_torch.segment_gather_sum`` on the
    permuted entries, without permuting them)."""
    _check(offsets_F1, perm_N, cols_N, floats=(weights_N, table_TD))
    n_seg, (n_rows, D), n = offsets_F1.numel() - 1, table_TD.shape, cols_N.numel()
    if perm_N.numel() != n or weights_N.numel() != n:
        raise ValueError("segment_gather_perm: entry counts do not match")
    _check_offsets(offsets_F1, n, "offsets")
    _check_range(perm_N, n, "perm")
    _check_range(cols_N, n_rows, "table rows")
    out = torch.empty(n_seg, D, dtype=torch.float32)
    fn = library().segment_gather_perm
    ptrs = [_p(t) for t in (offsets_F1, perm_N, cols_N, weights_N, table_TD, out)]
    _run_pieces(lambda _, s, e: fn(s, e, D, *ptrs), _balanced(offsets_F1))
    return out


def pair_dot_rows(
    A_MD: Tensor, offsets_M1: Tensor, cols_N: Tensor, B_KD: Tensor, bias_K: Tensor | None = None
) -> Tensor:
    """[N] fp32: out[e] = <A[row of e], B[cols[e]]> (+ bias[cols[e]]), entries sorted by row
    with CSR pointer ``offsets_M1`` (``ops_torch.pair_dot``)."""
    _check(offsets_M1, cols_N, floats=(A_MD, B_KD) + (() if bias_K is None else (bias_K,)))
    (M, D), n = A_MD.shape, cols_N.numel()
    if offsets_M1.numel() != M + 1 or B_KD.shape[1] != D:
        raise ValueError("pair_dot_rows: shapes do not match")
    if bias_K is not None and bias_K.shape != (B_KD.shape[0],):
        raise ValueError("pair_dot_rows: the bias must have one entry per row of B")
    _check_offsets(offsets_M1, n, "row offsets")
    _check_range(cols_N, B_KD.shape[0], "columns")
    out = torch.empty(n, dtype=torch.float32)
    fn = library().pair_dot_rows
    ptrs = [_p(t) for t in (offsets_M1, cols_N, A_MD, B_KD)]
    ptrs += [None if bias_K is None else _p(bias_K), _p(out)]
    _run_pieces(lambda _, s, e: fn(s, e, D, *ptrs), _balanced(offsets_M1))
    return out


def sparse_backward_by_latent(
    resid_BGD: Tensor | None,
    grad_err_BG: Tensor,
    bag_offsets: Tensor,
    lat_offsets: Tensor,
    lat_N: Tensor,
    vals_N: Tensor,
    W_dec_FD: Tensor,
    xin_BD: Tensor | None,
    known_grad_vals_N: Tensor | None = None,
    known_suffix_BGD: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """The step's sparse backward in one pass (``sparse_backward_by_latent`` in
    native_cpu.c): (grad_vals [N], grad_W_dec [F, D], grad_W_enc [F, D] or None, grad_b_enc
    [F] or None, the decoder's share of grad_b_dec [D]); the encoder weights' gradients only
    with ``xin_BD`` (the encoder input x - b_dec). Latents are split over the threads by
    entry count (``lat_offsets``). ``known_grad_vals_N``: what ``prefix_decode_forward``
    returned for this ``grad_err_BG`` (then no decoder row is read), ``known_suffix_BGD``
    the suffix table it filled for it (then ``resid_BGD`` is not read and may be None)."""
    B, G = grad_err_BG.shape
    F, D = W_dec_FD.shape
    known = (known_grad_vals_N, known_suffix_BGD)
    floats = (grad_err_BG, vals_N, W_dec_FD, xin_BD, resid_BGD, *known)
    _check(bag_offsets, lat_offsets, lat_N, floats=tuple(t for t in floats if t is not None))
    if known_grad_vals_N is not None and known_grad_vals_N.shape != lat_N.shape:
        raise ValueError("sparse_backward_by_latent: known grad_vals must be [N]")
    table = resid_BGD if known_suffix_BGD is None else known_suffix_BGD
    if table is None or table.shape != (B, G, D):
        raise ValueError("sparse_backward_by_latent: resid (or the known suffix) must be [B, G, D]")
    _check_bags(B * G, bag_offsets, lat_N, F)
    if lat_offsets.numel() != F + 1 or W_dec_FD.shape[1] != D or vals_N.shape != lat_N.shape:
        raise ValueError("sparse_backward_by_latent: shapes do not match")
    if xin_BD is not None and xin_BD.shape != (B, D):
        raise ValueError("sparse_backward_by_latent: xin must be [B, D]")
    _check_offsets(lat_offsets, lat_N.numel(), "lat_offsets")
    f32 = torch.float32
    grad_vals = torch.empty(lat_N.numel(), dtype=f32)
    grad_W_dec = torch.empty(F, D, dtype=f32)
    grad_W_enc = None if xin_BD is None else torch.empty(F, D, dtype=f32)
    grad_b_enc = None if xin_BD is None else torch.empty(F, dtype=f32)
    grad_b_dec = torch.zeros(D, dtype=f32)
    # a latent's first entry brings its three rows in from memory, its later ones mostly hit
    # the cache: counting a latent as 8 entries splits the time evenly (measured with real
    # activations at F 4096 and 16384; 1 left the thread with the rarer latents 15% slower)
    pieces = _balanced(lat_offsets, unit_cost=_COLD_LATENT_COST)
    scratch = torch.empty(len(pieces), G * D, dtype=f32)
    seen = torch.zeros(F, dtype=torch.uint8)
    fn = library().sparse_backward_by_latent
    ptrs = [None if resid_BGD is None else _p(resid_BGD)]
    ptrs += [_p(t) for t in (grad_err_BG, bag_offsets, lat_N, vals_N, W_dec_FD)]
    ptrs.append(None if xin_BD is None else _p(xin_BD))
    ptrs += [_p(grad_vals), _p(grad_W_dec)]
    ptrs += [None, None] if xin_BD is None else [_p(grad_W_enc), _p(grad_b_enc)]
    known_ptrs = [None if t is None else _p(t) for t in known]

    def call(i: int, f0: int, f1: int) -> None:
        # the first piece also sums the decoder bias's gradient over every token
        b_dec_sum = _p(grad_b_dec) if i == 0 else None
        fn(f0, f1, B, G, D, *ptrs, b_dec_sum, _p(scratch[i]), _p(seen), *known_ptrs)

    _run_pieces(call, pieces)
    return grad_vals, grad_W_dec, grad_W_enc, grad_b_enc, grad_b_dec


def top_positions(vals_N: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(the k-th largest value as a 0-d float32 tensor, int64 [k] increasing positions of the
    k largest of the float32 ``vals_N``); ties at that value are taken in position order."""
    _check(floats=(vals_N,))
    n = vals_N.numel()
    if not 1 <= k <= n < 2**32:  # (counts are 32-bit in C)
        raise ValueError(f"top_positions: k={k} outside [1, {n}] (or 2**32 entries or more)")
    scratch = workspace().get("top_positions", (n,), torch.int32, vals_N.device)
    pos = torch.empty(k, dtype=torch.int64)
    t = library().top_positions(n, _p(vals_N), k, _p(scratch), _p(pos))
    return torch.tensor(t, dtype=torch.float32), pos


def csr_offsets(keys_N: Tensor, n_keys: int) -> Tensor:
    """int64 [n_keys + 1]: the CSR pointer of int64 ``keys_N`` in [0, n_keys) (a bincount's
    cumulative sum, led by 0)."""
    _check(keys_N)
    if keys_N.dtype != torch.int64:
        raise ValueError("csr_offsets: expected int64 keys")
    offsets = torch.empty(n_keys + 1, dtype=torch.int64)
    if library().csr_offsets(keys_N.numel(), _p(keys_N), n_keys, _p(offsets)) < 0:
        raise ValueError(f"csr_offsets: keys outside [0, {n_keys})")
    return offsets


def counting_sort_perm(keys_N: Tensor, offsets_K1: Tensor) -> Tensor:
    """int64 [N]: the stable permutation sorting ``keys_N`` (int64 in [0, K)), whose CSR
    pointer (counts' cumulative sum) is ``offsets_K1``."""
    _check(keys_N, offsets_K1)
    n, n_keys = keys_N.numel(), offsets_K1.numel() - 1
    _check_offsets(offsets_K1, n, "offsets")
    _check_range(keys_N, n_keys, "keys")
    perm = torch.empty(n, dtype=torch.int64)
    cursor = torch.empty(max(n_keys, 1), dtype=torch.int64)
    library().counting_sort_perm(n, _p(keys_N), n_keys, _p(offsets_K1), _p(cursor), _p(perm))
    return perm


def remove_parallel_rows(W_FD: Tensor, grad_FD: Tensor) -> Tensor:
    """In place: grad[f] -= (grad[f] . w) / (|w| + 1e-6)^2 w for every row w = W[f]; returns
    |grad[f]|^2 after it, [F] fp32."""
    _check(floats=(W_FD, grad_FD))
    if W_FD.shape != grad_FD.shape or W_FD.dim() != 2:
        raise ValueError("remove_parallel_rows: W and its gradient must be the same [F, D]")
    F, D = W_FD.shape
    grad_sq = torch.empty(F, dtype=torch.float32)
    fn = library().remove_parallel_rows
    ptrs = [_p(t) for t in (W_FD, grad_FD, grad_sq)]
    _run_pieces(lambda _, s, e: fn(s, e, D, *ptrs), _ranges(F))
    torch.autograd.graph.increment_version(grad_FD)
    return grad_sq


_GREATER = {
    torch.int16: ("greater_i16", ctypes.c_int16),
    torch.int32: ("greater_i32", ctypes.c_int32),
}


def greater(flat: Tensor, t: int, capacity: int) -> tuple[Tensor, Tensor] | None:
    """(increasing int64 indices, values) of the entries of the flat int16 / int32 ``flat``
    above ``t``; None when there are more than ``capacity`` (the caller counts another way)."""
    _check(flat)
    name, ctype = _GREATER[flat.dtype]
    fn = getattr(library(), name)
    n = flat.numel()
    pieces = _ranges(n)
    cap = min(capacity, max(e - s for s, e in pieces))
    # scratch reused across steps (only the pages written are touched)
    ws, shape = workspace(), (len(pieces), max(cap, 1))
    out = ws.get("greater_hits", shape, torch.int64, flat.device)
    vals = ws.get("greater_values", shape, flat.dtype, flat.device)
    base, t_c = _p(flat), ctype(t)
    counts = _run_pieces(lambda i, s, e: fn(s, e, base, t_c, _p(out[i]), _p(vals[i]), cap), pieces)
    if min(counts) < 0 or sum(counts) > capacity:
        return None
    return (
        torch.cat([out[i, :c] for i, c in enumerate(counts)]),
        torch.cat([vals[i, :c] for i, c in enumerate(counts)]),
    )


# ---- the step's bookkeeping ------------------------------------------------------------
def split_flat(idx_N: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """(idx // n_cols, idx % n_cols) of non-negative int64 flat indices, in one pass."""
    _check(idx_N)
    if idx_N.dtype != torch.int64 or n_cols < 1:
        raise ValueError("split_flat: expected int64 indices and n_cols >= 1")
    rows, cols = torch.empty_like(idx_N), torch.empty_like(idx_N)
    library().split_flat(idx_N.numel(), _p(idx_N), n_cols, _p(rows), _p(cols))
    return rows, cols


def bag_ids(rows_N: Tensor, lat_N: Tensor, group_of_F: Tensor, n_groups: int) -> Tensor:
    """int64 [N]: rows * n_groups + group_of_F[lat] in one pass (int64 inputs)."""
    _check(rows_N, lat_N, group_of_F)
    if not all(t.dtype == torch.int64 for t in (rows_N, lat_N, group_of_F)):
        raise ValueError("bag_ids: expected int64 rows, latents and groups")
    if rows_N.shape != lat_N.shape:
        raise ValueError("bag_ids: rows and latents differ in shape")
    _check_range(lat_N, group_of_F.numel(), "latent indices")
    bags = torch.empty_like(rows_N)
    fn = library().bag_ids
    fn(rows_N.numel(), _p(rows_N), _p(lat_N), _p(group_of_F), n_groups, _p(bags))
    return bags


def fired(lat_N: Tensor, vals_N: Tensor, n_latents: int) -> Tensor:
    """bool [n_latents]: True at the latents of the entries with a nonzero value."""
    _check(lat_N, floats=(vals_N,))
    if vals_N.shape != lat_N.shape:
        raise ValueError("fired: lat and vals differ in shape")
    _check_range(lat_N, n_latents, "latent indices")
    out = torch.zeros(n_latents, dtype=torch.bool)
    library().mark_fired(lat_N.numel(), _p(lat_N), _p(vals_N), _p(out))
    return out


def max_abs_diff_finite(exact_N: Tensor, approx_N: Tensor) -> Tensor:
    """0-d float32: max |exact - approx| over the entries where ``approx`` (bf16 or fp32) is
    finite, 0 when none is."""
    _check(approx_N, floats=(exact_N,))
    if approx_N.shape != exact_N.shape or approx_N.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("max_abs_diff_finite: expected bf16 / fp32 approx shaped like exact")
    low = approx_N.dtype == torch.bfloat16
    bits = _p(approx_N.view(torch.int16)) if low else None
    m = library().max_abs_diff_finite(
        exact_N.numel(), _p(exact_N), bits, None if low else _p(approx_N)
    )
    return torch.tensor(m, dtype=torch.float32)


def normalize_rows(W_FD: Tensor, eps: float) -> None:
    """In place: every row of the fp32 [F, D] ``W_FD`` divided by (its norm + eps)."""
    _check(floats=(W_FD,))
    F, D = W_FD.shape
    fn = library().normalize_rows
    _run_pieces(lambda _, s, e: fn(s, e, D, _p(W_FD), eps), _ranges(F))
    torch.autograd.graph.increment_version(W_FD)  # a graph that saved W sees it changed


def rows_to_bf16_padded(
    src_RD: Tensor,
    out_RK: Tensor,
    *,
    sub_D: Tensor | None = None,
    f32_out_RD: Tensor | None = None,
    extra_R: Tensor | None = None,
    extra: float = 0.0,
) -> None:
    """Fill the bf16 [R, K] ``out_RK`` (K > D) with rows [v, e, 0, ...], v = ``src_RD`` -
    ``sub_D`` (or ``src_RD``) rounded as ``Tensor.to(torch.bfloat16)`` does, e = ``extra_R``'s
    entry for the row (or ``extra``); with ``f32_out_RD`` also write v there in fp32."""
    floats = tuple(t for t in (src_RD, sub_D, f32_out_RD, extra_R) if t is not None)
    _check(out_RK, floats=floats)
    R, D = src_RD.shape
    if out_RK.dtype != torch.bfloat16 or out_RK.dim() != 2 or out_RK.shape[0] != R:
        raise ValueError("rows_to_bf16_padded: out must be bf16 [R, K]")
    K = out_RK.shape[1]
    if K <= D or (sub_D is not None and sub_D.shape != (D,)):
        raise ValueError("rows_to_bf16_padded: shapes do not match")
    if (f32_out_RD is not None and f32_out_RD.shape != (R, D)) or (
        extra_R is not None and extra_R.shape != (R,)
    ):
        raise ValueError("rows_to_bf16_padded: shapes do not match")
    fn = library().rows_to_bf16_padded
    ptrs = [None if t is None else _p(t) for t in (src_RD, sub_D, f32_out_RD, extra_R)]
    _run_pieces(lambda _, s, e: fn(s, e, D, K, *ptrs, extra, _p(out_RK)), _ranges(R))


def sample_size(n: int, stride: int, block: int) -> int:
    """How many values the blocks [j stride, j stride + block) of range(n) hold."""
    n_blocks = -(-n // stride)
    return (n_blocks - 1) * block + min(block, n - (n_blocks - 1) * stride)


def sample_kth_largest_bf16(flat: Tensor, stride: int, block: int, m: int) -> Tensor:
    """The m-th largest (0-d bf16) of the values of the flat bf16 ``flat`` in the blocks
    ``flat[j stride : j stride + block]``, read where they lie (no copy, no sort)."""
    _check(flat)
    n = flat.numel()
    if flat.dtype != torch.bfloat16 or flat.dim() != 1 or not 1 <= block <= stride:
        raise ValueError("sample_kth_largest_bf16: expected flat bf16, 1 <= block <= stride")
    if not 1 <= m <= sample_size(n, stride, block):
        raise ValueError(f"sample_kth_largest_bf16: m={m} outside the sample")
    bits = int(library().sample_kth_largest_bf16(n, _p(flat), stride, block, m))
    signed = bits - (1 << 16) if bits >= 1 << 15 else bits  # the same 16 bits as int16
    return torch.tensor(signed, dtype=torch.int16).view(torch.bfloat16)
