"""Writing large activation buffers around the page cache (``O_DIRECT``).

A harvest writes each chunk's activations once and does not read them back; through the page
cache every byte is first copied into freshly allocated cache pages (kernel time on the
writer thread, taken from the cores the model's forward pass runs on) and written back
later. Measured on this project's 2-core VM: 4 x 37 MiB shards cost 1.3-2.1 s of kernel time
written through the cache into memory not touched before (a fresh VM's, or after other
work), 0.005 s with ``O_DIRECT``, which has the device read the buffer itself.

``O_DIRECT`` needs the buffer, the file offset and the length aligned (``ALIGN`` covers the
512 and 4096-byte logical blocks of common devices), so the writer allocates its buffers
with :func:`aligned_empty` and :func:`write_new_file` sends the aligned part of a buffer
that way and the rest (a shard's index) through the cache. Where the flag is missing (not
Linux) or refused (tmpfs, some network and FUSE filesystems), or with
``MASKSAE_DIRECT_WRITES=0``, the same bytes are written the ordinary way. Durability is the
caller's as before: the file is fsynced before its chunk is recorded complete.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import numpy as np

ALIGN = 4096
_OFF_VALUES = {"0", "false", "no", "off"}


def enabled() -> bool:
    """Whether large aligned writes go around the page cache here (see module docstring)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    return os.environ.get("MASKSAE_DIRECT_WRITES", "").strip().lower() not in _OFF_VALUES


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``ALIGN``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def write_new_file(path: Path, head: np.ndarray, tail: bytes = b"") -> None:
    """Create (or truncate) ``path`` holding the bytes of the C-contiguous ``head`` then
    ``tail``. The longest ``ALIGN``-multiple prefix of ``head`` is written with ``O_DIRECT``
    when ``head`` starts aligned and :func:`enabled`; everything else through the cache."""
    data = memoryview(head).cast("B")
    direct = len(data) - len(data) % ALIGN if enabled() and head.ctypes.data % ALIGN == 0 else 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    fd = None
    if direct:
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem refuses O_DIRECT
                raise
            direct = 0
    if fd is None:
        fd = os.open(path, flags, 0o666)
    try:
        done = _write_direct(fd, data[:direct]) if direct else 0
        _write_all(fd, data[done:])
        _write_all(fd, memoryview(tail))
    finally:
        os.close(fd)


def _write_direct(fd: int, data: memoryview) -> int:
    """Write ``data`` with the fd's O_DIRECT, then clear the flag; returns the bytes written
    (fewer when the device refused an aligned write: the caller writes the rest buffered)."""
    import fcntl  # POSIX only, like O_DIRECT itself

    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
            if done % ALIGN:  # a short write off the alignment: go on through the cache
                break
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    return done


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
