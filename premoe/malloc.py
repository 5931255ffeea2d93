"""glibc's malloc, told to give memory back: for processes that load and free weights layer after layer.

Why this exists: glibc serves an allocation of more than its *mmap threshold* with
its own mapping, which goes back to the OS when freed; smaller ones come from its
heap, whose free pages stay in the process. The threshold starts at 128 KiB and
*rises* (up to 32 MiB) each time a mapped block is freed, so once a process has
freed a few large tensors — imports, tokenisation and the first forward do — the
next layers' weights land on the heap, where one layer's freed tensors sit as holes
beside the next layer's. Fixing the threshold stops that rise; it must happen before
the first large free to help fully: on the 61-layer rehearsal checkpoint the
streaming profile's peak above its pre-layer memory was 2.0-2.3x the largest layer
with the threshold fixed when the first layer loads, 1.74-1.78x with it fixed at
process start (bench/bench_rehearsal.py --only profile). So the CLI calls
:func:`return_freed_memory` first thing for ``--stream`` runs, and the streaming
code calls it again for library users. Not for every command: a fixed threshold
maps and unmaps every large activation a forward pass allocates, where glibc
would reuse its heap — ``premoe demo`` took 268 s with it process-wide against
159 s without (system time 161 s vs 68 s). Nothing here imports torch; elsewhere
than glibc it is a no-op.
"""
from __future__ import annotations

import functools

MMAP_THRESHOLD = 1 << 20  # bytes: larger allocations get their own mapping, returned to the OS when freed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h); setting it also stops the rise


@functools.cache
def _libc():
    """glibc's malloc controls, or None where there is no glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give every allocation of :data:`MMAP_THRESHOLD` or more its own mapping, from now on (process-wide)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim_heap() -> None:
    """Return the heap's free pages to the OS (after a layer's weights are freed).

    Per-expert tensors (tens of KB each, below the threshold) are read and
    converted on malloc's heap; freed, they stay in the process: over 58 MoE
    layers of 256 experts the heap grew ~4.5 MB a layer (RSS 410 -> 665 MB on
    the rehearsal checkpoint) while live memory stayed flat.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
