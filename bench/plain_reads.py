"""The physical references a swap is compared with: plain reads of byte ranges from the page cache.

``pread``: each range read into a fresh ``bytes`` (malloc recycles the
freed buffer, so the destination stays in the CPU caches: the strictest
reference). ``pread_kept``: all of a swap's ranges read into one buffer the
size of the swap, as a loader that keeps the bytes must; such buffers are
used in turn, as many as make 256 MB together (at least two), so the
destination is no more cached than a bank's slots (this CPU's last-level
cache holds 32 MB).
``pread_convert``: ``pread`` plus widening bf16 into fp32, what a bank that
reads a bf16 checkpoint into fp32 slots must do on top.
"""
from __future__ import annotations

import os

import torch

KINDS = ("pread", "pread_kept", "pread_convert")


class PlainReads:
    """Opens the files of the ranges it is given once; ``read(ranges, kind)`` runs one reference."""

    def __init__(self, disk_dtype=torch.bfloat16, resident_dtype=torch.float32, cycled_bytes: int = 256 << 20):
        self.files: dict[str, int] = {}
        self.disk, self.resident, self.cycled = disk_dtype, resident_dtype, cycled_bytes
        self.buffers: list[bytearray] = []

    def read(self, ranges: list[tuple], kind: str) -> int:
        """Read ``ranges`` ((file, offset, length, ...)) the ``kind`` way; returns bytes read."""
        for path, *_ in ranges:
            if path not in self.files:
                self.files[path] = os.open(path, os.O_RDONLY)
        if kind == "pread_kept":
            return self._into_kept(ranges)
        total = 0
        for path, offset, length, *_ in ranges:
            data = os.pread(self.files[path], length, offset)
            if kind == "pread_convert":
                torch.frombuffer(bytearray(data), dtype=self.disk).to(self.resident)
            total += len(data)
        return total

    def _into_kept(self, ranges) -> int:
        total = sum(r[2] for r in ranges)
        if not self.buffers or len(self.buffers[0]) < total:
            self.buffers = [bytearray(total) for _ in range(max(2, -(-self.cycled // total)))]
        self.buffers.append(self.buffers.pop(0))  # the least recently used buffer
        view, at = memoryview(self.buffers[0]), 0
        for path, offset, length, *_ in ranges:
            at += os.preadv(self.files[path], [view[at: at + length]], offset)
        return at

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
