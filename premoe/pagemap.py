"""Map a file's pages straight into a tensor's memory: an expert swap that copies no bytes.

A swap normally reads an expert's bytes into its slot (a copy from the page
cache, ~0.2 ns a byte here). On Linux a slot whose bytes are whole pages can
instead be *remapped*: ``mmap(MAP_FIXED | MAP_PRIVATE)`` of the slot cache's
page range over the slot's own addresses, then ``madvise(MADV_POPULATE_READ)``
so the page tables are filled at swap time, not by the next forward's page
faults. The tensor then reads the page cache's pages themselves: no bytes
move, the cost is two system calls and the page-table entries. The mapping is
private and writable, so a write to the weights (nobody should) copies that
page and never reaches the file; and the experts' memory is the page cache's,
which the kernel can reclaim and fault back in under pressure.

Where this cannot work (not Linux, a kernel before 5.14 without
``MADV_POPULATE_READ``, a slot that is not whole pages) :func:`available`
says so and the bank reads bytes as before.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys

import torch

_MAP_FIXED = 0x10  # Linux <sys/mman.h>
_MADV_POPULATE_READ = 22  # Linux 5.14+: fault the range in for reading (no copy-on-write break)

PAGE = mmap.PAGESIZE
# bytes: slices from this size on are mapped, smaller ones read. Measured (bench/bench_swap_sizes.py): at 64 kB a
# mapping costs ~1.6x a read into the slot (two system calls and the page-table entries), at 256 kB they about tie,
# from 1 MiB on mapping is 1.3-1.9x faster (no bytes move)
MAP_FROM = 1 << 20


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


@functools.cache
def available() -> bool:
    """Whether remapping works here: Linux, and the kernel knows MADV_POPULATE_READ (tried on a scratch page)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        scratch = mmap.mmap(-1, PAGE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(scratch))
        ok = _libc().madvise(address, PAGE, _MADV_POPULATE_READ) == 0
        del address
        scratch.close()
        return ok
    except (OSError, AttributeError, TypeError, ValueError, BufferError):
        return False


def page_aligned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in its own page-aligned anonymous mapping (so its page-sized slices can be remapped)."""
    nbytes = tensor.numel() * tensor.element_size()
    region = mmap.mmap(-1, max(nbytes, 1))  # page-aligned; the tensor keeps the mapping alive
    copy = torch.frombuffer(region, dtype=tensor.dtype, count=tensor.numel()).view(tensor.shape)
    copy.copy_(tensor)
    return copy


def remappable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (a slot slice) is contiguous, starts on a page and covers whole pages."""
    nbytes = tensor.numel() * tensor.element_size()
    return tensor.is_contiguous() and nbytes > 0 and nbytes % PAGE == 0 and tensor.data_ptr() % PAGE == 0


def map_into(tensor: torch.Tensor, fd: int, offset: int) -> None:
    """Make ``tensor``'s memory the file's bytes at ``offset`` (page-aligned, :func:`remappable` tensor), populated."""
    libc = _libc()
    start, length = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    protection = mmap.PROT_READ | mmap.PROT_WRITE
    got = libc.mmap(start, length, protection, mmap.MAP_PRIVATE | _MAP_FIXED, fd, offset)
    if got != start:
        error = ctypes.get_errno()
        # a failed MAP_FIXED may have unmapped the range: put zeroed memory back, never leave a hole to crash on
        libc.mmap(start, length, protection, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
        raise OSError(error, f"mmap of {length} bytes at file offset {offset} failed: {os.strerror(error)}")
    if libc.madvise(start, length, _MADV_POPULATE_READ) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"madvise(MADV_POPULATE_READ) of {length} bytes failed: {os.strerror(error)}")
