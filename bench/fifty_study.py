"""What else could close the 50% gap (issue 13.3)? Four training-free levers beyond the choice of experts, on val.

At 50% kept the default specialist (``peu_norm``) costs +1.7% (test, mean) and
up to +4.6% (German) on the first testbed; the goal is +1.5% on every domain.
docs/selection.md shows the choice of experts is not what is missing (every
scorer and the layer-reconstruction search land within a few tenths of a point
of each other). This study measures the levers that change *what the pruned
model computes* rather than which experts it keeps, each still a checkpoint
``from_pretrained`` loads:

* ``swap``: a local search on the model's own output. From the default kept
  set, per layer, try swapping each of the ``--candidates`` lowest-ranked kept
  experts with each of the ``--candidates`` highest-ranked dropped ones and keep
  the swap that most lowers KL(full ‖ pruned) over ``--calib-windows``
  calibration windows; repeat for ``--rounds`` rounds. It sees the whole model
  (re-routing, later layers), which no per-expert score does; the number of
  full-model evaluations it costs is printed.
* ``topk:K``: route each token to K kept experts instead of the model's top-k
  (a config field; more compute, same memory).
* ``merge:align`` / ``merge:naive`` (HC-SMoE / MC-SMoE style): fold every dropped
  expert into the kept expert whose router row is most similar, averaging their
  weights by calibration frequency, with (``align``, Hungarian matching of the
  intermediate neurons) or without neuron alignment; ``merge:align:router_mass``
  weights by router mass instead.
* ``budget``: uneven per-layer budgets measured on the model: for each layer
  alone, the calib KL when only that layer is cut to its best m experts, for m
  on a grid (steps of the group count, or 2); then, from every layer's floor,
  the budget goes step by step to the layer whose KL falls most per expert
  (assumes the layers' losses add), at the same total count as ``prune``.
  Compact export only, like ``global``.
* ``balanced`` (``--generalist`` only): each domain's utility counts equally instead of each token.
* ``fair`` / ``fair:shares`` (``--generalist`` only): per layer, greedy on Σ_d log(coverage_d) (proportional
  fairness) or Σ_d coverage_d, coverage_d being the share of domain d's own utility the kept set holds.
* ``global``: uneven per-layer budgets (premoe's global ranking) at the same
  total count: a compact export only, shown as what uneven budgets could give.

Every row is the paired change in perplexity over the full model on the val
split (24 windows × 256 tokens per domain), ± one SE. Run (≈ 10 min without
``swap``, which costs ≈ 2 s per evaluation on this machine)::

    python bench/fifty_study.py --model testbed --variants prune,topk:5,merge:naive,merge:align,global
    python bench/fifty_study.py --model testbed --variants prune,swap --domains de,python,en_docs
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from premoe.adapters import get_adapter
from premoe.data import parse_sources
from premoe.evaluate import Evaluator
from premoe.modeling import load_model, load_tokenizer
from premoe.plan import PlanRequest, make_plan
from premoe.profile import Profile

DOMAINS = ["python", "en_docs", "de", "fr", "bible", "math"]


def paired(mine: list[float], full: list[float]) -> tuple[float, float]:
    """Δ% perplexity and its SE from per-window NLLs of the same windows."""
    diff = torch.tensor(mine, dtype=torch.float64) - torch.tensor(full, dtype=torch.float64)
    mean, se = float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))
    return 100 * math.expm1(mean), 100 * math.exp(mean) * se


def swap_search(calib: Evaluator, domain: str, kept: dict, order: dict, candidates: int,
                rounds: int) -> tuple[dict, int, float, float]:
    """The kept sets after the KL-guided swap search, the evaluations it took and the calib KL before / after."""
    def kl(trial):
        return calib.evaluate(trial, domains=[domain], kl=True).domains[domain].kl

    calib.evaluate(None, domains=[domain])  # caches the reference log-probs
    kept = {l: list(v) for l, v in kept.items()}
    before = current = kl(kept)
    evaluations = 0
    for _ in range(rounds):
        improved = False
        for layer in sorted(kept):
            rank = {e: i for i, e in enumerate(order[layer])}
            weakest = sorted(kept[layer], key=lambda e: -rank[e])[:candidates]
            strongest = sorted((e for e in order[layer] if e not in kept[layer]), key=rank.get)[:candidates]
            best, choice = current, None
            for out in weakest:
                for into in strongest:
                    trial = {**kept, layer: sorted([e for e in kept[layer] if e != out] + [into])}
                    value = kl(trial)
                    evaluations += 1
                    if value < best - 1e-6:
                        best, choice = value, trial
            if choice is not None:
                current, kept, improved = best, choice, True
        if not improved:
            break
    return kept, evaluations, before, current


def measured_budgets(calib: Evaluator, profile: Profile, request: dict, keep: float,
                     domain: str | None) -> tuple[dict, int]:
    """Kept sets with per-layer counts allocated by each layer's own measured KL curve; evaluations it took."""
    layers, experts, top_k = profile.moe_layers, profile.num_experts, profile.top_k
    step = max(profile.groups[0], 2)
    grid = list(range(-(-max(top_k, 2 * profile.groups[0]) // step) * step, experts + 1, step))

    def at(m: int) -> dict:  # every layer's best m (groups kept even)
        return make_plan(profile, PlanRequest(experts=m, **request)).kept

    names = [domain] if domain else list(calib.windows)
    rows = {m: at(m) for m in grid}
    curve, evaluations = {}, 0
    for layer in layers:
        for m in grid:
            if m == experts:
                curve[layer, m] = 0.0
                continue
            result = calib.evaluate({layer: rows[m][layer]}, domains=names, kl=True)
            curve[layer, m] = sum(d.kl for d in result.domains.values()) / len(names)
            evaluations += 1
    counts = {layer: grid[0] for layer in layers}
    budget = round(keep * experts) * len(layers) - sum(counts.values())
    while budget >= step:
        gain = {l: curve[l, counts[l]] - curve[l, counts[l] + step] for l in layers if counts[l] + step <= experts}
        best = max(gain, key=gain.get)
        counts[best] += step
        budget -= step
    return {layer: rows[counts[layer]][layer] for layer in layers}, evaluations


def set_top_k(net, k: int) -> int:
    """Route to ``k`` experts a token (every module's ``top_k``); returns the old value."""
    old = None
    for module in net.modules():
        if isinstance(getattr(module, "top_k", None), int):
            old, module.top_k = module.top_k, k
    return old


class Merger:
    """Fold dropped experts into kept ones in place (fused ``gate_up_proj``/``down_proj`` experts); undo restores."""

    def __init__(self, net, profile: Profile):
        self.adapter = get_adapter(net.config)
        self.layers = self.adapter.moe_layers(net)
        self.profile = profile
        self.saved = [(l.experts.gate_up_proj.data.clone(), l.experts.down_proj.data.clone()) for l in self.layers]

    def undo(self) -> None:
        for layer, (gate_up, down) in zip(self.layers, self.saved):
            layer.experts.gate_up_proj.data.copy_(gate_up)
            layer.experts.down_proj.data.copy_(down)

    def merge(self, kept: dict, domain: str | None, align: bool, weight: str) -> None:
        self.undo()
        usage = (self.profile.utility(domain, weight) if domain
                 else self.profile.generalist_utility(weight))  # (layers, experts)
        for row, layer, (gate_up, down) in zip(usage, self.layers, self.saved):
            keep = kept[layer.index]
            rows = layer.router.get_parameter(self.adapter.router_weight).float()  # (experts, hidden)
            router = torch.nn.functional.normalize(rows, dim=1)
            similar = router @ router.T  # (experts, experts)
            sums = {e: [float(row[e]) * gate_up[e], float(row[e]) * down[e], float(row[e])] for e in keep}
            for j in (e for e in range(gate_up.shape[0]) if e not in keep):
                target = keep[int(similar[j, keep].argmax())]
                g, d = _aligned(gate_up[target], down[target], gate_up[j], down[j]) if align else (gate_up[j], down[j])
                w = float(row[j])
                sums[target] = [sums[target][0] + w * g, sums[target][1] + w * d, sums[target][2] + w]
            for e, (g, d, w) in sums.items():
                if w > 0:
                    layer.experts.gate_up_proj.data[e] = g / w
                    layer.experts.down_proj.data[e] = d / w


def _aligned(gate_up_k, down_k, gate_up_j, down_j):
    """Expert j's weights with its intermediate neurons permuted to best match expert k's (Hungarian, cosine)."""
    from scipy.optimize import linear_sum_assignment  # only merge:align needs scipy (not a premoe dependency)

    width = down_k.shape[1]
    def features(gate_up, down):  # (width, 3 * hidden): each neuron's gate row, up row and down column
        return torch.nn.functional.normalize(torch.cat([gate_up[:width], gate_up[width:], down.T], 1), dim=1)
    _, column = linear_sum_assignment(-(features(gate_up_k, down_k) @ features(gate_up_j, down_j).T).numpy())
    p = torch.as_tensor(column)
    return torch.cat([gate_up_j[:width][p], gate_up_j[width:][p]]), down_j[:, p]


def fair_generalist(profile: Profile, like: dict, objective: str = "log") -> dict:
    """Per layer, as many experts as ``like`` keeps, chosen greedily to maximise Σ_d log(coverage_d): each
    domain's share of its own ``peu_norm`` utility held by the kept set (proportional fairness), each routing
    group keeping the same count. The token-weighted sum (``prune``) lets the largest users decide."""
    share = torch.stack([u.clamp(min=0) / u.clamp(min=0).sum(1, keepdim=True).clamp(min=1e-30)
                         for u in (profile.utility(d, "peu_norm") for d in profile.domains)])  # (D, layers, E)
    n_group = profile.groups[0]
    size = profile.num_experts // n_group
    kept = {}
    for i, layer in enumerate(profile.moe_layers):
        m, u = len(like[layer]), share[:, i]  # u: (D, E)
        quota = {g: m // n_group for g in range(n_group)}
        chosen, covered = [], torch.full((u.shape[0],), 1e-6, dtype=u.dtype)
        for _ in range(m):
            after = covered.unsqueeze(1) + u  # (D, E) each domain's coverage after adding each expert
            gain = after.log().sum(0) if objective == "log" else after.sum(0)  # "shares": Σ_d coverage (linear)
            for e in range(u.shape[1]):
                if e in chosen or quota[e // size] == 0:
                    gain[e] = -math.inf
            best = int(gain.argmax())
            chosen.append(best)
            quota[best // size] -= 1
            covered = covered + u[:, best]
        kept[layer] = sorted(chosen)
    return kept


def overlap(profile: Profile, keep: float) -> list[str]:
    """Per layer: how many experts the domains' specialists keep between them, and how much of each the generalist
    holds — when the specialists' union is near every expert, no generalist of the same size can match them."""
    specialists = {d: make_plan(profile, PlanRequest(keep=keep, domain=d, scorer="peu_norm")).kept
                   for d in profile.domains}
    generalist = make_plan(profile, PlanRequest(keep=keep, scorer="peu_norm")).kept
    lines = []
    for layer in profile.moe_layers:
        sets = [set(kept[layer]) for kept in specialists.values()]
        held = [len(s & set(generalist[layer])) / len(s) for s in sets]
        lines.append(f"layer {layer}: the {len(sets)} specialists keep {len(set().union(*sets))} of "
                     f"{profile.num_experts} experts between them, {len(set.intersection(*sets))} in all; the "
                     f"generalist holds {min(held):.2f}-{max(held):.2f} of a specialist's set (mean "
                     f"{sum(held) / len(held):.2f})")
    return lines


def render(paths: list[str]) -> str:
    """Markdown tables (one per model, split and target) of the JSON lines earlier runs appended (last row wins)."""
    rows = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            rows[(r["model"], r.get("split", "val"), r["generalist"], r["keep"], r["variant"], r["domain"])] = r
    out = []
    for model, split, generalist, keep in sorted({k[:4] for k in rows}):
        variants = list(dict.fromkeys(k[4] for k in rows if k[:4] == (model, split, generalist, keep)))
        out += ["", f"{model}, {split}, {keep:.0%} kept, {'generalist' if generalist else 'specialists'} "
                    "(Δ% perplexity vs full ± SE; mean = mean of the domains' Δ%):", "",
                "| variant | " + " | ".join(DOMAINS) + " | mean | within 1.5% |", "|---" * (len(DOMAINS) + 3) + "|"]
        for variant in variants:
            cells = [rows.get((model, split, generalist, keep, variant, d)) for d in DOMAINS]
            done = [c for c in cells if c]
            mean = f"{sum(c['pct'] for c in done) / len(done):+.2f}%" if len(done) == len(DOMAINS) else "—"
            within = f"{sum(c['pct'] <= 1.5 for c in done)}/{len(done)}"
            out.append(f"| {variant} | " + " | ".join(f"{c['pct']:+.2f} ± {c['se']:.2f}" if c else "—" for c in cells)
                       + f" | {mean} | {within} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--profile", help="default runs/<model>/prof (premoe profile on the calib split)")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--variants", default="prune,topk:5,merge:naive,merge:align,global")
    ap.add_argument("--split", default="val", choices=["val", "test"], help="choose on val, report on test")
    ap.add_argument("--windows", type=int, default=24, help="evaluation windows per domain")
    ap.add_argument("--calib-windows", type=int, default=16, help="swap: calibration windows the KL is measured on")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--generalist", action="store_true", help="one plan for every profiled domain, evaluated on each")
    ap.add_argument("--json", help="append one JSON line per row here")
    ap.add_argument("--render", nargs="+", metavar="JSONL", help="only print the tables of earlier runs' --json files")
    args = ap.parse_args()
    if args.render:
        return print(render(args.render))
    torch.manual_seed(0)
    profile = Profile.load(args.profile or f"runs/{args.model}/prof")
    net, tok = load_model(args.model), load_tokenizer(args.model)
    domains = args.domains.split(",")
    evaluator = Evaluator(net, tok, parse_sources([f"{d}:{args.split}" for d in domains]), max_windows=args.windows)
    calib = Evaluator(net, tok, parse_sources([f"{d}:calib" for d in domains]), max_windows=args.calib_windows)
    merger = Merger(net, profile) if any(v.startswith("merge") for v in args.variants.split(",")) else None
    kind = "generalist" if args.generalist else "specialists"
    print(f"{args.model}, {args.keep:.0%} kept ({kind}), {args.split} {args.windows} windows per domain; "
          "Δ% perplexity vs full ± SE")
    budgets = {}  # target -> (kept, evaluations) of the budget variant
    if args.generalist:
        print("\n".join(overlap(profile, args.keep)))
    for domain in domains:
        full = evaluator.evaluate(None, domains=[domain], kl=False).domains[domain].window_nll
        target = None if args.generalist else domain
        plan = make_plan(profile, PlanRequest(keep=args.keep, domain=target, scorer="peu_norm"))
        for variant in args.variants.split(","):
            started, kept, note = time.time(), plan.kept, ""
            name, _, option = variant.partition(":")
            if name == "swap":
                if args.generalist:
                    raise SystemExit("swap searches a specialist's kept set: run it without --generalist")
                kept, evaluations, before, after = swap_search(calib, domain, plan.kept, plan.order,
                                                               args.candidates, args.rounds)
                note = f"calib KL {before:.4f} -> {after:.4f}, {evaluations} evaluations"
            elif name == "topk":
                old = set_top_k(net, int(option))
            elif name == "merge":
                align, _, weight = option.partition(":")
                merger.merge(plan.kept, target, align == "align", weight or "frequency")
            elif name == "budget":
                if target not in budgets:  # a generalist's budgets are measured once, for every domain
                    request = {"domain": target, "scorer": "peu_norm"}
                    budgets[target] = measured_budgets(calib, profile, request, args.keep, target)
                kept, evaluations = budgets[target]
                note = (f"per-layer counts {','.join(str(len(kept[l])) for l in sorted(kept))}, "
                        f"{evaluations} evaluations")
            elif name == "fair":
                kept = fair_generalist(profile, plan.kept, option or "log")
            elif name == "balanced":
                kept = make_plan(profile, PlanRequest(keep=args.keep, scorer="peu_norm", weighting="balanced")).kept
            elif name == "global":
                kept = make_plan(profile, PlanRequest(keep=args.keep, domain=target, scorer="peu_norm",
                                                      ranking="global")).kept
                note = "per-layer counts " + ",".join(str(len(kept[l])) for l in sorted(kept))
            elif name != "prune":
                raise SystemExit(f"unknown variant {variant!r}")
            mine = evaluator.evaluate(kept, domains=[domain], kl=False).domains[domain].window_nll
            if name == "topk":
                set_top_k(net, old)
            if merger:
                merger.undo()
            pct, se = paired(mine, full)
            print(f"{domain:8s} {variant:24s} {pct:+6.2f}% ± {se:.2f}  {note} ({time.time() - started:.0f} s)",
                  flush=True)
            if args.json:
                with open(args.json, "a") as sink:
                    sink.write(json.dumps({"model": args.model, "keep": args.keep, "domain": domain,
                                           "generalist": args.generalist, "split": args.split, "variant": variant,
                                           "pct": pct, "se": se, "note": note}) + "\n")


if __name__ == "__main__":
    main()
