"""Scripted mutation testing: does the test suite catch deliberately injected bugs?

Each mutant replaces one exact snippet of a core module (it must occur exactly
once, so a mutant that no longer applies is reported, not silently skipped)
and runs the tests that cover that module. A mutant is *killed* when those
tests fail, *survives* when they pass. The mutants are bugs a careless edit
could plausibly introduce — wrong axis, off-by-one, a dropped renormalisation,
a loosened tolerance, a swapped comparison — not syntax errors.

Run it on a clean checkout (it copies the tree to a temporary directory, so
the working tree is never modified)::

    OMP_NUM_THREADS=1 python bench/mutation.py                  # all mutants
    OMP_NUM_THREADS=1 python bench/mutation.py --only plan      # mutants of one module
    OMP_NUM_THREADS=1 python bench/mutation.py --list

Results: ``bench/results/mutation.json`` (each mutant, killed or not, seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str  # short id, "module:what"
    path: str  # file relative to the repository root
    old: str  # exact snippet, present exactly once
    new: str  # its replacement
    tests: tuple[str, ...]  # pytest targets that should catch it


def mutants() -> list[Mutant]:
    from mutants import MUTANTS  # bench/mutants.py: the list, kept apart from the runner

    return MUTANTS


def run(mutant: Mutant, tree: Path, timeout: float) -> dict:
    """Apply one mutant in ``tree``, run its tests, restore the file; say whether it was killed."""
    file = tree / mutant.path
    original = file.read_text()
    count = original.count(mutant.old)
    if count != 1:
        return {**asdict(mutant), "status": f"not applied (snippet found {count} times)", "seconds": 0.0}
    file.write_text(original.replace(mutant.old, mutant.new))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               "-m", "not slow", *mutant.tests], cwd=tree, env=env, capture_output=True,
                              text=True, timeout=timeout)
        status = "survived" if proc.returncode == 0 else ("killed" if proc.returncode == 1 else
                                                            f"error (pytest exit {proc.returncode})")
        tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
    except subprocess.TimeoutExpired:
        status, tail = "killed (timeout)", []
    finally:
        file.write_text(original)
    return {**asdict(mutant), "status": status, "seconds": round(time.time() - started, 1), "pytest": tail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only mutants whose name starts with one of these (comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant before it counts as killed")
    parser.add_argument("--out", default=str(ROOT / "bench/results/mutation.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    prefixes = tuple(args.only.split(",")) if args.only else ("",)
    selected = [m for m in mutants() if m.name.startswith(prefixes)]
    if args.list:
        for m in selected:
            print(f"{m.name:40s} {m.path}  tests: {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                                    "premoe-demo", ".pytest_cache"))
        results = []
        for i, mutant in enumerate(selected, 1):
            result = run(mutant, tree, args.timeout)
            results.append(result)
            print(f"[{i}/{len(selected)}] {result['status']:28s} {mutant.name} ({result['seconds']} s)", flush=True)
    applied = [r for r in results if not r["status"].startswith("not applied")]
    killed = [r for r in applied if r["status"].startswith("killed")]
    summary = {"mutants": len(results), "applied": len(applied), "killed": len(killed),
               "score": round(len(killed) / max(len(applied), 1), 3),
               "survivors": [r["name"] for r in applied if r["status"] == "survived"],
               "not_applied": [r["name"] for r in results if r["status"].startswith("not applied")]}
    Path(args.out).write_text(json.dumps({"summary": summary, "results": results}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
