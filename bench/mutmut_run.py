"""Mutation testing with a tool: mutmut's mutants of the core modules, beside bench/mutation.py's scripted ones.

bench/mutation.py injects bugs someone wrote down; a sceptic may say those
are the bugs the tests were written for. mutmut mutates *every* operator,
constant, string, default and call argument it can parse, so its survivors
are an unbiased list of what no test notices. Each module runs against the
test files that exercise it (MODULES), in a copy of the tree (the working
tree is never modified). Needs mutmut: ``pip install -e '.[mutation]'``::

    OMP_NUM_THREADS=1 python bench/mutmut_run.py                    # every module in MODULES (about an hour)
    OMP_NUM_THREADS=1 python bench/mutmut_run.py --only scores,plan

Results: ``bench/results/mutmut.json``: per module the mutant count, the
killed ones, and each survivor with its diff and a class — ``message`` (only
the text of an error message or a help string changed), or ``review`` (read
it: an equivalent mutant or a gap in the tests). docs/testing.md lists what
the reviewed survivors were.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODULES: dict[str, tuple[str, tuple[str, ...]]] = {  # module -> (file, the tests that exercise it)
    "scores": ("premoe/scores.py", ("tests/test_scores.py", "tests/test_select.py", "tests/test_baselines.py")),
    "plan": ("premoe/plan.py", ("tests/test_plan.py", "tests/test_budget.py")),
    "novelty": ("premoe/novelty.py", ("tests/test_novelty.py",)),
    "bytelm": ("premoe/bytelm.py", ("tests/test_bytelm.py",)),
    "ngram": ("premoe/ngram.py", ("tests/test_ngram.py",)),
    "matchers": ("premoe/matchers.py", ("tests/test_matchers.py",)),
    "checkpoint": ("premoe/checkpoint.py", ("tests/test_checkpoint.py",)),
    "openai_request": ("premoe/openai_request.py", ("tests/test_openai_request.py", "tests/test_serve_hardening.py")),
}
_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "premoe-demo", ".pytest_cache",
                                 "mutants", "runs")


def run_module(name: str, file: str, tests: tuple[str, ...], workers: int) -> dict:
    """mutmut on one file in a fresh copy of the tree: counts, and every survivor's diff and class."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(ROOT, tree, ignore=_IGNORE)
        with open(tree / "pyproject.toml", "a") as f:  # mutmut reads its settings from pyproject.toml only
            f.write(f"\n[tool.mutmut]\nsource_paths = [{file!r}]\nalso_copy = ['premoe/']\n"
                    f"pytest_add_cli_args_test_selection = {list(tests)!r}\n")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        started = time.time()
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(workers)], cwd=tree,
                             env=env, capture_output=True, text=True)
        seconds = round(time.time() - started, 1)
        listed = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=tree, env=env,
                                capture_output=True, text=True).stdout
        statuses = dict(re.findall(r"^\s*(\S+): (.+)$", listed, re.M))
        if not statuses:
            raise SystemExit(f"mutmut found no mutants in {file} (exit {run.returncode}):\n{run.stdout[-2000:]}"
                             f"{run.stderr[-2000:]}")
        survivors = []
        for mutant, status in statuses.items():
            if status.strip() != "survived":
                continue
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=tree, env=env,
                                  capture_output=True, text=True).stdout
            changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
            survivors.append({"mutant": mutant, "diff": changed, "class": classify(changed)})
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status.strip()] = counts.get(status.strip(), 0) + 1
    killed = counts.get("killed", 0)
    return {"module": name, "file": file, "tests": list(tests), "mutants": len(statuses), "statuses": counts,
            "killed": killed, "score": round(killed / len(statuses), 3), "seconds": seconds,
            "survivors": survivors}


def classify(changed: list[str]) -> str:
    """``message`` when the mutant changed only the text of a string inside a raise/help/print line, else ``review``."""
    if len(changed) == 2 and re.search(r"raise |Error\(|help=|warn", changed[0]):
        strip = lambda line: re.sub(r'"[^"]*"|\'[^\']*\'|None', "S", line[1:])  # noqa: E731
        if strip(changed[0]) == strip(changed[1]) or "Error(None)" in changed[1]:
            return "message"
    return "review"


def table(before: dict, after: dict) -> str:
    """Markdown: per module, mutants killed before and after (a module missing from ``after``: "not rerun")."""
    rows = ["| module | test files | mutants | killed before | no tests | killed after | survivors after |",
            "|---|---|---|---|---|---|---|"]
    for name, row in before.items():
        new = after.get(name)
        cell = lambda r: f"{r['killed']}/{r['mutants']} ({r['score']:.1%})"  # noqa: E731
        untested = lambda r: f" → {r['statuses'].get('no tests', 0)}" if r else ""  # noqa: E731
        rows.append(f"| {name} | {len(row['tests'])} | {row['mutants']} | {cell(row)} | "
                    f"{row['statuses'].get('no tests', 0)}{untested(new)} | "
                    f"{cell(new) if new else 'not rerun'} | "
                    f"{len(new['survivors']) if new else '—'} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated modules (default: every one of " + ", ".join(MODULES) + ")")
    parser.add_argument("--workers", type=int, default=1, help="mutmut's parallel test runs (2 cores here: 1)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/mutmut.json"))
    parser.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"), help="print the markdown table of two runs")
    args = parser.parse_args()
    if args.table:
        before, after = (json.loads(Path(p).read_text())["modules"] if Path(p).exists() else {} for p in args.table)
        print(table(before, after))
        return 0
    names = args.only.split(",") if args.only else list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(MODULES)}")
    out = Path(args.out)
    results = json.loads(out.read_text())["modules"] if out.exists() else {}
    for name in names:
        file, tests = MODULES[name]
        row = run_module(name, file, tests, args.workers)
        results[name] = row
        review = sum(s["class"] == "review" for s in row["survivors"])
        print(f"{name:16s} {row['killed']:4d}/{row['mutants']:<4d} killed ({row['score']:.1%}), "
              f"{len(row['survivors'])} survived ({review} to review), {row['seconds']} s", flush=True)
        out.write_text(json.dumps({"tool": "mutmut", "modules": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
