"""`premoe report`: render a sweep's results as HTML (self-contained) and Markdown with PNG plots."""
from __future__ import annotations

import click

from premoe.cli.options import json_option


@click.command("report")
@click.argument("results", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Directory for report.html, report.md and the plots.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and premoe wrote it.")
@json_option("Write the list of written files as JSON to FILE ('-' or a bare --json: stdout).")
def command(results, out, force, json_out) -> None:
    """Render RESULTS (a `premoe sweep` directory or its results.json) as a report.

    \b
    premoe report sweep/ --out sweep/report
    """
    from premoe.fileio import check_output, emit_json
    from premoe.report import write_report

    if json_out not in (None, "-"):  # before the report is written, not after
        check_output(json_out, inputs=[results, out], force=force, kind="file")
    written = write_report(results, out, force=force)
    files = sorted(str(p) for p in written.iterdir() if not p.name.startswith("."))
    emit_json(json_out, {"out": str(written), "files": files}, kind="report-files", force=force,
              inputs=[results, out])
    if json_out == "-":
        return
    click.echo(f"wrote {written}/report.html (self-contained) and {written}/report.md with {len(files) - 2} plots")
