"""`premoe sweep`: scorers × keep ratios × domains, plans applied by masking, cached and resumable."""
from __future__ import annotations

import json

import click


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    """Comma-separated names; commas inside parentheses belong to a scorer spec like peu(a=1,b=2)."""
    names, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            names.append(current.strip())
            current = ""
        else:
            current += ch
    return [n for n in [*names, current.strip()] if n]


@click.command("sweep")
@click.argument("model")
@click.option("--profile", "profile", required=True, type=click.Path(), help="Profile directory of MODEL.")
@click.option("--out", required=True, type=click.Path(), help="Sweep directory (rows.jsonl cache, results.json).")
@click.option("--data", "data", multiple=True,
              help="Held-out text per domain, NAME=PATH (default for testbed: each domain's test split).")
@click.option("--calib-data", "calib_data", multiple=True,
              help="Calibration text for studies that re-profile (default: what --profile used).")
@click.option("--keep", default="0.75,0.5,0.375,0.25,0.125", show_default=True, help="Keep ratios.")
@click.option("--scorers", default="peu,tcess,tcess_top1,frequency,router_mass,reap,reap_softmax,ean_sum,ean_mean,random",
              show_default=True,
              help="Scorers (must be in the profile).")
@click.option("--default-scorer", default="peu", show_default=True,
              help="Scorer of the cross-domain, ranking and optional studies.")
@click.option("--cross-keep", default=0.25, show_default=True, help="Keep ratio of the cross-domain matrix.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per evaluation window.")
@click.option("--max-windows", default=128, show_default=True, help="Evaluation windows per domain (0: all).")
@click.option("--batch-size", default=8, show_default=True, help="Windows per forward pass.")
@click.option("--no-kl", is_flag=True, help="Skip KL(full ‖ pruned).")
@click.option("--cache-gb", default=4.0, show_default=True, help="Memory for cached full-model log-probs.")
@click.option("--study-keep", default="0.5,0.25", show_default=True, help="Keep ratios of the optional studies.")
@click.option("--calib-tokens", default="", help="Calibration-size study: re-profile with these --max-tokens, "
                                                 "e.g. 1024,4096,16384.")
@click.option("--peu-grid", is_flag=True, help="PEU parameter study: candidates x threshold x transform.")
@click.option("--grid-candidates", default="1,2,4", show_default=True)
@click.option("--grid-thresholds", default="0,0.55", show_default=True)
@click.option("--grid-transforms", default="logit,prob,gate", show_default=True)
@click.option("--generate", default=0, show_default=True,
              help="Query-only vs query+output study: tokens the model appends to each calibration window.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def command(model, profile, out, data, calib_data, keep, scorers, default_scorer, cross_keep, seq_len, max_windows,
            batch_size, no_kl, cache_gb, study_keep, calib_tokens, peu_grid, grid_candidates, grid_thresholds,
            grid_transforms, generate, as_json) -> None:
    """Evaluate specialists, the generalist, the cross-domain matrix and local vs global ranking.

    Finished rows are cached in OUT/rows.jsonl: rerun the same command to resume.
    Render the results with `premoe report OUT --out REPORT_DIR`.

    \b
    premoe sweep testbed --profile prof/ --out sweep/
    premoe sweep testbed --profile prof/ --out sweep/ --calib-tokens 1024,4096,16384 --peu-grid --generate 64
    premoe sweep ckpt/ --profile prof/ --data code=test.jsonl --data chat=chat.jsonl --out sweep/
    """
    from premoe.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        keep=_floats(keep), scorers=_names(scorers), default_scorer=default_scorer, cross_keep=cross_keep,
        seq_len=seq_len, max_windows=max_windows or None, batch_size=batch_size, kl=not no_kl, cache_gb=cache_gb,
        study_keep=_floats(study_keep), calib_tokens=_ints(calib_tokens), peu_grid=peu_grid,
        grid_candidates=_ints(grid_candidates), grid_thresholds=_floats(grid_thresholds),
        grid_transforms=_names(grid_transforms), generate=generate,
    )
    results = run_sweep(model, profile, out, config, eval_data=list(data), calib_data=list(calib_data),
                        progress=not as_json)
    errors = [r for r in results["rows"] if "error" in r]
    summary = {"out": str(out), "rows": len(results["rows"]), "computed": results["computed"],
               "cached": len(results["rows"]) - results["computed"], "errors": len(errors)}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(f"sweep {out}: {summary['rows']} rows ({summary['computed']} computed, {summary['cached']} cached)")
    for reason in sorted({r["error"] for r in errors}):
        click.echo(f"  skipped {sum(r['error'] == reason for r in errors)} rows: {reason}")
    click.echo(f"render with: premoe report {out} --out {out}/report")
