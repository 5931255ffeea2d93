"""premoe.malloc: with the threshold fixed, freed large blocks leave the process even after earlier large frees."""
import subprocess
import sys

import pytest

CHILD = r"""
import sys
fixed = sys.argv[1] == "1"
import premoe.malloc as malloc
if malloc._libc() is None:
    print("skip"); sys.exit()
if fixed:
    malloc.return_freed_memory()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) * 1024
first = bytearray(8 << 20); del first      # a large free: glibc's default threshold rises past 2 MiB
blocks, pins = [], []
for _ in range(48):                           # 96 MiB of 2 MiB blocks, each followed by a small block that stays
    blocks.append(bytearray(2 << 20)); pins.append(bytearray(4096))
before = rss()
del blocks
print(before - rss())
"""


def returned(fixed: bool) -> int | None:
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if fixed else "0"], capture_output=True, text=True,
                         check=True).stdout.strip()
    return None if out == "skip" else int(out)


def test_fixed_threshold_returns_freed_blocks_that_the_default_keeps():
    with_fix, default = returned(True), returned(False)
    if with_fix is None:
        pytest.skip("not glibc")
    assert with_fix >= 90 << 20  # all 96 MiB mapped, unmapped when freed
    assert default < 48 << 20  # the control: on the heap, pinned by the small blocks between them
