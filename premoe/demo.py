"""`premoe demo`: the whole method on the embedded testbed, in a few minutes, offline.

1. profile the six testbed domains (calibration split) with the default scorer and a baseline;
2. plan a python specialist and a generalist at 50% of the experts;
3. compile both by streaming surgery, and verify them against the forced-routing original;
4. evaluate the compiled checkpoints against the full model (test split), and sweep default
   scorer vs baseline at 50% and 25% by masking;
5. print a short table and write the HTML report.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from premoe.errors import InputError
from premoe.fileio import put_back, set_aside, write_marker

DEMO_BYTES = 200 << 20  # two compiled testbed checkpoints, a profile, a sweep and a report, with room to spare


@dataclass
class DemoConfig:
    out: Path = Path("premoe-demo")
    specialist: str = "python"  # domain of the specialist that is compiled
    keep: float = 0.5  # experts kept by the compiled models
    scorer: str = "peu_norm"  # premoe's default scorer (premoe.scores.DEFAULT_SCORER)
    baseline: str = "frequency"  # the usual baseline: how often an expert is routed to
    calib_tokens: int = 8192  # per domain
    eval_windows: int = 16  # test windows of 256 tokens per domain
    quick: bool = False  # CI size: a fraction of the tokens and windows

    def __post_init__(self):
        if self.quick:
            self.calib_tokens, self.eval_windows = 1024, 2


def _step(message: str) -> None:
    click.secho(f"==> {message}", bold=True, err=True)


def run_demo(config: DemoConfig, force: bool = False) -> dict:
    """Run the demo into ``config.out``; return the numbers it printed."""
    from premoe import testbed

    if config.specialist not in testbed.domains():
        raise InputError(f"--specialist {config.specialist!r} is not a trained testbed domain; choose one of "
                         f"{', '.join(testbed.domains())}")
    _check_keep(config.keep)
    out = Path(config.out)
    previous = _prepare(out, force)
    try:
        result = _run_steps(config, out)
    except BaseException:  # Ctrl-C, SIGTERM, an error: the demo --force was replacing comes back
        if previous is not None:
            shutil.rmtree(out, ignore_errors=True)
            put_back(out, previous)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return result


def _run_steps(config: DemoConfig, out: Path) -> dict:
    """The five steps into ``out``, which :func:`_prepare` made."""
    from premoe.compile import compile_checkpoint
    from premoe.data import parse_sources
    from premoe.evaluate import Evaluator
    from premoe.modeling import load_model, load_tokenizer
    from premoe.plan import PlanRequest, make_plan
    from premoe.profile import ProfileParams, profile_model
    from premoe.report import write_report
    from premoe.sweep import SweepConfig, run_sweep
    from premoe.verify import verify

    started = time.time()
    model, tokenizer = load_model("testbed"), load_tokenizer("testbed")

    _step(f"1/5 profiling the testbed's domains ({config.calib_tokens} calibration tokens each)")
    calib = parse_sources(["testbed"], max_tokens=config.calib_tokens)
    profile = profile_model("testbed", calib, [config.scorer, config.baseline],
                            ProfileParams(max_tokens=config.calib_tokens), loaded=(model, tokenizer))
    profile.save(out / "profile")

    _step(f"2/5 planning a {config.specialist} specialist and a generalist at {config.keep:.0%} of the experts")
    percent = round(config.keep * 100)
    requests = {f"{config.specialist}-{percent}": PlanRequest(keep=config.keep, domain=config.specialist, scorer=config.scorer),
                f"generalist-{percent}": PlanRequest(keep=config.keep, scorer=config.scorer)}
    plans = {name: make_plan(profile, request, str(out / "profile")) for name, request in requests.items()}

    _step("3/5 compiling and verifying (plain from_pretrained vs the forced-routing original)")
    verified = {}
    for name, plan in plans.items():
        plan.save(out / f"{name}.json")
        compile_checkpoint("testbed", plan, out / name, progress=False)
        report = verify("testbed", out / name, [f"{config.specialist}:test"], max_tokens=512, progress=False)
        verified[name] = report.max_abs_diff
        click.echo(f"    {name}: max |Δlogit| vs forced routing = {report.max_abs_diff:.2e} "
                   f"({'ok' if report.passed else 'FAILED'})", err=True)

    _step("4/5 evaluating the compiled checkpoints and sweeping scorer vs baseline on the test split")
    test = parse_sources(["testbed"], split="test", max_tokens=config.eval_windows * 256)
    full = Evaluator(model, tokenizer, test, max_windows=config.eval_windows).evaluate(kl=False)
    compiled = {}
    for name in plans:
        evaluator = Evaluator(load_model(out / name), tokenizer, test, reference=model, max_windows=config.eval_windows)
        compiled[name] = evaluator.evaluate(label=name)
    sweep = SweepConfig(keep=[0.5, 0.25], scorers=[config.scorer, config.baseline], default_scorer=config.scorer,
                        max_windows=config.eval_windows)
    run_sweep("testbed", out / "profile", out / "sweep", sweep, progress=True, loaded=(model, tokenizer))

    _step("5/5 writing the report")
    write_report(out / "sweep", out / "report")
    rows = _table(full, compiled, config)
    click.echo("\n" + rows)
    click.echo(f"\nreport: {out / 'report' / 'report.html'}   checkpoints: {', '.join(str(out / n) for n in plans)}")
    write_marker(out, {"kind": "demo", "complete": True})
    click.echo(f"demo finished in {time.time() - started:.0f} s")
    return {"full": full.to_dict(), "compiled": {n: r.to_dict() for n, r in compiled.items()}, "verify": verified}


def _check_keep(keep: float) -> None:
    """Refuse a --keep the testbed cannot compile before step 1, not after profiling."""
    from premoe.adapters import get_adapter
    from premoe.modeling import read_config
    from premoe.plan import experts_for_keep

    from premoe import testbed

    config = read_config(testbed.path())
    adapter = get_adapter(config)
    experts_for_keep(keep, adapter.num_experts(config), adapter.top_k(config), adapter.groups(config))


def _prepare(out: Path, force: bool) -> Path | None:
    """Make ``out`` ready for a fresh demo; an unfinished demo (an interrupted run) is cleared without --force.

    The demo marks ``out`` as unfinished (with its process id) before step 1 and as complete after step 5, so a
    rerun after Ctrl-C or a kill starts over cleanly, while a finished demo is replaced only with ``--force``. That
    one is set aside rather than deleted (returned): it comes back if the new demo does not finish.
    """
    from premoe import testbed
    from premoe.fileio import check_inputs, check_output, check_replaceable, clean_stale_temps, read_marker

    check_inputs(out, [testbed.path(), testbed.corpus_path()])  # what the demo reads: never replaced, even with --force
    info = read_marker(out)
    if info.get("kind") == "demo" and not info.get("complete") and not _running(info.get("pid")):
        click.echo(f"premoe: removing the unfinished demo in {out} (an interrupted run) and starting again", err=True)
        shutil.rmtree(out)
        clean_stale_temps(out)  # a demo that was killed while replacing another: that one comes back
    if out.exists():
        check_replaceable(out, force=force)
    check_output(out, force=True, need_bytes=DEMO_BYTES)  # writable, enough space; clears stale temps
    previous = set_aside(out)
    out.mkdir(parents=True)
    write_marker(out, {"kind": "demo", "complete": False, "pid": os.getpid()})
    return previous


def _running(pid) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _table(full, compiled: dict, config: DemoConfig) -> str:
    names = list(compiled)
    header = f"{'domain':<10} {'full ppl':>9}" + "".join(f" {n + ' ppl':>18} {'KL':>7}" for n in names)
    lines = [header, "-" * len(header)]
    for domain, base in full.domains.items():
        cells = "".join(f" {compiled[n].domains[domain].ppl:>9.2f} ({compiled[n].domains[domain].ppl / base.ppl - 1:+6.1%})"
                        f" {compiled[n].domains[domain].kl:>7.3f}" for n in names)
        lines.append(f"{domain:<10} {base.ppl:>9.2f}{cells}")
    return "\n".join(lines)
