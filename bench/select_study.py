"""Selection study for docs/selection.md: scorers vs reconstruction-guided selection, on val then test.

Profiles the testbed's calibration split once (every scorer below, plus a
sample of each MoE layer's router inputs for the reconstruction search), then
evaluates specialists (plan for d, evaluated on d) at 50% and 25% kept, and the
50% generalist, with the plan applied by masking the router (as the compiled
checkpoint routes). Every evaluation is cached in ``OUT/evals.jsonl``, so a
rerun skips what is done.

Run (OMP_NUM_THREADS=1; val first, choose on val, then test; ``--model testbed-dsv3`` for the
DeepSeek-V3-router testbed, which adds the candidate-rule question: ``peu_norm_routed``/``_biased``)::

    python bench/select_study.py --split val --windows 32
    python bench/select_study.py --split test --windows 48 --methods peu,tcess,tcess_top1,reap,reconstruct
    python bench/select_study.py --split test --windows 48 --generalist --methods peu,reap,reconstruct

It prints, per keep ratio and method, the mean over domains of the NLL increase
over the full model (± paired SE), the mean Δ% perplexity, each domain's Δ%,
and the difference to official REAP (± paired SE, domains won).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from premoe.adapters import get_adapter
from premoe.capture import HiddenRecorder
from premoe.data import parse_sources
from premoe.evaluate import Evaluator
from premoe.modeling import load_model, load_tokenizer
from premoe.plan import PlanRequest, make_plan
from premoe.profile import Profile, ProfileParams, profile_model
from premoe.select import layer_sample, reconstruction_utility, refine, routing_of

DOMAINS = ["python", "en_docs", "de", "fr", "bible", "math"]
SCORERS = {  # method name -> profiled scorer
    "peu": "peu", "tcess": "tcess", "tcess_top1": "tcess_top1", "reap": "reap",
    "peu_gate_norm": "peu(candidates=2,threshold=0.55,transform=gate_norm)",
    "all_gate_norm": "peu(candidates=4,threshold=0.0,transform=gate_norm)",
    # PEU's candidate rule on biased, grouped (DeepSeek-V3) routers: the authors' raw logits, what the router
    # really chose, or the biased choice scores (scores.py); identical on routers without a bias
    "peu_norm_routed": "peu(candidates=2,threshold=0.55,transform=gate_norm,candidates_from=routed)",
    "peu_norm_biased": "peu(candidates=2,threshold=0.55,transform=gate_norm,candidates_from=biased)",
    "peu_routed": "peu(candidates=2,threshold=0.55,transform=gate,candidates_from=routed)",
    "peu_biased": "peu(candidates=2,threshold=0.55,transform=gate,candidates_from=biased)",
}
RECONSTRUCT = "reconstruct"  # greedy backward elimination: the first M of its order
REFINED = "reconstruct_swap"  # the same, then single swaps at the target M


def profile_with_hidden(model: str, net, tok, out: Path, tokens: int, sample: int,
                        generate: int = 0) -> tuple[Profile, dict, float, float]:
    """The calibration profile, each domain's hidden sample, and the seconds spent on each (cached in ``out``)."""
    if (out / "prof" / "profile.json").exists():
        saved = torch.load(out / "hidden.pt")
        return Profile.load(out / "prof"), saved["hidden"], saved["profile_s"], saved["forward_s"]
    adapter = get_adapter(net.config)
    params = ProfileParams(max_tokens=tokens, generate=generate)
    merged, hidden, started = None, {}, time.time()
    for domain in DOMAINS:
        with HiddenRecorder(net, adapter, tokens=sample, stride=max(1, tokens // sample)) as rec:
            one = profile_model(model, parse_sources([f"{domain}:calib"]), list(SCORERS.values()), params,
                                progress=False, loaded=(net, tok))
        hidden[domain] = rec.hidden
        merged = one if merged is None else merged.merge(one)
    profile_s = time.time() - started
    forward_s = _forward_seconds(net, tok, tokens)
    merged.save(out / "prof", force=True)
    torch.save({"hidden": hidden, "profile_s": profile_s, "forward_s": forward_s}, out / "hidden.pt")
    return merged, hidden, profile_s, forward_s


def _forward_seconds(net, tok, tokens: int) -> float:
    """Seconds of plain forward passes over the same calibration tokens (the cost unit)."""
    from premoe.data import token_windows

    started = time.time()
    with torch.no_grad():
        for domain in DOMAINS:
            windows = token_windows(parse_sources([f"{domain}:calib"])[0].texts, tok, 256, tokens)
            for start in range(0, windows.shape[0], 8):
                net(input_ids=windows[start : start + 8], use_cache=False)
    return time.time() - started


def reconstruction_utilities(net, hidden: dict, out: Path, pooled_tokens: int) -> tuple[dict, float]:
    """Per domain (and pooled: ``__all__``) the (layers, experts) reconstruction utility, and seconds spent."""
    path = out / "reconstruct.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["utility"], saved["seconds"]
    adapter = get_adapter(net.config)
    started, utility = time.time(), {}
    for domain in DOMAINS:
        utility[domain] = reconstruction_utility(net, adapter, hidden[domain])
    seconds = {"specialist_per_domain": (time.time() - started) / len(DOMAINS)}
    started = time.time()
    per = pooled_tokens // len(DOMAINS)
    pooled = {l: torch.cat([hidden[d][l][:per] for d in DOMAINS]) for l in hidden[DOMAINS[0]]}
    utility["__all__"] = reconstruction_utility(net, adapter, pooled)
    seconds["generalist"] = time.time() - started
    torch.save({"utility": utility, "seconds": seconds}, path)
    return utility, seconds


def kept_for(method: str, keep: float, target: str, profile: Profile, recon: dict, samples) -> dict[int, list[int]]:
    """The plan's kept experts per layer for a method (a profiled scorer, or the reconstruction search)."""
    domain = None if target == "__all__" else target
    if method in SCORERS:
        plan = make_plan(profile, PlanRequest(keep=keep, domain=domain, scorer=SCORERS[method]))
        return plan.kept
    m = round(keep * profile.num_experts)
    kept = {l: sorted(row.topk(m).indices.tolist()) for l, row in zip(profile.moe_layers, recon[target])}
    if method == REFINED:
        kept = {l: refine(samples(target, l)[0], kept[l], samples(target, l)[1], rounds=2) for l in kept}
    return kept


def sample_source(net, hidden: dict, pooled_tokens: int):
    """``samples(target, layer) -> (LayerSample, Routing)``, computed once per (target, layer)."""
    adapter = get_adapter(net.config)
    layers = {l.index: l for l in adapter.moe_layers(net)}
    made = {}

    def samples(target: str, layer: int):
        if (target, layer) not in made:
            if target == "__all__":
                per = pooled_tokens // len(DOMAINS)
                x = torch.cat([hidden[d][layer][:per] for d in DOMAINS])
            else:
                x = hidden[target][layer]
            made.clear()  # one (tokens, experts, hidden) tensor at a time
            made[(target, layer)] = (layer_sample(adapter, layers[layer], x),
                                     routing_of(adapter, net.config, layers[layer]))
        return made[(target, layer)]

    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed", help="testbed or testbed-dsv3 (the shipped trained models)")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--keep", default="0.5,0.25")
    ap.add_argument("--methods", default=",".join([*SCORERS, RECONSTRUCT, REFINED]))
    ap.add_argument("--generalist", action="store_true", help="Also the 50%% generalist of each method.")
    ap.add_argument("--tokens", type=int, default=8192, help="Calibration tokens per domain.")
    ap.add_argument("--sample", type=int, default=2048, help="Hidden states kept per layer and domain.")
    ap.add_argument("--generation", type=int, default=0,
                    help="Instead of perplexity: greedy answers to N held-out math problems (exact match, repetition) "
                         "for the full model and each method's math specialist and generalist at --keep.")
    ap.add_argument("--generate", type=int, default=0,
                    help="Profile each calibration window plus N tokens the model writes after it (premoe profile "
                         "--generate); use its own --out.")
    ap.add_argument("--out", help="cache directory (default runs/select, or runs/select-<model>)")
    args = ap.parse_args()
    out = Path(args.out or ("runs/select" if args.model == "testbed" else f"runs/select-{args.model}"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net, tok = load_model(args.model), load_tokenizer(args.model)
    profile, hidden, profile_s, forward_s = profile_with_hidden(args.model, net, tok, out, args.tokens, args.sample,
                                                                args.generate)
    recon, recon_s, samples = {}, {}, None
    if {RECONSTRUCT, REFINED} & set(args.methods.split(",")):  # the search costs ≈ 9 forward passes: only if asked
        recon, recon_s = reconstruction_utilities(net, hidden, out, 4096)
        samples = sample_source(net, hidden, 4096)
    costs = {"profile_s": profile_s, "forward_s": forward_s, "reconstruct_s": recon_s}
    print(json.dumps(costs))
    if args.generation:
        return generation_study(net, tok, profile, recon, samples, args, out)
    evaluator = Evaluator(net, tok, parse_sources([f"{d}:{args.split}" for d in DOMAINS]), max_windows=args.windows)
    cache_path = out / "evals.jsonl"
    cache = {}
    if cache_path.exists():
        for line in cache_path.read_text().splitlines():
            record = json.loads(line)
            cache[record["key"]] = record
    keeps = [float(k) for k in args.keep.split(",")]
    methods = args.methods.split(",")
    jobs = [("full", 1.0, d, d) for d in DOMAINS]
    jobs += [(m, k, d, d) for k in keeps for d in DOMAINS for m in methods]
    if args.generalist:
        jobs += [(m, 0.5, "__all__", d) for m in methods for d in DOMAINS]
    with open(cache_path, "a") as sink:
        for method, keep, target, domain in jobs:
            key = f"{args.split}/{args.windows}/{method}/{keep}/{target}/{domain}"
            if key in cache:
                continue
            kept = None if method == "full" else kept_for(method, keep, target, profile, recon, samples)
            result = evaluator.evaluate(kept, domains=[domain], kl=False).domains[domain]
            record = {"key": key, "window_nll": result.window_nll}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            cache[key] = record
            print(key, round(result.ppl, 3), flush=True)
    summary = summarise(cache, args.split, args.windows, keeps, methods, args.generalist)
    summary["costs"] = costs
    (out / f"summary-{args.split}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(render(summary))


def generation_study(net, tok, profile: Profile, recon: dict, samples, args, out: Path) -> None:
    """Exact match and repetition of greedy answers on held-out math: full, specialists, generalists."""
    from premoe.generation import generation_metrics, math_problems

    problems = math_problems(parse_sources([f"math:{args.split}"])[0].texts, args.generation)
    rows = {"full": generation_metrics(net, tok, problems)}
    for keep in (float(k) for k in args.keep.split(",")):
        for method in args.methods.split(","):
            for target in ("math", "__all__"):
                kept = kept_for(method, keep, target, profile, recon, samples)
                label = f"{method}/{keep}/{'specialist' if target == 'math' else 'generalist'}"
                rows[label] = generation_metrics(net, tok, problems, kept=kept)
                print(label, rows[label], flush=True)
    name = f"generation-{args.split}-{args.methods.replace(',', '-')}.json"
    (out / name).write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


def _nll(cache: dict, split: str, windows: int, method: str, keep: float, target: str, domain: str) -> torch.Tensor:
    return torch.tensor(cache[f"{split}/{windows}/{method}/{keep}/{target}/{domain}"]["window_nll"],
                        dtype=torch.float64)


def _paired(diff: torch.Tensor) -> tuple[float, float]:
    return float(diff.mean()), float(diff.std(unbiased=True) / math.sqrt(len(diff)))


def summarise(cache: dict, split: str, windows: int, keeps: list[float], methods: list[str],
              generalist: bool) -> dict:
    """Per (keep, target kind, method): per-domain Δ% and ΔNLL vs full, and the paired difference to reap."""
    rows = []
    settings = [(k, "specialist") for k in keeps] + ([(0.5, "generalist")] if generalist else [])
    for keep, kind in settings:
        for method in methods:
            per, vs_reap = {}, {}
            for d in DOMAINS:
                target = d if kind == "specialist" else "__all__"
                full = _nll(cache, split, windows, "full", 1.0, d, d)
                mine = _nll(cache, split, windows, method, keep, target, d)
                mean, se = _paired(mine - full)
                per[d] = {"dnll": mean, "se": se, "pct": 100 * math.expm1(mean), "pct_se": 100 * math.exp(mean) * se}
                if "reap" in methods:
                    vs_reap[d] = _paired(mine - _nll(cache, split, windows, "reap", keep, target, d))
            n = len(DOMAINS)
            row = {"keep": keep, "kind": kind, "method": method, "domains": per,
                   "mean_dnll": sum(p["dnll"] for p in per.values()) / n,
                   "mean_dnll_se": math.sqrt(sum(p["se"] ** 2 for p in per.values())) / n,
                   "mean_pct": sum(p["pct"] for p in per.values()) / n,
                   "max_pct": max(p["pct"] for p in per.values())}
            if vs_reap:
                row["vs_reap"] = sum(v[0] for v in vs_reap.values()) / n
                row["vs_reap_se"] = math.sqrt(sum(v[1] ** 2 for v in vs_reap.values())) / n
                row["wins_vs_reap"] = sum(v[0] < 0 for v in vs_reap.values())
            rows.append(row)
    return {"split": split, "windows": windows, "rows": rows}


def render(summary: dict) -> str:
    """A markdown table of the summary."""
    lines = [f"split {summary['split']}, {summary['windows']} windows × 256 tokens per domain",
             "", "| keep | target | method | mean ΔNLL ± SE | mean Δ% | worst Δ% | vs reap (nats ± SE) | wins vs reap | "
             + " | ".join(DOMAINS) + " |", "|" + "---|" * (8 + len(DOMAINS))]
    for r in sorted(summary["rows"], key=lambda r: (-r["keep"], r["kind"], r["mean_dnll"])):
        vs = f"{r['vs_reap']:+.4f} ± {r['vs_reap_se']:.4f}" if "vs_reap" in r else "-"
        wins = f"{r['wins_vs_reap']}/6" if "wins_vs_reap" in r else "-"
        cells = " | ".join(f"{r['domains'][d]['pct']:+.2f}" for d in DOMAINS)
        lines.append(f"| {r['keep']} | {r['kind']} | {r['method']} | {r['mean_dnll']:.4f} ± {r['mean_dnll_se']:.4f} | "
                     f"{r['mean_pct']:+.2f}% | {r['max_pct']:+.2f}% | {vs} | {wins} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
