"""`premoe verify`: check a compiled checkpoint against the forced-routing original; exit 1 when it differs."""
from __future__ import annotations

import json
import sys

import click


@click.command("verify")
@click.argument("original")
@click.argument("compiled", type=click.Path())
@click.option("--data", "data", multiple=True,
              help="NAME=PATH (.txt, dir of .txt, .jsonl) or a testbed domain (test split); default for the testbed: "
                   "every testbed domain.")
@click.option("--max-tokens", default=2048, show_default=True, help="Tokens per data source.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per window.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per forward pass.")
@click.option("--tolerance", default=1e-4, show_default=True,
              help="Largest |logit difference| to the forced-routing original that passes (fp32).")
@click.option("--json", "json_out", type=click.Path(), help="Also write the report as JSON to this file ('-': stdout).")
@click.option("--card", is_flag=True, help="Record the results in the Quality section of COMPILED/README.md.")
def command(original, compiled, data, max_tokens, seq_len, batch_size, tolerance, json_out, card) -> None:
    """Load COMPILED with plain from_pretrained and compare it with ORIGINAL run on the kept experts only.

    \b
    premoe verify testbed python-50/
    premoe verify path/to/model compiled/ --data code=src.jsonl --max-tokens 4096 --json verify.json
    premoe verify testbed python-50/ --card        # the model card then shows the measured quality
    """
    from pathlib import Path

    from premoe.verify import verify

    report = verify(original, compiled, list(data) or None, max_tokens=max_tokens, seq_len=seq_len,
                    tolerance=tolerance, batch_size=batch_size, progress=json_out != "-")
    text = json.dumps(report.to_json(), indent=2)
    if json_out == "-":
        click.echo(text)
    else:
        click.echo(report.summary())
        if json_out:
            Path(json_out).write_text(text + "\n")
    if card:
        from premoe.modelcard import record_verification

        record_verification(compiled, report)
    if not report.passed:
        sys.exit(1)
