"""`premoe profile`: measure per-domain expert utility; `premoe profile show|merge` read profiles."""
from __future__ import annotations

import json

import click


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
@click.option("--max-tokens", default=32768, show_default=True, help="Calibration tokens per domain.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per window.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per forward pass.")
@click.option("--generate", default=0, show_default=True,
              help="Let the model continue each window by N tokens and profile prompt + its output.")
@click.option("--stream", is_flag=True, help="Load one decoder layer at a time (checkpoints larger than memory).")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="With --stream: where hidden states go when they outgrow memory (default: the temp dir).")
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda:0.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def run(model, data, out, scorers, max_tokens, seq_len, batch_size, generate, stream, workdir, device, force,
        as_json) -> None:
    """Profile MODEL on each --data domain and write a profile directory."""
    from pathlib import Path

    from premoe.data import parse_sources
    from premoe.errors import OutputExistsError
    from premoe.modeling import load_tokenizer
    from premoe.profile import Profile, ProfileParams, profile_model

    if Path(out).exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    sources = parse_sources(list(data), tokenizer=load_tokenizer(model))
    params = ProfileParams(max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, generate=generate,
                           device=device)
    names = scorers.split(",") if scorers else None
    if stream:
        from premoe.streaming import profile_streaming

        profile = profile_streaming(model, sources, names, params, workdir=workdir)
    else:
        profile = profile_model(model, sources, names, params)
    profile.save(out, force=force)
    saved = Profile.load(out)
    _print_summary(saved, out, as_json, _coverage_scorer(saved))


@command.command("show")
@click.argument("path", type=click.Path())
@click.option("--scorer", default=None, help="Scorer for the coverage counts (default: router_mass if profiled, else the first).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def show(path, scorer, as_json) -> None:
    """Summarise a profile: tokens, experts covering 90% of utility per layer, overlap between domains."""
    from premoe.profile import Profile

    profile = Profile.load(path)
    _print_summary(profile, path, as_json, scorer or _coverage_scorer(profile))


@command.command("merge")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path())
@click.option("--force", is_flag=True)
def merge(paths, out, force) -> None:
    """Merge profiles of the same model (domains in both are added token-weighted)."""
    from premoe.profile import Profile

    merged = Profile.load(paths[0])
    for path in paths[1:]:
        merged = merged.merge(Profile.load(path))
    merged.save(out, force=force)
    click.echo(f"merged {len(paths)} profiles into {out}: domains {', '.join(merged.domains)}")


def _coverage_scorer(profile) -> str:
    """router_mass (the routing mass itself) when it was profiled, else the first scorer."""
    return "router_mass" if "router_mass" in profile.scorers else next(iter(profile.scorers))


def _print_summary(profile, path, as_json: bool, scorer: str) -> None:
    from premoe.profile import summary

    info = summary(profile, scorer)
    if as_json:
        click.echo(json.dumps(info, indent=2))
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
