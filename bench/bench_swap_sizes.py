"""Why the expert bank maps big slot slices and reads small ones: cost per byte by slice size.

Run (from the repository root)::

    OMP_NUM_THREADS=1 python bench/bench_swap_sizes.py --json bench/results/swap-sizes.json

For each slice size, a file of random fp32 slices (512 MB, in the page cache
after it is written) and M slots (64 MB of resident memory) are made; every
round fills all M slots from other slices four ways, in rotating order:
``map`` (premoe.pagemap.map_into: mmap over the slot + MADV_POPULATE_READ),
``read`` (preadv straight into the slot, what the bank does for small
slices), ``pread_recycled`` (a fresh bytes object per slice: malloc recycles
it, so the destination stays in the CPU caches) and ``pread_kept`` (into 64
MB of buffers used in turn). Medians of ns per byte over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from premoe import pagemap

SIZES_KB = (64, 256, 1024, 4096, 16384)


def measure(slice_bytes: int, rounds: int, file_bytes: int = 512 << 20, slot_bytes: int = 64 << 20) -> dict:
    count, slots = max(8, file_bytes // slice_bytes), max(4, slot_bytes // slice_bytes)
    handle, name = tempfile.mkstemp(prefix="premoe-swap-sizes-")
    try:
        for _ in range(count):
            os.write(handle, torch.randn(slice_bytes // 4).numpy().tobytes())
        resident = pagemap.page_aligned_copy(torch.zeros(slots * slice_bytes // 4)).view(slots, -1)
        read_views = [memoryview(row.view(torch.uint8).numpy()) for row in torch.zeros(slots, slice_bytes // 4)]
        kept = [memoryview(row.view(torch.uint8).numpy()) for row in torch.zeros(slots, slice_bytes // 4)]
        ways = {
            "map": lambda i, offset: pagemap.map_into(resident[i], handle, offset),
            "read": lambda i, offset: os.preadv(handle, [read_views[i]], offset),
            "pread_recycled": lambda i, offset: os.pread(handle, slice_bytes, offset),
            "pread_kept": lambda i, offset: os.preadv(handle, [kept[i]], offset),
        }
        per_byte = {way: [] for way in ways}
        names = list(ways)
        for r in range(rounds + 1):
            for k, way in enumerate(names[r % 4:] + names[: r % 4]):
                chosen = [(r * 7 + i * 3 + k * 5) % count for i in range(slots)]  # each way its own slices
                start = time.perf_counter()
                for i, e in enumerate(chosen):
                    ways[way](i, e * slice_bytes)
                if r:  # round 0 warms up
                    per_byte[way].append((time.perf_counter() - start) / (slots * slice_bytes) * 1e9)
        return {way: round(statistics.median(v), 4) for way, v in per_byte.items()}
    finally:
        os.close(handle)
        os.unlink(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=str, help="write the results here")
    args = parser.parse_args()
    if not pagemap.available():
        raise SystemExit("page remapping is not available here (Linux 5.14+ with MADV_POPULATE_READ)")
    results = {"ns_per_byte": {}, "map_from_bytes": pagemap.MAP_FROM, "rounds": args.rounds}
    for kb in SIZES_KB:
        results["ns_per_byte"][f"{kb} kB"] = row = measure(kb * 1024, args.rounds)
        print(f"{kb:>6} kB  " + "  ".join(f"{w} {v:.3f}" for w, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
