"""`premoe plan`: choose the experts to keep, and show what that costs before anything is written."""
from __future__ import annotations

import click

from premoe.cli.options import FRACTION, POSITIVE, POSITIVE_FLOAT, json_option, split_names


@click.command("plan")
@click.argument("profile", type=click.Path())
@click.option("--keep", type=FRACTION, help="Fraction of routed experts kept per layer, e.g. 0.5.")
@click.option("--experts", type=POSITIVE, help="M, experts kept per layer.")
@click.option("--budget-gb", type=POSITIVE_FLOAT, help="Size budget in GB (1e9 bytes) for the .safetensors files compile writes (padding and headers counted): the largest M that fits, or an error saying the smallest that does.")
@click.option("--domain", multiple=True, help="Make a specialist for this profiled domain.")
@click.option("--generalist", is_flag=True, help="Make one generalist over --domains (default: all).")
@click.option("--domains", help="Comma-separated domains for --generalist.")
@click.option("--weighting", type=click.Choice(["tokens", "balanced"]), default="tokens", show_default=True,
              help="Generalist: every calibration token counts once (tokens) or every domain equally.")
@click.option("--scorer", default="peu_norm", show_default=True,  # premoe.scores.DEFAULT_SCORER; --help loads no torch
              help="Which profiled scorer ranks the experts.")
@click.option("--ranking", type=click.Choice(["local", "global"]), default="local", show_default=True,
              help="local: top M per layer; global: top L*M (layer, expert) pairs overall.")
@click.option("--select", "select", type=click.Choice(["top", "reconstruct"]), default="top", show_default=True,
              help="top: the scorer's top M; reconstruct: per layer, the M experts that best reproduce the layer's "
                   "output on calibration tokens (reloads the model and calibration text).")
@click.option("--sample-tokens", type=POSITIVE, default=2048, show_default=True,
              help="--select reconstruct: router inputs sampled per layer and domain.")
@click.option("--out", type=click.Path(), help="Plan JSON to write (omit with --dry-run).")
@click.option("--dry-run", "--explain", "dry_run", is_flag=True, help="Print the plan and sizes; write nothing.")
@click.option("--force", is_flag=True, help="Replace --out (and the --json FILE) if it exists and premoe wrote it.")
@json_option("Write the plan and its sizes as JSON to FILE ('-' or a bare --json: stdout instead of the text).")
def command(profile, keep, experts, budget_gb, domain, generalist, domains, weighting, scorer, ranking, select,
            sample_tokens, out, dry_run, force, json_out) -> None:
    """Turn PROFILE into a plan: which experts each MoE layer keeps.

    \b
    premoe plan prof/ --keep 0.5 --domain python --out python-50.json
    premoe plan prof/ --experts 8 --generalist --domains python,math --explain
    premoe plan prof/ --budget-gb 0.02 --generalist --ranking global --out g.json
    premoe plan prof/ --keep 0.25 --domain de --select reconstruct --out de-25.json
    """
    from premoe.errors import InputError
    from premoe.fileio import check_output, emit_json
    from premoe.plan import PlanRequest, explain, export_counts, make_plan
    from premoe.profile import Profile

    if len(domain) > 1:  # click would keep the last one silently: a specialist for a domain the user did not mean
        raise click.BadParameter(f"given {len(domain)} times ({', '.join(domain)}); a specialist serves one domain, "
                                 f"several make a generalist: --generalist --domains {','.join(domain)}",
                                 param_hint="'--domain'")
    domain = domain[0] if domain else None
    names = split_names(domains) if domains is not None else None
    if names == []:  # "" or ",": not "every domain", which is what leaving --domains out means
        raise click.BadParameter(f"{domains!r} lists no domains; give e.g. python,de or leave --domains out for all",
                                 param_hint="'--domains'")
    if bool(domain) == generalist:
        raise InputError("choose one target: --domain NAME (specialist) or --generalist [--domains a,b]")
    if not out and not dry_run:
        raise InputError("give --out PLAN.json, or --dry-run to only print the plan")
    if out and not dry_run:
        check_output(out, inputs=[profile], force=force, kind="file")
    loaded = Profile.load(profile)
    request = PlanRequest(keep=keep, experts=experts, budget_gb=budget_gb, domain=domain,
                          domains=names, weighting=weighting, scorer=scorer,
                          ranking=ranking, select=select, sample_tokens=sample_tokens)
    plan = make_plan(loaded, request, profile_path=str(profile))
    sizes = loaded.sizes()  # recorded at profile time: the model directory may have moved
    if json_out:
        counts = export_counts(plan.kept)  # what compile writes by default: padded to one count per layer
        emit_json(json_out, {**plan.__dict__, "size_before": sizes and sizes.total_bytes,
                             "size_after": sizes and sizes.bytes_with(counts),
                             "safetensors_bytes_at_most": sizes and sizes.file_bytes_with(counts)},
                  kind="plan-summary", force=force, inputs=[profile, out])
    if json_out != "-":
        click.echo(explain(plan, sizes))
    if not dry_run:
        plan.save(out, force=force)
        click.echo(f"wrote {out}", err=True)
