"""Writes around the page cache (storage/direct_io.py): the same bytes in every path."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from masksae.storage import direct_io

needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")


def _expected(head: np.ndarray, tail: bytes) -> bytes:
    return head.tobytes() + tail


@pytest.mark.parametrize("rows", [1, 64, 257])
def test_aligned_buffers_and_files_hold_the_same_bytes(rows, tmp_path):
    head = direct_io.aligned_empty((rows, 576), np.uint16)
    assert head.ctypes.data % direct_io.ALIGN == 0 and head.flags.c_contiguous
    head[:] = np.random.default_rng(rows).integers(0, 2**16, head.shape, dtype=np.uint16)
    tail = bytes(range(37))  # a shard index: not a multiple of the alignment
    direct_io.write_new_file(tmp_path / "f", head, tail)
    assert (tmp_path / "f").read_bytes() == _expected(head, tail)
    # an unaligned buffer (a view one element in) goes through the cache
    direct_io.write_new_file(tmp_path / "g", head.reshape(-1)[1:], tail)
    assert (tmp_path / "g").read_bytes() == _expected(head.reshape(-1)[1:], tail)
    # a shorter rewrite truncates
    direct_io.write_new_file(tmp_path / "f", head[:1])
    assert (tmp_path / "f").read_bytes() == head[:1].tobytes()


@needs_o_direct
def test_o_direct_is_asked_for_aligned_data_and_not_when_switched_off(tmp_path, monkeypatch):
    flags = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, f, *a: flags.append(f) or real_open(p, f, *a))
    head = direct_io.aligned_empty((4, 4096), np.uint8)
    head[:] = 7
    direct_io.write_new_file(tmp_path / "f", head, b"xyz")
    assert flags[0] & os.O_DIRECT
    flags.clear()
    monkeypatch.setenv("MASKSAE_DIRECT_WRITES", "0")
    direct_io.write_new_file(tmp_path / "f", head, b"xyz")
    assert flags and not any(f & os.O_DIRECT for f in flags)
    assert (tmp_path / "f").read_bytes() == _expected(head, b"xyz")


@needs_o_direct
@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_filesystem_refusing_o_direct_gets_the_same_bytes_buffered(
    refused_at, tmp_path, monkeypatch
):
    # tmpfs and some network filesystems answer EINVAL to O_DIRECT at open or at the write
    real_open, real_write = os.open, os.write
    direct_fds = set()

    def fake_open(path, flags, *args):
        if flags & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags & ~os.O_DIRECT, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_write(fd, data):
        if fd in direct_fds:
            direct_fds.discard(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)
    head = direct_io.aligned_empty((3, 4096), np.uint8)
    head[:] = np.arange(3)[:, None]
    direct_io.write_new_file(tmp_path / "f", head, b"index")
    assert (tmp_path / "f").read_bytes() == _expected(head, b"index")


def test_other_write_errors_are_not_swallowed(tmp_path, monkeypatch):
    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    head = direct_io.aligned_empty((2, 4096), np.uint8)
    with pytest.raises(OSError, match="No space"):
        direct_io.write_new_file(tmp_path / "f", head, b"")
