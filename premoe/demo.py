"""`premoe demo`: the whole method on the embedded testbed, in a few minutes, offline.

1. profile the six testbed domains (calibration split) with the default scorer and a baseline;
2. plan a python specialist and a generalist at 50% of the experts;
3. compile both by streaming surgery, and verify them against the forced-routing original;
4. evaluate the compiled checkpoints against the full model (test split), and sweep default
   scorer vs baseline at 50% and 25% by masking;
5. print a short table and write the HTML report.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from premoe.errors import OutputExistsError


@dataclass
class DemoConfig:
    out: Path = Path("premoe-demo")
    specialist: str = "python"  # domain of the specialist that is compiled
    keep: float = 0.5  # experts kept by the compiled models
    scorer: str = "peu"  # premoe's default scorer
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
    from premoe.compile import compile_checkpoint
    from premoe.data import parse_sources
    from premoe.evaluate import Evaluator
    from premoe.modeling import load_model, load_tokenizer
    from premoe.plan import PlanRequest, make_plan
    from premoe.profile import ProfileParams, profile_model
    from premoe.report import write_report
    from premoe.sweep import SweepConfig, run_sweep
    from premoe.verify import verify

    out = Path(config.out)
    if out.exists():
        if not force:
            raise OutputExistsError(f"{out} already exists; pass --force to run the demo again into it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.time()
    model, tokenizer = load_model("testbed"), load_tokenizer("testbed")

    _step(f"1/5 profiling the testbed's domains ({config.calib_tokens} calibration tokens each)")
    profile = profile_model("testbed", parse_sources(["testbed"]), [config.scorer, config.baseline],
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
    test = parse_sources(["testbed"], split="test")
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
    click.echo(f"demo finished in {time.time() - started:.0f} s")
    return {"full": full.to_dict(), "compiled": {n: r.to_dict() for n, r in compiled.items()}, "verify": verified}


def _table(full, compiled: dict, config: DemoConfig) -> str:
    names = list(compiled)
    header = f"{'domain':<10} {'full ppl':>9}" + "".join(f" {n + ' ppl':>18} {'KL':>7}" for n in names)
    lines = [header, "-" * len(header)]
    for domain, base in full.domains.items():
        cells = "".join(f" {compiled[n].domains[domain].ppl:>9.2f} ({compiled[n].domains[domain].ppl / base.ppl - 1:+6.1%})"
                        f" {compiled[n].domains[domain].kl:>7.3f}" for n in names)
        lines.append(f"{domain:<10} {base.ppl:>9.2f}{cells}")
    return "\n".join(lines)
