"""`premoe sweep`: scorers × keep ratios × domains, plans applied by masking, cached and resumable."""
from __future__ import annotations

import click

from premoe.cli.options import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, SEQ_LEN, FiniteFloat, ListOf,
                                json_option, model_input, split_names)


@click.command("sweep")
@click.argument("model")
@click.option("--profile", "profile", required=True, type=click.Path(), help="Profile directory of MODEL.")
@click.option("--out", required=True, type=click.Path(), help="Sweep directory (rows.jsonl cache, results.json).")
@click.option("--data", "data", multiple=True,
              help="Held-out text per domain, NAME=PATH (default for testbed: each domain's test split).")
@click.option("--calib-data", "calib_data", multiple=True,
              help="Calibration text for studies that re-profile (default: what --profile used).")
@click.option("--keep", default="0.75,0.5,0.375,0.25,0.125", show_default=True, type=ListOf(FRACTION, allow_empty=False),
              help="Keep ratios, each in (0, 1].")
@click.option("--scorers", default="peu_norm,peu,tcess,tcess_top1,frequency,router_mass,reap,reap_softmax,ean_sum,ean_mean,random",
              show_default=True,
              help="Scorers (must be in the profile).")
@click.option("--default-scorer", default="peu_norm", show_default=True,  # premoe.scores.DEFAULT_SCORER
              help="Scorer of the cross-domain, ranking and optional studies.")
@click.option("--cross-keep", default=0.25, show_default=True, type=FRACTION, help="Keep ratio of the cross-domain matrix.")
@click.option("--seq-len", default=256, show_default=True, type=SEQ_LEN, help="Tokens per evaluation window.")
@click.option("--max-windows", default=128, show_default=True, type=NON_NEGATIVE, help="Evaluation windows per domain (0: all).")
@click.option("--batch-size", default=8, show_default=True, type=POSITIVE, help="Windows per forward pass.")
@click.option("--no-kl", is_flag=True, help="Skip KL(full ‖ pruned).")
@click.option("--cache-gb", default=4.0, show_default=True, type=NON_NEGATIVE_FLOAT, help="Memory for cached full-model log-probs.")
@click.option("--study-keep", default="0.5,0.25", show_default=True, type=ListOf(FRACTION), help="Keep ratios of the optional studies.")
@click.option("--calib-tokens", default="", type=ListOf(POSITIVE), help="Calibration-size study: re-profile with these --max-tokens, "
                                                 "e.g. 1024,4096,16384.")
@click.option("--peu-grid", is_flag=True, help="PEU parameter study: candidates x threshold x transform.")
@click.option("--grid-candidates", default="1,2,4", show_default=True, type=ListOf(POSITIVE))
@click.option("--grid-thresholds", default="0,0.55", show_default=True, type=ListOf(FiniteFloat(min=0.0, max=1.0)))
@click.option("--grid-transforms", default="logit,prob,gate", show_default=True)
@click.option("--generate", default=0, show_default=True, type=NON_NEGATIVE,
              help="Query-only vs query+output study: tokens the model appends to each calibration window.")
@click.option("--dry-run", is_flag=True, help="Print the rows the sweep would compute and an ETA; compute nothing.")
@json_option("Write the summary as JSON to FILE ('-' or a bare --json: stdout instead of the text).")
@click.option("--force", is_flag=True, help="Replace the --json FILE if it exists and premoe wrote it.")
def command(model, profile, out, data, calib_data, keep, scorers, default_scorer, cross_keep, seq_len, max_windows,
            batch_size, no_kl, cache_gb, study_keep, calib_tokens, peu_grid, grid_candidates, grid_thresholds,
            grid_transforms, generate, dry_run, json_out, force) -> None:
    """Evaluate specialists, the generalist, the cross-domain matrix and local vs global ranking.

    Finished rows are cached in OUT/rows.jsonl: rerun the same command to resume.
    Render the results with `premoe report OUT --out REPORT_DIR`.

    \b
    premoe sweep testbed --profile prof/ --out sweep/
    premoe sweep testbed --profile prof/ --out sweep/ --calib-tokens 1024,4096,16384 --peu-grid --generate 64
    premoe sweep ckpt/ --profile prof/ --data code=test.jsonl --data chat=chat.jsonl --out sweep/
    """
    from pathlib import Path

    from premoe.data import data_paths
    from premoe.fileio import check_output, emit_json
    from premoe.sweep import SweepConfig, estimate_sweep, run_sweep

    for option, names, example in (("--scorers", scorers, "peu_norm"), ("--grid-transforms", grid_transforms, "logit")):
        if not split_names(names):  # "" or ",": every row of the option would silently vanish
            raise click.BadParameter(f"{names!r} lists no names; give at least one, e.g. {example}",
                                     param_hint=f"'{option}'")
    config = SweepConfig(
        keep=keep, scorers=split_names(scorers), default_scorer=default_scorer, cross_keep=cross_keep,
        seq_len=seq_len, max_windows=max_windows or None, batch_size=batch_size, kl=not no_kl, cache_gb=cache_gb,
        study_keep=study_keep, calib_tokens=calib_tokens, peu_grid=peu_grid,
        grid_candidates=grid_candidates, grid_thresholds=grid_thresholds,
        grid_transforms=split_names(grid_transforms), generate=generate,
    )
    inputs = [model_input(model), profile, *data_paths(data), *data_paths(calib_data), out]
    if json_out not in (None, "-"):
        check_output(json_out, inputs=inputs, force=force, kind="file")
    if dry_run:
        estimate = estimate_sweep(model, profile, out, config, eval_data=list(data))
        emit_json(json_out, estimate, kind="sweep-estimate", force=force, inputs=inputs)
        if json_out != "-":
            click.echo(_describe_estimate(estimate, out))
        return
    results = run_sweep(model, profile, out, config, eval_data=list(data), calib_data=list(calib_data),
                        progress=json_out != "-")
    errors = [r for r in results["rows"] if "error" in r]
    summary = {"out": str(out), "rows": len(results["rows"]), "computed": results["computed"],
               "cached": len(results["rows"]) - results["computed"], "errors": len(errors)}
    emit_json(json_out, summary, kind="sweep-summary", force=force, inputs=inputs)
    if json_out == "-":
        return
    click.echo(f"sweep {out}: {summary['rows']} rows ({summary['computed']} computed, {summary['cached']} cached)")
    for reason in sorted({r["error"] for r in errors}):
        click.echo(f"  skipped {sum(r['error'] == reason for r in errors)} rows: {reason}")
    click.echo(f"render with: premoe report {out} --out {Path(out) / 'report'}")


def _describe_estimate(estimate: dict, out) -> str:
    """The dry run as text: rows per study, how many are cached, and the time the rest should take."""
    lines = [f"sweep {out}: {estimate['rows']} rows, {estimate['cached']} cached, {estimate['todo']} to compute"]
    lines += [f"  {study:<12} {count:>5} rows" for study, count in estimate["studies"].items()]
    if estimate["profiles_to_collect"]:
        lines.append(f"  plus {len(estimate['profiles_to_collect'])} study profiles to collect "
                     f"({', '.join(estimate['profiles_to_collect'])}), not in the ETA")
    eta = estimate["eta_seconds"]
    lines.append(f"ETA about {_duration(eta)} ({estimate['seconds_per_row']:.2f} s/row, {estimate['eta_basis']})")
    if eta > 3600:
        lines.append("quicker: fewer --keep ratios or --scorers, or --max-windows 16 (noisier numbers)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
