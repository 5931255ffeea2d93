"""`premoe compile`: write the pruned checkpoint by streaming surgery on the safetensors shards."""
from __future__ import annotations

import click

from premoe.cli.options import json_option, model_input


@click.command("compile")
@click.argument("model")
@click.argument("plan", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Directory of the compiled checkpoint.")
@click.option("--export", type=click.Choice(["auto", "padded", "compact"]), default="auto", show_default=True,
              help="Plans with different counts per layer: padded (vanilla-loadable, the auto choice) or compact "
                   "(real counts; load with premoe.compile.load_compact). A plan with one count in every layer is "
                   "written as it is, whatever the choice (the summary calls that export uniform).")
@click.option("--mtp", type=click.Choice(["drop", "prune"]), default="drop", show_default=True,
              help="Multi-token-prediction layers after the last decoder layer (DeepSeek-V3/R1, GLM-4.5): drop them "
                   "and set the config's count to 0, or keep them pruned to the last MoE layer's kept experts.")
@click.option("--base-model", metavar="REPO_ID",
              help="The source's Hugging Face Hub id, for the model card's base_model (default: the config's "
                   "_name_or_path when it is a Hub id).")
@click.option("--dry-run", "--explain", "dry_run", is_flag=True,
              help="Print what would be written (kept experts, MTP choice, sizes, disk needed); write nothing.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and premoe wrote it.")
@click.option("--threads", type=click.IntRange(1, 64), metavar="N",
              help="Threads copying bytes at once (default: the usable cores, at most 8).")
@json_option("Write the report as JSON to FILE ('-' or a bare --json: stdout instead of the summary).")
def command(model, plan, out, export, mtp, base_model, dry_run, force, threads, json_out) -> None:
    """Compile MODEL down to the experts PLAN keeps.

    \b
    premoe compile testbed python-50.json --out python-50/ --dry-run
    premoe compile testbed python-50.json --out python-50/
    premoe compile testbed global.json --out global/ --export compact
    premoe compile deepseek-v3/ plan.json --out ds-50/ --mtp prune --explain
    """
    from premoe.compile import compile_checkpoint
    from premoe.fileio import check_output, emit_json
    from premoe.plan import Plan

    check_output(out, inputs=[model_input(model), plan], force=force)  # never an input, only what premoe wrote
    if json_out not in (None, "-"):  # before the checkpoint is written, not after
        check_output(json_out, inputs=[model_input(model), plan, out], force=force, kind="file")
    report = compile_checkpoint(model, Plan.load(plan), out, force=force, export=export, mtp=mtp,
                                base_model=base_model, dry_run=dry_run, progress=json_out != "-",
                                threads=threads)
    emit_json(json_out, report.to_json(), kind="compile-report", force=force, inputs=[model_input(model), plan, out])
    if json_out != "-":
        click.echo(report.summary())
