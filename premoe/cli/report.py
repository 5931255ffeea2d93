"""`premoe report`: render a sweep's results as HTML (self-contained) and Markdown with PNG plots."""
from __future__ import annotations

import json

import click


@click.command("report")
@click.argument("results", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Directory for report.html, report.md and the plots.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the written files as JSON.")
def command(results, out, force, as_json) -> None:
    """Render RESULTS (a `premoe sweep` directory or its results.json) as a report.

    \b
    premoe report sweep/ --out sweep/report
    """
    from premoe.report import write_report

    written = write_report(results, out, force=force)
    files = sorted(str(p) for p in written.iterdir())
    if as_json:
        click.echo(json.dumps({"out": str(written), "files": files}, indent=1))
        return
    click.echo(f"wrote {written}/report.html (self-contained) and {written}/report.md with {len(files) - 2} plots")
