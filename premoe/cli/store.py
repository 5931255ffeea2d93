"""`premoe store build|add|query`: pattern stores for task-adaptive expert retrieval."""
from __future__ import annotations

import click

from premoe.cli.options import FRACTION, NON_NEGATIVE_FLOAT, POSITIVE, json_option, model_input

_METHODS = ("centroid", "knn", "diagonal", "lda", "logistic")  # premoe.matchers.METHODS (no torch import for --help)
_FALLBACK = ("kn", "joint", "ngram", "nearest")  # premoe.novelty.METHODS


@click.group("store")
def command() -> None:
    """Build and query pattern stores (request patterns + per-layer expert rankings per domain).

    \b
    premoe store build testbed --profile prof/ --data testbed --held-out testbed --out store/
    premoe store add store/ --profile new-prof/ --data legal=legal-calib.jsonl
    premoe store query store/ "def main():" --tokens 64
    """


@command.command("build")
@click.argument("model")
@click.option("--profile", "profile_path", required=True, type=click.Path(), help="Profile of MODEL's domains.")
@click.option("--data", "data", multiple=True,
              help="Calibration text per profiled domain (NAME=PATH or testbed names; testbed: the calib split). "
                   "Default: the text the profile was made from.")
@click.option("--out", required=True, type=click.Path(), help="Store directory to write.")
@click.option("--held-out", "held_out", multiple=True,
              help="Held-out text per domain (testbed: the val split) to calibrate the fallback to the generalist. "
                   "Without it retrieval never falls back.")
@click.option("--scorer", default="peu_norm", show_default=True,  # premoe.scores.DEFAULT_SCORER
              help="Profiled scorer that ranks the experts kept.")
@click.option("--method", type=click.Choice(_METHODS), default="lda", show_default=True,
              help="How requests are matched (centroid = the paper's nearest layer-1 pattern).")
@click.option("--feature", default="router_input", show_default=True,
              help="Token feature at the first router: router_input, router_logits, router_mass or a scorer preset.")
@click.option("--pattern-layers", default=1, show_default=True, type=click.IntRange(1, 2),
              help="MoE layers the feature is read from (1 or 2).")
@click.option("--fallback-score", "fallback_score", type=click.Choice(_FALLBACK), default="joint", show_default=True,
              help="What decides a fallback to the generalist: kn = the request's lowest per-token NLL under the "
                   "domains' Kneser-Ney bigram models; joint = kn on that NLL plus the weighted pattern NLL (the "
                   "classifier's own score); ngram = the share of its bigrams never seen in any domain's "
                   "calibration text; nearest = the matcher's nearest-domain score.")
@click.option("--byte-weight", "byte_weight", default=1.0, show_default=True, type=NON_NEGATIVE_FLOAT,
              help="kn and joint: add this times the request's lowest mean NLL per byte under each domain's byte "
                   "5-gram model (spelling: languages and code the store never saw); 0 leaves the byte models out.")
@click.option("--token-models/--no-token-models", "token_models", default=True, show_default=True,
              help="Classify requests by their tokens' n-gram NLL under each domain as well as by their pattern; "
                   "--no-token-models: the matcher alone (needs --fallback-score ngram or nearest).")
@click.option("--quantile", default=0.96, show_default=True, type=FRACTION,
              help="Fallback threshold: this quantile of held-out in-domain scores (per request length).")
