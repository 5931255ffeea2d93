"""Choose which experts to keep: a plan, checked against the architecture before anything is written.

Example::

    profile = Profile.load("profiles/testbed")
    plan = make_plan(profile, PlanRequest(keep=0.5, domain="python"))
    print(explain(plan))
    plan.save("python-50.json")
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from premoe import __version__
from premoe.errors import InputError, MissingFileError, OutputExistsError, PlanError
from premoe.profile import Profile

FORMAT = "premoe-plan/1"


@dataclass
class PlanRequest:
    """What the user asked for: how small, for which domains, ranked how."""

    keep: float | None = None  # fraction of routed experts kept per layer
    experts: int | None = None  # M, experts kept per layer
    budget_gb: float | None = None  # total checkpoint size in GB (1e9 bytes)
    domain: str | None = None  # a specialist for this domain
    domains: list[str] | None = None  # a generalist over these (default: all in the profile)
    weighting: str = "tokens"  # generalist weighting: "tokens" (eq. 11) or "balanced"
    scorer: str = "peu"
    ranking: str = "local"  # "local": top-M per layer; "global": top L*M (layer, expert) pairs


@dataclass
class Plan:
    model: dict  # identity of the checkpoint the profile was made from
    family: str
    num_experts: int  # experts per layer in the original
    top_k: int
    moe_layers: list[int]
    kept: dict[int, list[int]]  # decoder layer -> original expert indices kept, ascending
    order: dict[int, list[int]]  # decoder layer -> all experts by utility, best first (padding, retrieval)
    request: dict
    target: str  # "specialist:<domain>" or "generalist:<d1,d2,…>"
    utility_kept: dict[str, float]  # per domain: share of its utility the kept experts hold
    notes: list[str] = field(default_factory=list)
    profile: str = ""

    @property
    def uniform(self) -> bool:
        return len({len(v) for v in self.kept.values()}) == 1

    @property
    def max_kept(self) -> int:
        return max(len(v) for v in self.kept.values())

    def padded(self) -> "Plan":
        """Pad every layer to the largest count with its next-best experts (vanilla-loadable export)."""
        target = self.max_kept
        kept = {}
        for layer, chosen in self.kept.items():  # the chosen experts plus the best unchosen ones
            extra = [e for e in self.order[layer] if e not in chosen][: target - len(chosen)]
            kept[layer] = sorted(chosen + extra)
        return Plan(**{**self.__dict__, "kept": kept, "notes": self.notes + [f"padded to {target} experts per layer"]})

    def save(self, out: str | Path, force: bool = False) -> Path:
        from premoe.fileio import write_text_atomic

        data = {"format": FORMAT, "premoe_version": __version__, **self.__dict__}
        data["kept"] = {str(k): v for k, v in self.kept.items()}
        data["order"] = {str(k): v for k, v in self.order.items()}
        return write_text_atomic(out, json.dumps(data, indent=1) + "\n", force=force)  # temp + rename; no leftovers

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"plan {path} does not exist; make one with `premoe plan PROFILE ... --out {path}`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not a premoe plan (invalid JSON: {e.msg})") from e
        if data.pop("format", None) != FORMAT:
            raise InputError(f"{path} is not a premoe plan (expected format {FORMAT})")
        data.pop("premoe_version", None)
        data["kept"] = {int(k): v for k, v in data["kept"].items()}
        data["order"] = {int(k): v for k, v in data["order"].items()}
        return cls(**data)

    def check_model(self, identity: dict) -> None:
        """Refuse to apply a plan to another model."""
        if identity["config_hash"] != self.model["config_hash"]:
            raise PlanError(f"this plan was made for {self.model['name']} (config {self.model['config_hash']}), "
                            f"not {identity['name']} (config {identity['config_hash']}); profile and plan this model")


# --------------------------------------------------------------------------- choosing


def experts_for(profile: Profile, request: PlanRequest) -> int:
    """M from exactly one of --keep / --experts / --budget-gb."""
    given = [x is not None for x in (request.keep, request.experts, request.budget_gb)]
    if sum(given) != 1:
        raise InputError("give exactly one of --keep FRACTION, --experts M, --budget-gb G")
    E = profile.num_experts
    if request.experts is not None:
        return request.experts
    if request.keep is not None:
        if not 0 < request.keep <= 1:
            raise InputError(f"--keep must be in (0, 1], got {request.keep}")
        return max(1, round(request.keep * E))
    return _experts_for_budget(profile, request.budget_gb)


def _experts_for_budget(profile: Profile, budget_gb: float) -> int:
    from premoe.adapters import get_adapter
    from premoe.checkpoint import size_breakdown
    from premoe.modeling import read_config, resolve_model_path

    path = resolve_model_path(profile.model["path"])
    sizes = size_breakdown(path, get_adapter(read_config(path)), profile.num_experts)
    budget = budget_gb * 1e9
    per_m = sum(sizes.expert_bytes.values())  # bytes added by one more expert in every layer
    m = math.floor((budget - sizes.base_bytes) / per_m) if per_m else 0
    if m < 1:
        raise PlanError(f"a {budget_gb} GB budget cannot hold even the non-expert weights "
                        f"({sizes.base_bytes / 1e9:.3f} GB) plus one expert per layer ({per_m / 1e9:.3f} GB)")
    return min(m, profile.num_experts)


def check_experts(m: int, profile: Profile, groups: tuple[int, int]) -> None:
    """Architecture constraints on M, with the nearest valid choice in the message."""
    E, k = profile.num_experts, profile.top_k
    n_group, topk_group = groups
    if m > E:
        raise PlanError(f"M = {m} exceeds the {E} experts per layer; choose M ≤ {E}")
    if m < k:
        raise PlanError(f"M = {m} is below top-k = {k}: the router must find {k} experts per token; "
                        f"the nearest valid choice is M = {k}")
    if n_group > 1:
        if m % n_group:
            lower, upper = (m // n_group) * n_group, (m // n_group + 1) * n_group
            raise PlanError(f"M = {m} is not a multiple of n_group = {n_group}: grouped routing needs the same "
                            f"number of experts in every group; nearest valid: M = {lower or upper} or {upper}")
        per_group = m // n_group
        if per_group < 2:
            raise PlanError(f"M = {m} leaves {per_group} expert per group; the group score sums each group's top 2, "
                            f"so keep at least 2 per group: M ≥ {2 * n_group}")
        if k > topk_group * per_group:
            need = -(-k // topk_group) * n_group
            raise PlanError(f"top-k = {k} > topk_group × per-group experts = {topk_group} × {per_group}; "
                            f"choose M ≥ {need}")


def make_plan(profile: Profile, request: PlanRequest, profile_path: str = "") -> Plan:
    """Rank experts by utility and keep the best, respecting the architecture."""
    from premoe.adapters import get_adapter
    from premoe.modeling import read_config

    config = read_config(profile.model["path"]) if Path(profile.model["path"]).exists() else {"model_type": None}
    adapter = get_adapter(config) if config.get("model_type") else None
    groups = adapter.groups(_AttrDict(config)) if adapter else (1, 1)
    m = experts_for(profile, request)
    check_experts(m, profile, groups)
    if request.domain and request.domains:
        raise InputError("give either --domain (a specialist) or --generalist [--domains], not both")
    if request.domain:
        profile.check_domain(request.domain)
        utility = profile.utility(request.domain, request.scorer)
        target = f"specialist:{request.domain}"
    else:
        names = request.domains or list(profile.domains)
        utility = profile.generalist_utility(request.scorer, names, request.weighting)
        target = f"generalist:{','.join(names)}"
    if request.ranking == "local":
        kept_rows = [_top_in_groups(row, m, groups[0]) for row in utility]
    elif request.ranking == "global":
        kept_rows = _global_top(utility, m, profile.top_k, groups[0])
    else:
        raise InputError(f"--ranking must be local or global, got {request.ranking!r}")
    order = {l: row.argsort(descending=True).tolist() for l, row in zip(profile.moe_layers, utility)}
    kept = {l: sorted(rows) for l, rows in zip(profile.moe_layers, kept_rows)}
    notes = []
    if m % 4:
        notes.append(f"M = {m} is not a multiple of 4; serving kernels (vLLM fused MoE) run best with multiples of 4")
    if adapter and adapter.gate_changes_when_pruned(_AttrDict(config)):
        notes.append(f"{adapter.name} routes with a softmax over all experts without top-k renormalisation: "
                     "after pruning the kept experts' gate weights grow (the compiled model renormalises over "
                     "the kept experts only)")
    share = {d: _utility_share(profile.utility(d, request.scorer), kept, profile.moe_layers) for d in profile.domains}
    return Plan(profile.model, profile.family, profile.num_experts, profile.top_k, profile.moe_layers, kept, order,
                asdict(request), target, share, notes, profile_path)


class _AttrDict(dict):
    """A config.json dict that answers attribute lookups like a transformers config."""

    def __getattr__(self, name):
        return self.get(name)


def _top_in_groups(row: torch.Tensor, m: int, n_group: int) -> list[int]:
    """The top-m experts of one layer; with grouped routing, the top m/n_group of every group."""
    if n_group <= 1:
        return row.topk(m).indices.tolist()
    size = row.numel() // n_group
    per_group = m // n_group
    return [g * size + i for g in range(n_group) for i in row[g * size : (g + 1) * size].topk(per_group).indices.tolist()]


def _global_top(utility: torch.Tensor, m: int, top_k: int, n_group: int) -> list[list[int]]:
    """Top L*M (layer, expert) pairs by each layer's utility share, at least top-k per layer.

    Raw utilities are not comparable across layers (logit scales differ), so
    each layer's utilities are first normalised to sum to 1.
    """
    if n_group > 1:
        raise PlanError("global ranking with grouped routing would leave groups uneven; use --ranking local")
    layers, experts = utility.shape
    share = utility.clamp(min=0) / utility.clamp(min=0).sum(1, keepdim=True).clamp(min=1e-30)  # (layers, experts)
    kept = [set(share[l].topk(top_k).indices.tolist()) for l in range(layers)]
    budget = layers * m - layers * top_k
    for flat in share.flatten().argsort(descending=True).tolist():
        if budget <= 0:
            break
        layer, expert = divmod(flat, experts)
        if expert not in kept[layer]:
            kept[layer].add(expert)
            budget -= 1
    return [sorted(k) for k in kept]


def _utility_share(utility: torch.Tensor, kept: dict[int, list[int]], layers: Sequence[int]) -> float:
    """Mean over layers of the share of (non-negative) utility held by the kept experts."""
    shares = []
    for row, layer in zip(utility.clamp(min=0), layers):
        total = float(row.sum())
        shares.append(float(row[kept[layer]].sum()) / total if total > 0 else 0.0)
    return round(sum(shares) / len(shares), 6)


# --------------------------------------------------------------------------- explaining


def explain(plan: Plan, sizes=None) -> str:
    """A readable account of the plan: kept experts per layer, sizes, utility kept."""
    lines = [f"plan for {plan.model['name']} ({plan.family}): {plan.target}, scorer {plan.request['scorer']}, "
             f"{plan.request['ranking']} ranking"]
    for layer, experts in plan.kept.items():
        lines.append(f"  layer {layer:>3}: keep {len(experts):>3}/{plan.num_experts}  {_ranges(experts)}")
    if sizes is not None:
        before = sizes.total_bytes
        after = sizes.bytes_with({l: len(v) for l, v in plan.padded().kept.items()})
        lines.append(f"  checkpoint size: {before / 1e9:.4f} GB -> {after / 1e9:.4f} GB ({after / before:.1%})")
    lines.append("  utility kept: " + ", ".join(f"{d} {s:.1%}" for d, s in plan.utility_kept.items()))
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    """[0,1,2,5,6] -> '0-2,5-6'."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return ",".join(out)
