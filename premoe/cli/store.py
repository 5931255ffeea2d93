"""`premoe store build|add|query`: pattern stores for task-adaptive expert retrieval."""
from __future__ import annotations

import click

from premoe.cli.options import FRACTION, POSITIVE, POSITIVE_FLOAT, json_option, model_input


@click.group("store")
def command() -> None:
    """Build and query pattern stores (layer-1 patterns + per-layer expert rankings per domain).

    \b
    premoe store build MODEL --profile prof/ --out store/ --held-out testbed
    premoe store add store/ --profile new-domain-prof/
    premoe store query store/ "def main():" --tokens 64
    """


@command.command("build")
@click.argument("model")
@click.option("--profile", "profile_path", required=True, type=click.Path(), help="Profile of MODEL's domains.")
@click.option("--out", required=True, type=click.Path(), help="Store directory to write.")
@click.option("--scorer", default="router_mass", show_default=True,
              help="Profiled scorer the patterns and rankings come from (dense patterns retrieve best).")
@click.option("--held-out", "held_out", multiple=True,
              help="Held-out text per domain (NAME=PATH or testbed names; testbed defaults to the val split) "
                   "to calibrate the fallback threshold. Without it retrieval never falls back.")
@click.option("--calib-tokens", default=64, show_default=True, type=POSITIVE, help="Request length the threshold is set for.")
@click.option("--quantile", default=0.99, show_default=True, type=FRACTION, help="Quantile of held-out distances to their domain.")
@click.option("--margin", default=1.25, show_default=True, type=POSITIVE_FLOAT, help="Threshold = quantile x margin.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and premoe wrote it.")
def build(model, profile_path, out, scorer, held_out, calib_tokens, quantile, margin, force) -> None:
    """Store the patterns of every domain in --profile."""
    from premoe.data import data_paths
    from premoe.fileio import check_output
    from premoe.profile import Profile
    from premoe.store import CalibrationParams, build_store

    check_output(out, inputs=[model_input(model), profile_path, *data_paths(held_out)], force=force)
    params = CalibrationParams(tokens=calib_tokens, quantile=quantile, margin=margin)
    sources = _held_out(model, held_out, params)
    store = build_store(model, Profile.load(profile_path), scorer, sources, params)
    store.save(out, force=force)
    _describe(store, out)


@command.command("add")
@click.argument("store_path", type=click.Path())
@click.option("--profile", "profile_path", required=True, type=click.Path(), help="Profile of the new domain(s).")
@click.option("--held-out", "held_out", multiple=True,
              help="Recalibrate the threshold on this held-out text (name it after stored domains).")
def add(store_path, profile_path, held_out) -> None:
    """Add the domains of --profile to a store (rewritten in place, atomically)."""
    from premoe.data import data_paths
    from premoe.fileio import check_inputs
    from premoe.profile import Profile
    from premoe.store import CalibrationParams, Store, calibrate_threshold

    check_inputs(store_path, [profile_path, *data_paths(held_out)])  # the store is rewritten: no input inside it
    store = Store.load(store_path).add_domain(Profile.load(profile_path))
    if held_out:
        model = store.model["path"]
        fields = CalibrationParams.__dataclass_fields__
        params = CalibrationParams(**{k: v for k, v in store.calibration.items() if k in fields})
        calibrate_threshold(store, model, _held_out(model, held_out, params), params)
    elif store.threshold:
        click.echo("note: the fallback threshold was kept; pass --held-out to recalibrate it with the new domain",
                   err=True)
    store.save(store_path, force=True)
    _describe(store, store_path)


@command.command("query")
@click.argument("store_path", type=click.Path())
@click.argument("text")
@click.option("--model", help="Checkpoint to run (default: the one the store was built from).")
@click.option("--tokens", type=POSITIVE, help="Use only the first N tokens of TEXT.")
@click.option("--metric", type=click.Choice(["l2", "cosine"]), default="l2", show_default=True)
@json_option("Write the retrieval as JSON to FILE ('-' or a bare --json: stdout instead of the text).")
@click.option("--force", is_flag=True, help="Replace the --json FILE if it exists and premoe wrote it.")
def query(store_path, text, model, tokens, metric, json_out, force) -> None:
    """Which stored domain TEXT retrieves, with its distance to every domain."""
    from premoe.adapters import get_adapter
    from premoe.fileio import emit_json
    from premoe.modeling import load_model, load_tokenizer
    from premoe.retrieval import Retriever
    from premoe.store import Store

    store = Store.load(store_path)
    model = model or store.model["path"]
    net = load_model(model)
    hit = Retriever(net, get_adapter(net.config), store, load_tokenizer(model), metric=metric).retrieve(text, tokens)
    emit_json(json_out, hit.as_dict(), kind="retrieval", force=force, inputs=[store_path, model_input(model)])
    if json_out == "-":
        return
    threshold = store.threshold.get(metric)
    verdict = (f"fallback to generalist (nearest {hit.nearest} is beyond {threshold:.4g})" if hit.fallback
               else hit.domain)
    click.echo(f"{verdict}  [{metric} over {hit.tokens} tokens, {hit.seconds * 1000:.1f} ms]")
    for name, distance in sorted(hit.distances.items(), key=lambda kv: kv[1]):
        click.echo(f"  {name:<14} {distance:.6g}")


def _held_out(model: str, specs, params) -> list:
    from premoe.data import parse_sources
    from premoe.modeling import load_tokenizer

    if not specs:
        return []
    return parse_sources(list(specs), tokenizer=load_tokenizer(model), split="val",
                         max_tokens=params.tokens * params.windows)  # what calibration reads, no more


def _describe(store, path) -> None:
    threshold = ", ".join(f"{m} {v:.4g}" for m, v in store.threshold.items()) or "none (never falls back)"
    click.echo(f"store {path}: {store.model['name']}, scorer {store.scorer}, domains {', '.join(store.domains)}; "
               f"fallback threshold: {threshold}")
