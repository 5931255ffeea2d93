"""The benchmark and results scripts still import, define their arguments, and accept the commands the docs run.

CI runs only pytest, so a bench/ script broken by a change in premoe (an API,
a stricter input rule) went unnoticed until someone reran it. These tests
import every bench/*.py module, run its ``--help`` (argparse formats every
help string then, so a stray ``%`` fails here), parse the exact command lines
docs/make_results.sh runs (bench scripts through their own parsers, premoe
verbs through click) without running them, check that bench/mutants.py's
snippets still apply, and (slow) run the two ``--quick`` benchmarks end to end.
"""
import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))
LIBRARIES = {"mutants", "plain_reads", "taer_setup"}  # imported by the others; no command line of their own


class _Parsed(Exception):
    """Raised in place of running a script once its arguments are parsed."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.chdir(ROOT)  # the scripts are run from the repository root


def _parse_only(monkeypatch, script: str, argv: list[str]) -> argparse.Namespace:
    """``script``'s main() up to its parse_args(argv): the namespace, or the SystemExit argparse raised."""
    module = importlib.import_module(script)
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", *argv])
    with pytest.raises(_Parsed) as parsed:
        module.main()
    return parsed.value.namespace


def test_every_bench_script_is_covered():
    # a new script must be listed here (library or command) so its smoke test is a decision, not an accident
    assert LIBRARIES < set(SCRIPTS) and len(SCRIPTS) == 18, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_imports_and_prints_help(script, bench_path, monkeypatch, capsys):
    module = importlib.import_module(script)
    if script in LIBRARIES:
        assert not hasattr(module, "main")
        return
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script}.py") and "--help" in out


def test_taer_setup_defines_the_shared_arguments(bench_path):
    import taer_setup

    parser = argparse.ArgumentParser()
    taer_setup.add_arguments(parser)
    args = parser.parse_args(["--quick", "--store", "s"])
    assert args.quick and args.store == Path("s") and args.model == "testbed"
    assert all(not u.endswith(".json") for u in args.unseen)  # premoe refuses .json data files


def test_every_mutant_still_applies(bench_path):
    """bench/mutation.py reports a mutant whose snippet moved as 'not applied': catch the move here instead."""
    from mutants import MUTANTS

    counts = {m.name: (ROOT / m.path).read_text().count(m.old) for m in MUTANTS}
    assert {name: n for name, n in counts.items() if n != 1} == {}
    missing = {t for m in MUTANTS for t in m.tests if not (ROOT / t.split("::")[0]).is_file()}
    assert missing == set()
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)


# --------------------------------------------------------------------------- docs/make_results.sh


def _make_results_commands() -> list[list[str]]:
    """The premoe and python command lines of docs/make_results.sh, its variables filled in as it fills them."""
    text = (ROOT / "docs" / "make_results.sh").read_text().replace("\\\n", " ")
    scorers = re.search(r"^scorers=(\S+)$", text, re.M).group(1)
    values = {"model": "testbed", "dir": "runs/testbed", "runs": "runs", "windows": "48", "scorers": scorers}
    commands = []
    for line in text.splitlines():
        line = re.sub(r"^.*\|\|\s*", "", line.strip()).split(" > ")[0]  # `[ -f X ] || premoe ...`, `> out.txt`
        if line.startswith(("premoe ", "python bench/")):
            line = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], line)
            commands.append(shlex.split(line))
    return commands


def test_make_results_runs_the_commands_this_test_parses():
    verbs = [c[1] for c in _make_results_commands()]
    assert verbs.count("profile") == 1 and verbs.count("sweep") == 2 and verbs.count("report") == 1
    assert verbs.count("bench/eval_retrieval.py") == 3 and verbs.count("bench/select_study.py") == 4
    assert {"bench/outside_probe.py", "bench/bench_serve.py"} <= set(verbs)


@pytest.mark.parametrize("command", [c for c in _make_results_commands() if c[0] == "premoe"],
                         ids=lambda c: " ".join(c[1:3]))
def test_make_results_premoe_command_parses(command):
    import click

    from premoe.cli import cli

    leaf, rest = cli, command[1:]
    while isinstance(leaf, click.Group):  # `profile run`: down to the command itself
        leaf, rest = leaf.get_command(click.Context(leaf), rest[0]), rest[1:]
    context = leaf.make_context(leaf.name, rest)  # parses and type-checks every option, invokes nothing
    assert context.params and not context.args


@pytest.mark.parametrize("command", [c for c in _make_results_commands() if c[0] == "python"],
                         ids=lambda c: " ".join(c[1:2]))
def test_make_results_bench_command_parses(command, bench_path, monkeypatch):
    args = _parse_only(monkeypatch, Path(command[1]).stem, command[2:])
    assert vars(args)  # parsed: every option exists, every choice is valid


def test_shell_scripts_are_valid_bash():
    for script in (ROOT / "docs" / "make_results.sh", BENCH / "layout_variants.sh"):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- end to end (tiny random model)


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    ("eval_retrieval", ["--tokens", "8", "--prompt-tokens", "8", "--windows", "4"]),
    ("bench_serve", ["--rounds", "2", "--requests", "2", "--max-tokens", "2"]),
])
def test_quick_benchmark_runs(script, args, tmp_path):
    import json
    import os

    out = tmp_path / f"{script}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", *args, "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    if script == "eval_retrieval":
        assert result["domains"] == ["code", "bible", "de"] and result["unseen"] == ["digits"]
        assert {"selection", "accuracy", "unseen_fallback", "roc", "perplexity", "mixed"} <= set(result)
    else:
        server = result["server"]
        assert (server["requests_per_round"], server["max_tokens"]) == (2, 2)
        assert server["swapping_requests"]["fixed"] == 0 and set(server["requests_per_s"]) == {"cycling", "same",
                                                                                                   "fixed"}


@pytest.mark.slow
def test_rehearsal_swap_and_compile_rows_run(tmp_path, bench_path):
    """The rehearsal's swap child (plain reads of the bank's ranges, its slot cache included) and compile row on a
    5-layer DeepSeek-V3 layout: the swap row broke unnoticed when the slot cache lost its name."""
    import bench_rehearsal
    import dsv3_layout

    from premoe.modeling import model_identity
    from premoe.plan import Plan

    model = dsv3_layout.write(dsv3_layout.Layout(layers=5, shards=7), tmp_path / "dsv3")
    swap = bench_rehearsal.swap_cost(model, 2, 0.25)
    assert swap["swaps"] == 2 and swap["experts_read"] > 0 and swap["ratio_median"] > 0
    kept = {layer: [g * 32 + e for g in range(8) for e in range(16)] for layer in (3, 4)}  # half of every group
    plan = Plan(model_identity(model), "DeepSeek-V3", 256, 8, [3, 4], kept, {l: list(range(256)) for l in kept},
                {"scorer": "random", "ranking": "local"}, "specialist:test", {})
    plan.save(tmp_path / "plan.json")
    row = bench_rehearsal.compile_throughput(model, tmp_path / "plan.json", tmp_path, 1, 0)
    assert row["threads"] >= 1 and len(row["compile_serial_s"]) == 1 and row["ratio_median"] > 0
