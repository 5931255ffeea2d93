"""`premoe demo`: the method end to end on the embedded testbed, offline, in a few minutes."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("demo")
@click.option("--out", default="premoe-demo", show_default=True, type=click.Path(), help="Where to write everything.")
@click.option("--specialist", default="python", show_default=True, help="Testbed domain of the compiled specialist.")
@click.option("--keep", default=0.5, show_default=True, help="Fraction of experts the compiled models keep.")
@click.option("--quick", is_flag=True, help="A reduced run (fewer tokens and windows), as CI runs it.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "json_out", type=click.Path(), help="Also write the numbers as JSON to this file.")
def command(out, specialist, keep, quick, force, json_out) -> None:
    """Profile the testbed's domains, compile a specialist and a generalist, verify, evaluate, report.

    Needs no arguments and no network: `premoe demo`.
    """
    from premoe.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(out=Path(out), specialist=specialist, keep=keep, quick=quick), force=force)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")
