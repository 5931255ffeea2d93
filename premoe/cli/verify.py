"""`premoe verify`: check a compiled checkpoint against the forced-routing original; exit 1 when it differs."""
from __future__ import annotations

import sys

import click

from premoe.cli.options import POSITIVE, SEQ_LEN, FiniteFloat, json_option, model_input


@click.command("verify")
@click.argument("original")
@click.argument("compiled", type=click.Path())
@click.option("--data", "data", multiple=True,
              help="NAME=PATH (.txt, dir of .txt, .jsonl) or a testbed domain (test split); default for the testbed: "
                   "every testbed domain.")
@click.option("--max-tokens", default=2048, show_default=True, type=POSITIVE, help="Tokens per data source.")
@click.option("--seq-len", default=256, show_default=True, type=SEQ_LEN, help="Tokens per window.")
@click.option("--batch-size", default=8, show_default=True, type=POSITIVE, help="Windows per forward pass.")
@click.option("--tolerance", default=1e-4, show_default=True, type=FiniteFloat(),
              help="Largest |logit difference| to the forced-routing original that passes (fp32).")
@click.option("--stream", is_flag=True,
              help="Load one decoder layer of each model at a time (checkpoints larger than memory).")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="With --stream: where hidden states go when they outgrow memory (default: the temp dir).")
@json_option("Also write the report as JSON to FILE ('-' or a bare --json: stdout instead of the summary).")
@click.option("--force", is_flag=True, help="Replace the --json FILE if it exists and premoe wrote it.")
@click.option("--card", is_flag=True, help="Record the results in the Quality section of COMPILED/README.md.")
def command(original, compiled, data, max_tokens, seq_len, batch_size, tolerance, stream, workdir, json_out, force,
            card) -> None:
    """Load COMPILED with plain from_pretrained and compare it with ORIGINAL run on the kept experts only.

    \b
    premoe verify testbed python-50/
    premoe verify path/to/model compiled/ --data code=src.jsonl --max-tokens 4096 --json verify.json
    premoe verify testbed python-50/ --card        # the model card then shows the measured quality
    premoe verify big-moe/ pruned/ --data code=src.jsonl --stream   # one layer of each model in memory at a time
    """
    from premoe.data import data_paths
    from premoe.fileio import check_output, emit_json
    from premoe.verify import verify

    inputs = [model_input(original), compiled, *data_paths(data)]
    if json_out not in (None, "-"):
        check_output(json_out, inputs=inputs, force=force, kind="file")  # before the work, not after
    if card:
        from premoe.modelcard import check_card

        check_card(compiled)

    report = verify(original, compiled, list(data) or None, max_tokens=max_tokens, seq_len=seq_len,
                    tolerance=tolerance, batch_size=batch_size, progress=json_out != "-", stream=stream,
                    workdir=workdir)
    if json_out != "-":
        click.echo(report.summary())
    emit_json(json_out, report.to_json(), kind="verify", force=force, inputs=inputs)
    if card:
        from premoe.modelcard import record_verification

        record_verification(compiled, report)
    if not report.passed:
        sys.exit(1)