@click.option("--calib-tokens", default=32768, show_default=True, type=POSITIVE, help="Calibration tokens per domain.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and premoe wrote it.")
def build(model, profile_path, data, out, held_out, scorer, method, feature, pattern_layers, fallback_score,
          byte_weight, token_models, quantile, calib_tokens, force) -> None:
    """Store the patterns and rankings of every domain in --profile."""
    from premoe.data import data_paths
    from premoe.fileio import check_inputs, check_output
    from premoe.matchers import MatchParams
    from premoe.ngram import NgramParams
    from premoe.novelty import NoveltyParams
    from premoe.profile import Profile
    from premoe.store import PatternData, build_store

    check_output(out, inputs=[model_input(model), profile_path, *data_paths(data), *data_paths(held_out)], force=force)
    profile = Profile.load(profile_path)
    calib = list(data) or _profiled(profile)  # the profile's own text by default: an input like any --data
    check_inputs(out, data_paths(calib))
    store = build_store(model, profile, _sources(model, calib, "calib"),
                        _sources(model, held_out, "val"), scorer,
                        MatchParams(method=method, feature=feature, layers=pattern_layers, quantile=quantile),
                        PatternData(tokens=calib_tokens),
                        novelty=NoveltyParams(method=fallback_score, byte_weight=byte_weight),
                        ngram=NgramParams(use=token_models))
    store.save(out, force=force)
    _describe(store, out)


@command.command("add")
@click.argument("store_path", type=click.Path())
@click.option("--profile", "profile_path", required=True, type=click.Path(), help="Profile of the new domain(s).")
@click.option("--data", "data", multiple=True, required=True, help="Calibration text of the new domain(s).")
@click.option("--held-out", "held_out", multiple=True,
              help="Recalibrate the thresholds on this held-out text (name it after stored domains).")
def add(store_path, profile_path, data, held_out) -> None:
    """Add the domains of --profile to a store (rewritten in place, atomically)."""
    from premoe.adapters import get_adapter
    from premoe.data import data_paths
    from premoe.fileio import check_inputs
    from premoe.modeling import load_model, load_tokenizer, locate_model
    from premoe.patterns import PatternReader
    from premoe.profile import Profile
    from premoe.store import PatternData, Store, calibrate_store, calibration_ids, read_patterns

    check_inputs(store_path, [profile_path, *data_paths(data), *data_paths(held_out)])  # rewritten: no input inside
    store = Store.load(store_path)
    model = locate_model(store.model)
    net, tokenizer = load_model(model), load_tokenizer(model)
    params = store.matcher.params
    reader = PatternReader(net, get_adapter(net.config), params.feature, params.layers)
    amounts = PatternData(**store.calibration.get("amounts", {}))
    calib = _sources(model, data, "calib")
    patterns = read_patterns(reader, tokenizer, calib, params.lengths, amounts.tokens, amounts.batch_size)
    reads = [p.max_tokens for p in (store.detector and store.detector.params, store.lms and store.lms.params) if p]
    ids = calibration_ids(tokenizer, calib, max(reads)) if reads else None
    store.add_domain(Profile.load(profile_path), patterns, ids)
    if held_out:
        calibrate_store(store, reader, tokenizer, _sources(model, held_out, "val"), amounts)
    elif store.fallback_threshold(params.lengths[0]) is not None:
        click.echo("note: the fallback thresholds were kept; pass --held-out to recalibrate them with the new domain",
                   err=True)
    store.save(store_path, force=True)
    _describe(store, store_path)


@command.command("query")
@click.argument("store_path", type=click.Path())
@click.argument("text")
@click.option("--model", help="Checkpoint to run (default: the one the store was built from).")
@click.option("--tokens", type=POSITIVE, help="Use only the first N tokens of TEXT.")
@click.option("--mixed", type=click.Choice(["whole", "halves", "tail"]), default="whole", show_default=True,
              help="halves: fall back to the generalist when the two halves of TEXT retrieve different domains; "
                   "tail: match only the second half of TEXT.")
