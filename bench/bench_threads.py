"""How `premoe` degrades when another CPU-bound process shares the machine (issue 15, "the first hour").

Runs one CLI workload (default: `premoe eval testbed` on two domains, ~7 s on 2 idle cores) in two arms,
alternated in one run so that the machine's drift hits both alike:

- ``torch``: torch's OpenMP defaults (one spinning thread per core) — the click group called directly;
- ``premoe``: the CLI entry point, which first applies premoe.threads.configure (passive waiting, one
  thread per free core).

Each arm runs idle and then beside ``--competitors`` busy-loop processes (`while True: pass`, as a
compile or a second user would be). Reported: median wall seconds, and each loaded median as a multiple of
the same arm's idle median (the issue's goal: at most 2x with one competitor).

    python bench/bench_threads.py --reps 3 --json bench/results/threads.json

Nothing else may run on the machine meanwhile (pause background jobs: `kill -STOP PID`, later `-CONT`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOAD = ["eval", "testbed", "--data", "python", "--data", "de", "--max-windows", "16", "--no-kl", "--json", "-"]
ARMS = {
    # torch's defaults: the click group without premoe's thread policy
    "torch": "import sys; from premoe.cli import cli; cli.main(args=sys.argv[1:], prog_name='premoe')",
    # what a user runs: the entry point
    "premoe": "import sys; from premoe.cli import main; main(sys.argv[1:])",
}


def clean_env() -> dict[str, str]:
    """The environment without any OpenMP setting, so each arm shows its own defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_"))}


def run_once(arm: str, workload: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ARMS[arm], *workload], env=clean_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"bench_threads: the {arm} arm failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def measure(reps: int, workload: list[str]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(reps):
        for arm in ARMS:
            times[arm].append(round(run_once(arm, workload), 3))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="alternated repetitions per condition")
    parser.add_argument("--competitors", type=int, default=1, help="busy-loop processes in the loaded condition")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    results: dict = {"workload": "premoe " + " ".join(WORKLOAD), "cpus": os.cpu_count(), "reps": args.reps,
                     "competitors": args.competitors}
    results["idle"] = measure(args.reps, WORKLOAD)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.competitors)]
    try:
        time.sleep(1.0)  # let the scheduler see them
        results["loaded"] = measure(args.reps, WORKLOAD)
    finally:
        for process in busy:
            process.kill()
    summary = {}
    for arm in ARMS:
        idle, loaded = statistics.median(results["idle"][arm]), statistics.median(results["loaded"][arm])
        summary[arm] = {"idle_s": round(idle, 2), "loaded_s": round(loaded, 2), "loaded_over_idle": round(loaded / idle, 2)}
    summary["premoe_over_torch"] = {
        cond: round(summary["premoe"][f"{cond}_s"] / summary["torch"][f"{cond}_s"], 2) for cond in ("idle", "loaded")}
    results["summary"] = summary
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
