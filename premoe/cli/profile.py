"""`premoe profile`: measure per-domain expert utility; `premoe profile show|merge` read profiles."""
from __future__ import annotations

import click

from premoe.cli.options import NON_NEGATIVE, POSITIVE, SEQ_LEN, Device, json_option, model_input, split_names


class _ProfileGroup(click.Group):
    """`premoe profile MODEL ...` runs profiling; `show` and `merge` are subcommands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("profile", cls=_ProfileGroup, invoke_without_command=False)
def command() -> None:
    """Measure which experts each domain uses, from the router logits.

    \b
    premoe profile MODEL --data NAME=PATH [--data ...] --out DIR
    premoe profile show DIR
    premoe profile merge DIR1 DIR2 --out DIR
    """


@command.command("run")
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True,
              help="NAME=PATH (.txt, dir of .txt, .jsonl with text/messages), or a testbed domain / 'testbed'.")
@click.option("--out", required=True, type=click.Path(), help="Profile directory to write.")
@click.option("--scorers", default=None, help="Comma-separated scorers (default: all presets).")
@click.option("--max-tokens", default=32768, show_default=True, type=POSITIVE,
              help="Calibration tokens per domain (reading stops there too).")
@click.option("--seq-len", default=256, show_default=True, type=SEQ_LEN, help="Tokens per window.")
@click.option("--batch-size", default=8, show_default=True, type=POSITIVE, help="Windows per forward pass.")
@click.option("--generate", default=0, show_default=True, type=NON_NEGATIVE,
              help="Let the model continue each window by N tokens and profile prompt + its output (N < --seq-len).")
@click.option("--stream", is_flag=True, help="Load one decoder layer at a time (checkpoints larger than memory).")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="With --stream: where hidden states go when they outgrow memory (default: the temp dir).")
@click.option("--device", default="cpu", show_default=True, type=Device(), help="Torch device: cpu, cuda, cuda:N, mps.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and premoe wrote it.")
@json_option("Write the summary as JSON to FILE ('-' or a bare --json: stdout instead of the table).")
def run(model, data, out, scorers, max_tokens, seq_len, batch_size, generate, stream, workdir, device, force,
        json_out) -> None:
    """Profile MODEL on each --data domain and write a profile directory."""
    from premoe.data import data_paths, parse_sources
    from premoe.fileio import check_output
    from premoe.modeling import load_tokenizer
    from premoe.profile import Profile, ProfileParams, profile_model

    if generate >= seq_len:
        raise click.BadParameter(f"{generate} must be below --seq-len ({seq_len}): the window holds the text too",
                                 param_hint="'--generate'")
    inputs = [model_input(model), *data_paths(data), workdir]
    check_output(out, inputs=inputs, force=force)
    if json_out not in (None, "-"):
        check_output(json_out, inputs=[*inputs, out], force=force, kind="file")
    sources = parse_sources(list(data), tokenizer=load_tokenizer(model), max_tokens=max_tokens)
    params = ProfileParams(max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, generate=generate,
                           device=device)
    names = split_names(scorers) if scorers else None
    if stream:
        from premoe.streaming import profile_streaming

        profile = profile_streaming(model, sources, names, params, workdir=workdir)
    else:
        profile = profile_model(model, sources, names, params)
    profile.save(out, force=force)
    saved = Profile.load(out)
    _print_summary(saved, out, json_out, _coverage_scorer(saved), force)


@command.command("show")
@click.argument("path", type=click.Path())
@click.option("--scorer", default=None, help="Scorer for the coverage counts (default: router_mass if profiled, else the first).")
@json_option()
@click.option("--force", is_flag=True, help="Replace the --json FILE if it exists and premoe wrote it.")
def show(path, scorer, json_out, force) -> None:
    """Summarise a profile: tokens, experts covering 90% of utility per layer, overlap between domains."""
    from premoe.profile import Profile

    profile = Profile.load(path)
    _print_summary(profile, path, json_out, scorer or _coverage_scorer(profile), force, inputs=[path])


@command.command("merge")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Profile directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and premoe wrote it.")
def merge(paths, out, force) -> None:
    """Merge profiles of the same model (domains in both are added token-weighted)."""
    from pathlib import Path

    from premoe.errors import InputError
    from premoe.fileio import check_output
    from premoe.profile import Profile

    check_output(out, inputs=paths, force=force)
    seen: dict[Path, str] = {}
    for path in paths:  # the same profile twice would count its tokens twice
        key = Path(path).resolve()
        if key in seen:
            raise InputError(f"profile {path} is given twice (also as {seen[key]}); list each profile once")
        seen[key] = path
    merged = Profile.load(paths[0])
    for path in paths[1:]:
        merged = merged.merge(Profile.load(path))
    merged.save(out, force=force)
    click.echo(f"merged {len(paths)} profiles into {out}: domains {', '.join(merged.domains)}")


def _coverage_scorer(profile) -> str:
    """router_mass (the routing mass itself) when it was profiled, else the first scorer."""
    return "router_mass" if "router_mass" in profile.scorers else next(iter(profile.scorers))


def _print_summary(profile, path, json_out: str | None, scorer: str, force: bool, inputs=()) -> None:
    from premoe.fileio import emit_json
    from premoe.profile import summary

    info = summary(profile, scorer)
    emit_json(json_out, info, kind="profile-summary", force=force, inputs=inputs)
    if json_out == "-":
        return
    click.echo(f"profile {path}: {profile.model['name']} ({profile.family}), {len(profile.moe_layers)} MoE layers x "
               f"{profile.num_experts} experts, top-{profile.top_k}; scorers: {', '.join(profile.scorers)}")
    click.echo(f"experts covering 90% of {scorer} utility, per MoE layer:")
    for name, row in info["domains"].items():
        click.echo(f"  {name:<12} {row['tokens']:>8} tokens  {' '.join(f'{c:>3}' for c in row['coverage90'])}")
    click.echo(f"overlap of top-{info['overlap_m']} experts between domains (mean Jaccard over layers):")
    names = list(info["domains"])
    click.echo("  " + " " * 12 + "".join(f"{n[:8]:>9}" for n in names))
    for a in names:
        click.echo(f"  {a:<12}" + "".join(f"{info['overlap'][a][b]:>9.2f}" for b in names))