@json_option("Write the retrieval as JSON to FILE ('-' or a bare --json: stdout instead of the text).")
@click.option("--force", is_flag=True, help="Replace the --json FILE if it exists and premoe wrote it.")
def query(store_path, text, model, tokens, mixed, json_out, force) -> None:
    """Which stored domain TEXT retrieves, with its score for every domain (lower = nearer)."""
    from premoe.adapters import get_adapter
    from premoe.fileio import check_output, emit_json
    from premoe.modeling import load_model, load_tokenizer, locate_model
    from premoe.retrieval import Retriever
    from premoe.store import Store

    store = Store.load(store_path)
    if model is not None:
        _check_same_model(store, model)
    model = model or locate_model(store.model)
    if json_out not in (None, "-"):  # before the model loads, not after
        check_output(json_out, inputs=[store_path, model_input(model)], force=force, kind="file")
    net = load_model(model)
    retriever = Retriever(net, get_adapter(net.config), store, load_tokenizer(model), mixed=mixed)
    hit = retriever.retrieve(text, tokens)
    emit_json(json_out, hit.as_dict(), kind="retrieval", force=force, inputs=[store_path, model_input(model)])
    if json_out == "-":
        return
    what = {"kn": "n-gram NLL", "joint": "joint NLL", "ngram": "novelty"}.get(store.fallback_method,
                                                                              f"nearest {hit.nearest} scores")
    if store.detector is not None and store.detector.uses_bytes:
        what += " + byte NLL"
    if hit.mixed:
        verdict = "fallback to generalist (the halves of the request retrieve different domains)"
    elif hit.fallback:
        verdict = f"fallback to generalist ({what} {hit.fallback_score:.4g} > {hit.threshold:.4g}; nearest {hit.nearest})"
    elif hit.threshold is not None:
        verdict = f"{hit.domain} ({what} {hit.fallback_score:.4g} <= {hit.threshold:.4g})"
    else:
        verdict = hit.domain
    click.echo(f"{verdict}  [{hit.method} over {hit.tokens} tokens, {hit.seconds * 1000:.1f} ms]")
    for name, distance in sorted(hit.distances.items(), key=lambda kv: kv[1]):
        click.echo(f"  {name:<14} {distance:.6g}")


def _check_same_model(store, model: str) -> None:
    """--model must be the checkpoint the store was built from (moved, copied): patterns of another model mean nothing.

    A model of the same shape (another training run, a compiled checkpoint) would still run, and retrieve wrongly.
    """
    from premoe.errors import InputError
    from premoe.modeling import config_hash, read_config

    recorded, got = store.model.get("config_hash"), config_hash(read_config(model))
    if got != recorded:
        raise InputError(f"--model {model} (config {got}) is not the model the store was built from "
                         f"({store.model.get('name')}, config {recorded}); pass that checkpoint, or build a store "
                         "for this model with `premoe store build`")


def _profiled(profile) -> list[str]:
    """--data specs of the text each domain was profiled on (testbed:<domain>:<split> origins or paths)."""
    from premoe.errors import InputError

    specs = []
    for domain, origin in profile.data.items():
        if origin.startswith("testbed:"):
            _, name, split = origin.split(":")
            specs.append(f"{name}:{split}")
        elif origin:
            specs.append(f"{domain}={origin}")
        else:
            raise InputError(f"the profile does not record where domain {domain!r} came from; pass --data")
    return specs


def _sources(model: str, specs, split: str) -> list:
    from premoe.data import parse_sources
    from premoe.modeling import load_tokenizer

    return parse_sources(list(specs), tokenizer=load_tokenizer(model), split=split) if specs else []


def _bytes_part(store) -> str:
    detector = store.detector
    if detector is None or not detector.uses_bytes:
        return ""
    return f" + {detector.params.byte_weight:g} x byte {detector.params.byte_order}-gram NLL"


def _describe(store, path) -> None:
    params = store.matcher.params
    thresholds = ", ".join(f"{t}: {v:.4g}" for t, v in sorted(store.fallback_scorer.thresholds.items()))
    click.echo(f"store {path}: {store.model['name']}, domains {', '.join(store.domains)}; ranking scorer "
               f"{store.scorer}; matcher {params.method} on {params.feature} (layers {params.layers})"
               f"{' + token models' if store.lms is not None else ''}; "
               f"fallback score {store.fallback_method}{_bytes_part(store)}, thresholds by request tokens: "
               f"{thresholds or 'none (never falls back)'}")
