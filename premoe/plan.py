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
from decimal import ROUND_CEILING, Decimal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from premoe import __version__
from premoe.errors import InputError, MissingFileError, PlanError
from premoe.profile import Profile
from premoe.scores import DEFAULT_SCORER

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
    scorer: str = DEFAULT_SCORER
    ranking: str = "local"  # "local": top-M per layer; "global": top L*M (layer, expert) pairs
    select: str = "top"  # "top": top-M by the scorer; "reconstruct": minimise each layer's output error (premoe.select)
    sample_tokens: int = 2048  # --select reconstruct: router inputs sampled per layer and domain


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

    def padded(self, n_group: int = 1) -> "Plan":
        """Pad every layer to the largest count with its next-best experts (vanilla-loadable export).

        With grouped routing (``n_group`` > 1) every group gets its own
        next-best experts, so the groups stay even.
        """
        target = self.max_kept
        size = self.num_experts // n_group
        kept = {}
        for layer, chosen in self.kept.items():  # the chosen experts plus the best unchosen ones, per group
            extra = []
            for group in range(n_group):
                have = sum(1 for e in chosen if e // size == group)
                unchosen = [e for e in self.order[layer] if e // size == group and e not in chosen]
                extra += unchosen[: target // n_group - have]
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
        """Read a plan file, refusing (one PlanError line) JSON of the wrong shape or types, or an invalid plan."""
        from premoe.fileio import read_small_text

        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"plan {path} does not exist; make one with `premoe plan PROFILE ... --out {path}`")
        try:
            data = json.loads(read_small_text(path, "plan"))
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not a premoe plan (invalid JSON: {e.msg})") from e
        except InputError as e:  # a directory, a device, an oversized file
            raise PlanError(f"{path} is not a readable premoe plan ({e})") from e
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"{path} is not a readable premoe plan ({type(e).__name__}); "
                            f"make one with `premoe plan PROFILE ... --out {path}`") from e
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise PlanError(f"{path} is not a premoe plan (expected a JSON object with format {FORMAT})")
        data.pop("premoe_version", None)
        plan = cls(**_plan_fields(data, path))
        try:
            validate_plan(plan, plan.num_experts, plan.top_k)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None
        return plan

    def check_model(self, identity: dict, moe_layers: Sequence[int] | None = None) -> None:
        """Refuse to apply a plan to another model, or one its architecture cannot route (:func:`validate_plan`).

        The model's constraints are read from its config.json (``identity["path"]``);
        ``moe_layers`` (the loaded model's MoE layers) adds the layer check.
        """
        if identity["config_hash"] != self.model["config_hash"]:
            raise PlanError(f"this plan was made for {self.model['name']} (config {self.model['config_hash']}), "
                            f"not {identity['name']} (config {identity['config_hash']}); profile and plan this model")
        from premoe.adapters import get_adapter
        from premoe.modeling import read_config

        config = read_config(identity["path"])  # a dict: adapters read dicts and configs alike
        adapter = get_adapter(config)
        validate_plan(self, adapter.num_experts(config), adapter.top_k(config), adapter.groups(config), moe_layers)


_FIELD_TYPES = {"model": dict, "family": str, "num_experts": int, "top_k": int, "moe_layers": list, "kept": dict,
                "order": dict, "request": dict, "target": str, "utility_kept": dict, "notes": list, "profile": str}
_OPTIONAL = {"notes": [], "profile": ""}


def _plan_fields(data: dict, path: Path) -> dict:
    """The JSON object's fields, typed as :class:`Plan` holds them, or one PlanError naming the first bad one."""
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise PlanError(f"{path}: unknown plan field(s) {', '.join(map(repr, unknown))}; is it from a newer premoe?")
    fields = {**_OPTIONAL, **data}
    for key, kind in _FIELD_TYPES.items():
        value = fields.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PlanError(f"{path}: field {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}; "
                            "make the plan again with `premoe plan`")
    if not all(isinstance(fields["model"].get(k), str) for k in ("name", "config_hash")):
        raise PlanError(f"{path}: field 'model' must hold string 'name' and 'config_hash'")
    for key in ("kept", "order"):
        table = {}
        for layer, experts in fields[key].items():
            if not (isinstance(layer, str) and layer.isascii() and layer.isdigit() and isinstance(experts, list)
                    and all(_is_int(e) for e in experts)):
                if not (isinstance(layer, str) and layer.isascii() and layer.isdigit()):
                    raise PlanError(f"{path}: {key} has layer key {layer!r}, expected a decimal layer index; make "
                                    "the plan again with `premoe plan`")
                bad = [e for e in experts if not _is_int(e)][:3] if isinstance(experts, list) else experts
                raise PlanError(f"{path}: {key}[{layer!r}] must map a layer index to a list of integer expert "
                                f"indices, got {str(bad)[:80]}; make the plan again with `premoe plan`")
            table[int(layer)] = experts
        fields[key] = table
    if not all(_is_int(l) for l in fields["moe_layers"]):
        raise PlanError(f"{path}: 'moe_layers' must be a list of layer indices")
    if not all(isinstance(fields["request"].get(k), str) for k in ("scorer", "ranking")):
        raise PlanError(f"{path}: 'request' must hold string 'scorer' and 'ranking'")
    if not all(isinstance(n, str) for n in fields["notes"]):
        raise PlanError(f"{path}: 'notes' must be a list of strings")
    return fields


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_plan(plan: Plan, num_experts: int, top_k: int, groups: tuple[int, int] = (1, 1),
                  moe_layers: Sequence[int] | None = None) -> None:
    """The one check of a plan against a model, used wherever a plan is used (load, make, compile, eval, store, serve).

    Refuses, naming the layer and the fix: a plan for another expert count or
    top-k; layers other than the model's MoE layers (``moe_layers``, when
    given) or than the plan's own ``moe_layers``; an empty layer, an index
    negative or out of range (−1 would silently mean the last expert),
    duplicates, fewer experts than top-k, an uneven keep across routing
    ``groups`` (n_group, topk_group); an ``order`` that is not a permutation of
    every expert, for each kept layer.
    """
    if plan.num_experts != num_experts or plan.top_k != top_k:
        raise PlanError(f"the plan is for {plan.num_experts} experts per layer with top-k {plan.top_k}; the model has "
                        f"{num_experts} with top-k {top_k}; make a plan from a profile of this model")
    layers = sorted(plan.kept)
    if layers != sorted(plan.moe_layers) or sorted(plan.order) != layers:
        raise PlanError(f"the plan keeps experts in layers {layers}, orders layers {sorted(plan.order)} and lists "
                        f"MoE layers {sorted(plan.moe_layers)}; these must agree (make the plan again)")
    if moe_layers is not None and layers != sorted(moe_layers):
        raise PlanError(f"the plan covers layers {layers} but the model's MoE layers are {sorted(moe_layers)}; "
                        "make a plan from a profile of this model")
    for layer in layers:
        kept = plan.kept[layer]
        if not kept:
            raise PlanError(f"layer {layer} keeps no experts; every MoE layer needs ≥ top-k = {top_k}")
        bad = [e for e in kept if not 0 <= e < num_experts]
        if bad:
            raise PlanError(f"layer {layer}: expert indices {bad} are outside 0..{num_experts - 1}")
        if len(set(kept)) != len(kept):
            raise PlanError(f"layer {layer} lists an expert twice: {kept}")
        if len(kept) < top_k:
            raise PlanError(f"layer {layer} keeps {len(kept)} experts, fewer than top-k = {top_k}; keep ≥ {top_k}")
        if sorted(plan.order[layer]) != list(range(num_experts)):
            raise PlanError(f"layer {layer}: order must list every expert 0..{num_experts - 1} once")
        _check_groups(layer, kept, num_experts, top_k, groups)


def _check_groups(layer: int, kept: Sequence[int], num_experts: int, top_k: int, groups: tuple[int, int]) -> None:
    n_group, topk_group = groups
    if n_group <= 1:
        return
    size = num_experts // n_group
    per_group = [sum(1 for e in kept if e // size == g) for g in range(n_group)]
    if len(set(per_group)) != 1 or per_group[0] < 2 or top_k > topk_group * per_group[0]:
        raise PlanError(f"layer {layer} keeps {per_group} experts per group; grouped routing needs the same number in "
                        f"each of the {n_group} groups, at least 2, and top-k {top_k} ≤ topk_group {topk_group} × "
                        "that number")


# --------------------------------------------------------------------------- choosing


def experts_for(profile: Profile, request: PlanRequest) -> int:
    """M from exactly one of --keep / --experts / --budget-gb, valid for the architecture the profile recorded."""
    given = [x is not None for x in (request.keep, request.experts, request.budget_gb)]
    if sum(given) != 1:
        raise InputError("give exactly one of --keep FRACTION, --experts M, --budget-gb G")
    E = profile.num_experts
    if request.experts is not None:
        check_experts(request.experts, E, profile.top_k, profile.groups)
        return request.experts
    if request.keep is not None:
        return experts_for_keep(request.keep, E, profile.top_k, profile.groups)
    return _experts_for_budget(profile, request.budget_gb)


def experts_for_keep(keep: float, num_experts: int, top_k: int, groups: tuple[int, int]) -> int:
    """M for ``--keep FRACTION`` of ``num_experts``, checked against the architecture.

    Callers that know the model before profiling it (``premoe demo``) check
    the fraction here, so a run does not stop after its longest step.
    """
    if not 0 < keep <= 1:
        raise InputError(f"--keep must be in (0, 1], got {keep}")
    m = max(1, round(keep * num_experts))
    try:
        check_experts(m, num_experts, top_k, groups)
    except PlanError as e:
        raise PlanError(f"--keep {keep:g} of {num_experts} experts gives {e}") from e
    return m


def _experts_for_budget(profile: Profile, budget_gb: float) -> int:
    """The largest valid M whose uniform checkpoint's .safetensors files fit the budget, or one PlanError.

    Sizes come from the profile (tensor bytes exactly, shard headers at most);
    a smaller budget is refused with the smallest size this model compiles to.
    """
    if not math.isfinite(budget_gb) or budget_gb <= 0:
        raise InputError(f"--budget-gb must be a positive number, got {budget_gb}")
    sizes = profile.sizes()
    if sizes is None:
        raise InputError("this profile records no checkpoint sizes (the model was not on disk when profiled); "
                         "use --keep or --experts, or profile the model from its directory")
    valid = [m for m in range(1, profile.num_experts + 1) if _is_valid(m, profile)]
    fitting = [m for m in valid if sizes.file_bytes_with({l: m for l in sizes.expert_bytes}) <= budget_gb * 1e9]
    if not fitting:
        smallest = sizes.file_bytes_with({l: valid[0] for l in sizes.expert_bytes})
        raise PlanError(f"--budget-gb {budget_gb:g} is below the smallest checkpoint this model compiles to, "
                        f"{smallest} bytes of .safetensors (M = {valid[0]} experts per layer); "
                        f"pass --budget-gb {gb_at_least(smallest)} or more")
    return fitting[-1]


def gb_at_least(nbytes: int) -> str:
    """The smallest GB figure of 4 significant digits that the budget check (``GB * 1e9 >= bytes``) accepts.

    Rounded up in exact decimal arithmetic: rounding ``nbytes / 1e9`` up in
    floats overshot by one unit where the float product landed a hair above
    the true value (35 bytes gave 0.00000003501, not 0.00000003500).

    >>> gb_at_least(8_976_131)
    '0.008977'
    """
    if nbytes <= 0:
        return "0"
    value = Decimal(nbytes) / 10**9  # exact: 28 significant digits hold any byte count
    unit = Decimal(1).scaleb(value.adjusted() - 3)  # one in the 4th significant digit
    figure = value.quantize(unit, rounding=ROUND_CEILING) if unit < 1 else (value / unit).to_integral_value(
        rounding=ROUND_CEILING) * unit
    while float(figure) * 1e9 < nbytes:  # the check runs in floats: step up by one unit where it rounds below
        figure += unit
    return f"{figure:f}"


def export_counts(kept: dict[int, list[int]]) -> dict[int, int]:
    """Experts per layer in the checkpoint compile writes by default: vanilla loaders read one count, so every
    layer is padded to the largest (``--export compact`` keeps the real counts)."""
    largest = max(len(v) for v in kept.values())
    return {layer: largest for layer in kept}


def _is_valid(m: int, profile: Profile) -> bool:
    try:
        check_experts(m, profile.num_experts, profile.top_k, profile.groups)
    except PlanError:
        return False
    return True


def check_experts(m: int, num_experts: int, top_k: int, groups: tuple[int, int]) -> None:
    """Architecture constraints on M, with the nearest valid choice in the message."""
    E, k = num_experts, top_k
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
    """Rank experts by utility and keep the best, respecting the architecture the profile recorded.

    With ``budget_gb``, M is the largest whose compiled checkpoint (padded to
    one count per layer, as compile writes it by default) fits the budget.
    """
    arch = profile.require_architecture()
    m = experts_for(profile, request)
    if request.domain and request.domains:
        raise InputError("give either --domain (a specialist) or --generalist [--domains], not both")
    if request.domain:
        profile.check_domain(request.domain)
        names = [request.domain]
        utility = profile.utility(request.domain, request.scorer)
        target = f"specialist:{request.domain}"
    else:
        names = request.domains or list(profile.domains)
        utility = profile.generalist_utility(request.scorer, names, request.weighting)
        target = f"generalist:{','.join(names)}"
    utility, kept_rows = _choose(profile, request, utility, names, m)
    fitting = m  # with a budget: the largest uniform M that fits
    while request.budget_gb is not None and m > 1 and not _fits(profile, kept_rows, request.budget_gb):
        m -= 1  # global ranking: padding the largest layer outgrew the budget (top-k per layer always fits)
        utility, kept_rows = _choose(profile, request, utility, names, m)
    order = {l: row.argsort(descending=True).tolist() for l, row in zip(profile.moe_layers, utility)}
    kept = {l: sorted(rows) for l, rows in zip(profile.moe_layers, kept_rows)}
    notes = _count_notes(kept, request.ranking)
    if request.budget_gb is not None and fitting > max(export_counts(kept).values()):
        notes.append(f"the {request.budget_gb:g} GB budget holds M = {fitting} in every layer: --ranking local keeps "
                     f"that many, more than this padded global plan's {max(export_counts(kept).values())}")
    if arch.get("gate_changes_when_pruned"):
        notes.append(f"{profile.family} routes with a softmax over all experts without top-k renormalisation: "
                     "after pruning the kept experts' gate weights grow (the compiled model renormalises over "
                     "the kept experts only)")
    if request.budget_gb is not None and profile.sizes().header_bytes is None:
        notes.append("this profile predates header sizes: the budget counts tensor bytes only (compile checks "
                     "the files); profile again for an exact budget")
    share = {d: _utility_share(profile.utility(d, request.scorer), kept, profile.moe_layers) for d in profile.domains}
    plan = Plan(profile.model, profile.family, profile.num_experts, profile.top_k, profile.moe_layers, kept, order,
                asdict(request), target, share, notes, profile_path)
    validate_plan(plan, profile.num_experts, profile.top_k, profile.groups, profile.moe_layers)
    return plan


def _choose(profile: Profile, request: PlanRequest, utility: torch.Tensor, names: list[str],
            m: int) -> tuple[torch.Tensor, list[list[int]]]:
    """The experts each layer keeps at M = ``m``, and the utility (layers, experts) that ranks the rest."""
    if request.select == "reconstruct":
        if request.ranking != "local":
            raise InputError("--select reconstruct chooses M experts in every layer; use --ranking local")
        from premoe.select import reconstruct

        return reconstruct(profile, names, m, request.sample_tokens)
    if request.select != "top":
        raise InputError(f"--select must be top or reconstruct, got {request.select!r}")
    if request.ranking == "local":
        return utility, [_top_in_groups(row, m, profile.groups[0]) for row in utility]
    if request.ranking == "global":
        return utility, _global_top(utility, m, profile.top_k, profile.groups)
    raise InputError(f"--ranking must be local or global, got {request.ranking!r}")


def _fits(profile: Profile, kept_rows: list[list[int]], budget_gb: float) -> bool:
    kept = dict(zip(profile.moe_layers, kept_rows))
    return profile.sizes().file_bytes_with(export_counts(kept)) <= budget_gb * 1e9


def _count_notes(kept: dict[int, list[int]], ranking: str) -> list[str]:
    """Notes on the expert count the compiled file holds (the padded one, for uneven global plans)."""
    counts = sorted({len(v) for v in kept.values()})
    written = counts[-1]
    notes = []
    if len(counts) > 1:
        notes.append(f"{ranking} ranking keeps {counts[0]}-{written} experts per layer; the checkpoint compile writes "
                     f"by default pads every layer to M = {written} with its next-best experts (one count in "
                     "config.json, what from_pretrained and vLLM load); --export compact keeps the real counts")
    if written % 4:
        notes.append(f"M = {written} is not a multiple of 4; serving kernels (vLLM fused MoE) run best with "
                     "multiples of 4")
    return notes


def _top_in_groups(row: torch.Tensor, m: int, n_group: int) -> list[int]:
    """The top-m experts of one layer; with grouped routing, the top m/n_group of every group."""
    if n_group <= 1:
        return row.topk(m).indices.tolist()
    size = row.numel() // n_group
    per_group = m // n_group
    return [g * size + i for g in range(n_group) for i in row[g * size : (g + 1) * size].topk(per_group).indices.tolist()]


def _global_top(utility: torch.Tensor, m: int, top_k: int, groups: tuple[int, int] = (1, 1)) -> list[list[int]]:
    """Top L*M (layer, expert) pairs by each layer's utility share, at least top-k per layer.

    Raw utilities are not comparable across layers (logit scales differ), so
    each layer's utilities are first normalised to sum to 1. Grouped routers
    (:func:`_global_tiers`) are ranked in tiers of one expert per group.
    """
    layers, experts = utility.shape
    share = utility.clamp(min=0) / utility.clamp(min=0).sum(1, keepdim=True).clamp(min=1e-30)  # (layers, experts)
    if groups[0] > 1:
        return _global_tiers(share, m, top_k, groups)
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


def _global_tiers(share: torch.Tensor, m: int, top_k: int, groups: tuple[int, int]) -> list[list[int]]:
    """Global ranking that keeps every group of a layer even: layers grow one *tier* (n_group experts) at a time.

    Tier t of a layer is the t-th best expert of each of its groups; its value
    is their summed share, which cannot grow with t, so taking tiers in
    descending value keeps each layer's best tiers. Every layer first gets the
    fewest tiers grouped routing can route (2, and top-k ≤ topk_group × tiers).
    """
    n_group, topk_group = groups
    layers, experts = share.shape
    size = experts // n_group
    ranked = share.view(layers, n_group, size).sort(dim=2, descending=True)  # per group, best first
    value = ranked.values.sum(1)  # (layers, size): tier t's summed share
    floor = max(2, -(-top_k // topk_group))
    tiers = [floor] * layers
    budget = layers * (m // n_group) - layers * floor  # in tiers
    for _, t, layer in sorted((-float(value[l, t]), t, l) for l in range(layers) for t in range(floor, size)):
        if budget <= 0:
            break
        if t == tiers[layer]:  # ties sort by tier, so a layer's tiers come in order
            tiers[layer] += 1
            budget -= 1
    return [sorted(g * size + int(ranked.indices[l, g, i]) for g in range(n_group) for i in range(tiers[l]))
            for l in range(layers)]


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
    how = ("reconstruction search" if plan.request.get("select") == "reconstruct"
           else f"scorer {plan.request['scorer']}")
    lines = [f"plan for {plan.model['name']} ({plan.family}): {plan.target}, {how}, {plan.request['ranking']} ranking"]
    for layer, experts in plan.kept.items():
        lines.append(f"  layer {layer:>3}: keep {len(experts):>3}/{plan.num_experts}  {format_ranges(experts)}")
    if sizes is not None:
        before = sizes.total_bytes
        after = sizes.bytes_with(export_counts(plan.kept))
        lines.append(f"  checkpoint size: {before / 1e9:.4f} GB -> {after / 1e9:.4f} GB ({after / before:.1%})"
                     f" of tensors, {sizes.file_bytes_with(export_counts(plan.kept)) / 1e9:.6f} GB of .safetensors "
                     "files at most")
        if sizes.mtp_bytes:  # the "before" holds them, the "after" does not: say so, or the ratio flatters pruning
            lines.append(f"  of which {sizes.mtp_bytes / 1e9:.4f} GB are multi-token-prediction layers that compile "
                         "drops by default (--mtp drop; --mtp prune keeps them, pruned)")
        if plan.request.get("budget_gb") is not None:
            lines.append(f"  budget: {plan.request['budget_gb']:g} GB, checked again by compile against the exact "
                         "file sizes")
    lines.append("  utility kept: " + ", ".join(f"{d} {s:.1%}" for d, s in plan.utility_kept.items()))
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_ranges(values: Sequence[int]) -> str:
    """Sorted indices as ranges, for reading a plan.

    >>> format_ranges([0, 1, 2, 5, 6, 9])
    '0-2,5-6,9'
    """
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return ",".join(out)
