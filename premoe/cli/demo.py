"""`premoe demo`: the method end to end on the embedded testbed, offline, in a few minutes."""
from __future__ import annotations

from pathlib import Path

import click

from premoe.cli.options import FRACTION, json_option


@click.command("demo")
@click.option("--out", default="premoe-demo", show_default=True, type=click.Path(), help="Where to write everything.")
@click.option("--specialist", default="python", show_default=True, help="Testbed domain of the compiled specialist.")
@click.option("--keep", default=0.5, show_default=True, type=FRACTION, help="Fraction of experts the compiled models keep.")
@click.option("--quick", is_flag=True, help="A reduced run (fewer tokens and windows), as CI runs it.")
@click.option("--force", is_flag=True, help="Replace --out (and the --json FILE) if it exists and premoe wrote it.")
@json_option("Also write the numbers as JSON to FILE ('-' or a bare --json: stdout).")
def command(out, specialist, keep, quick, force, json_out) -> None:
    """Profile the testbed's domains, compile a specialist and a generalist, verify, evaluate, report.

    Needs no arguments and no network: `premoe demo`.
    """
    from premoe.demo import DemoConfig, run_demo
    from premoe.fileio import check_output, emit_json

    if json_out not in (None, "-"):
        check_output(json_out, inputs=[out], force=force, kind="file")  # before the demo, not after
    result = run_demo(DemoConfig(out=Path(out), specialist=specialist, keep=keep, quick=quick), force=force)
    emit_json(json_out, result, kind="demo", force=force, inputs=[out])
