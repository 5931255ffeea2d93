"""Pattern store for task-adaptive expert retrieval (TAER, DESIGN.md §2).

For every calibrated domain the store keeps what retrieval and swapping need:

* its **layer-1 pattern**: the utility vector (experts,) of the first MoE
  layer, which a request is matched against after running only that far;
* its **expert ranking** in every MoE layer (a permutation, best first);
* the scorer sums it was computed from, so adding a domain recomputes the
  token-weighted generalist exactly and kept sets come from :func:`make_plan`
  (the same experts a compiled specialist keeps).

Plus a ``generalist`` entry (the fallback for requests far from every domain)
and the distance threshold beyond which retrieval falls back to it.

A store directory holds::

    store.json             manifest: format, model identity, scorer, MoE layers, domains, threshold, params
    patterns.safetensors   "<domain>/pattern" (experts,), "<domain>/ranking" (layers, experts) int64,
                           "<domain>/sums" and "<domain>/routed" (layers, experts) float64

Example::

    profile = Profile.load("profiles/testbed")
    store = build_store("testbed", profile, held_out=parse_sources(["testbed:val"]))
    store.save("stores/testbed")
    store.kept("python", 16)        # {layer: [experts]} of the python specialist at M = 16
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from premoe import __version__
from premoe.capture import DomainStats
from premoe.data import Source
from premoe.errors import InputError
from premoe.fileio import load_artefact, save_artefact
from premoe.profile import Profile

FORMAT = "premoe-store/1"
GENERALIST = "generalist"
METRICS = ("l2", "cosine")


@dataclass
class CalibrationParams:
    """How the fallback threshold is set from held-out windows of the stored domains."""

    tokens: int = 64  # request length the threshold is calibrated for (shorter requests are noisier)
    windows: int = 64  # held-out windows per domain
    quantile: float = 0.99  # of the distances of held-out windows to their own domain's pattern
    margin: float = 1.25  # threshold = quantile x margin


@dataclass
class Store:
    profile: Profile  # the stored domains' sums for the one scorer retrieval uses
    scorer: str
    threshold: dict[str, float] = field(default_factory=dict)  # metric -> nearest distance beyond which we fall back
    calibration: dict = field(default_factory=dict)  # how the threshold was set, per-domain distance quantiles

    # ------------------------------------------------------------------ queries

    @property
    def model(self) -> dict:
        return self.profile.model

    @property
    def moe_layers(self) -> list[int]:
        return self.profile.moe_layers

    @property
    def domains(self) -> list[str]:
        return list(self.profile.domains)

    @property
    def scorer_spec(self):
        """The :class:`~premoe.scores.ScorerSpec` patterns were computed with (retrieval must use the same)."""
        from premoe.scores import ScorerSpec

        info = self.profile.scorers[self.scorer]
        return ScorerSpec(info["kind"], tuple(info["params"].items()), self.scorer)

    def utility(self, target: str) -> torch.Tensor:
        """(layers, experts) utility of a domain or of the generalist."""
        if target == GENERALIST:
            return self.profile.generalist_utility(self.scorer)
        return self.profile.utility(target, self.scorer)

    def pattern(self, target: str) -> torch.Tensor:
        """The layer-1 pattern (experts,) of a domain or of the generalist."""
        return self.utility(target)[0]

    def patterns(self) -> tuple[list[str], torch.Tensor]:
        """Domain names and their stacked layer-1 patterns (domains, experts)."""
        return self.domains, torch.stack([self.pattern(d) for d in self.domains])

    def ranking(self, target: str) -> torch.Tensor:
        """(layers, experts) int64: every layer's experts, best first."""
        return self.utility(target).argsort(dim=1, descending=True, stable=True)

    def kept(self, target: str, experts: int) -> dict[int, list[int]]:
        """Experts a ``target`` specialist (or the generalist) keeps at M = ``experts``: the plan's own choice."""
        from premoe.plan import PlanRequest, make_plan

        request = PlanRequest(experts=experts, scorer=self.scorer,
                              **({} if target == GENERALIST else {"domain": target}))
        return make_plan(self.profile, request).kept

    # ------------------------------------------------------------------ growing

    def add_domain(self, profile: Profile) -> "Store":
        """Add every domain of ``profile`` (the same model, profiled with this store's scorer).

        The generalist is recomputed over all domains; the threshold is kept
        (recalibrate with :func:`calibrate_threshold` when held-out text exists).
        """
        if profile.model["config_hash"] != self.model["config_hash"]:
            raise InputError(f"profile is of {profile.model['name']} (config {profile.model['config_hash']}), "
                             f"the store of {self.model['name']} (config {self.model['config_hash']}); "
                             "profile the store's model")
        info = profile.check_scorer(self.scorer)
        if info != self.profile.scorers[self.scorer]:
            raise InputError(f"scorer {self.scorer!r} has parameters {info['params']} in the profile but "
                             f"{self.profile.scorers[self.scorer]['params']} in the store; "
                             "profile with the same scorer")
        clashes = sorted(set(profile.domains) & set(self.profile.domains))
        if clashes:
            raise InputError(f"domain {', '.join(clashes)} is already in the store; rename it in the new profile")
        self.profile = self.profile.merge(_one_scorer(profile, self.scorer))
        return self

    # ------------------------------------------------------------------ files

    def save(self, out: str | Path, force: bool = False) -> Path:
        tensors = {}
        for target in [*self.domains, GENERALIST]:
            tensors[f"{target}/pattern"] = self.pattern(target).contiguous()
            tensors[f"{target}/ranking"] = self.ranking(target).contiguous()
        for domain, stats in self.profile.domains.items():
            tensors[f"{domain}/sums"] = stats.sums[self.scorer].contiguous()
            tensors[f"{domain}/routed"] = stats.routed.contiguous()
        p = self.profile
        manifest = {
            "format": FORMAT, "premoe_version": __version__, "model": p.model, "family": p.family,
            "scorer": self.scorer, "scorer_info": p.scorers[self.scorer], "moe_layers": p.moe_layers,
            "num_experts": p.num_experts, "top_k": p.top_k,
            "domains": {d: {"tokens": s.tokens, "origin": p.data.get(d, "")} for d, s in p.domains.items()},
            "threshold": self.threshold, "calibration": self.calibration, "profile_params": p.params,
            "architecture": p.architecture,
        }
        return save_artefact(out, "store.json", manifest, "patterns.safetensors", tensors, force=force)

    @classmethod
    def load(cls, path: str | Path) -> "Store":
        m, tensors = load_artefact(path, "store.json", FORMAT, "patterns.safetensors",
                                   f"premoe store build MODEL --profile P --out {path}")
        scorer = m["scorer"]
        domains = {d: DomainStats(info["tokens"], {scorer: tensors[f"{d}/sums"]}, tensors[f"{d}/routed"])
                   for d, info in m["domains"].items()}
        profile = Profile(m["model"], m["family"], m["moe_layers"], m["num_experts"], m["top_k"],
                          {scorer: m["scorer_info"]}, domains, m["profile_params"],
                          {d: info["origin"] for d, info in m["domains"].items()},
                          architecture=m.get("architecture") or {})
        return cls(profile, scorer, m["threshold"], m["calibration"])


def _one_scorer(profile: Profile, scorer: str) -> Profile:
    """``profile`` restricted to one scorer (a store needs only the one retrieval uses)."""
    info = profile.check_scorer(scorer)
    domains = {d: DomainStats(s.tokens, {scorer: s.sums[scorer]}, s.routed) for d, s in profile.domains.items()}
    for name in domains:
        if name == GENERALIST or "/" in name:
            raise InputError(f"domain name {name!r} cannot be stored: '{GENERALIST}' is reserved and '/' is "
                             "not allowed")
    return Profile(profile.model, profile.family, profile.moe_layers, profile.num_experts, profile.top_k,
                   {scorer: info}, domains, profile.params, profile.data, profile.timing, profile.architecture)


def build_store(model, profile: Profile, scorer: str = "router_mass", held_out: Sequence[Source] | None = None,
                calibration: CalibrationParams | None = None, loaded=None) -> Store:
    """A store of ``profile``'s domains; with ``held_out`` text, a calibrated fallback threshold.

    ``model`` is the checkpoint (path or ``testbed``) the profile was made
    from; it is only loaded when held-out text needs running. ``loaded`` is an
    optional ``(model, tokenizer)`` already in memory.

    The default scorer is ``router_mass``: a dense pattern (every expert's
    gate probability) tells domains apart better from a few tokens than the
    sparse, thresholded ``peu`` (testbed test windows, 64 tokens: 93.1% vs
    91.7% correct; 16 tokens: 80.6% vs 77.8%). The same scorer ranks the
    experts a retrieved domain loads.

    >>> store = build_store("testbed", Profile.load("prof"), held_out=parse_sources(["testbed:val"]))
    >>> store.threshold
    {'l2': 0.41, 'cosine': 0.012}
    """
    from premoe.modeling import model_identity

    identity = model_identity(model)
    if identity["config_hash"] != profile.model["config_hash"]:
        raise InputError(f"the profile was made from {profile.model['name']}, not {identity['name']} "
                         "(different config); profile this model first")
    store = Store(_one_scorer(profile, scorer), scorer)
    if held_out:
        calibrate_threshold(store, model, held_out, calibration or CalibrationParams(), loaded)
    return store


def calibrate_threshold(store: Store, model, held_out: Sequence[Source], params: CalibrationParams,
                        loaded=None) -> Store:
    """Set ``store.threshold`` from held-out windows of the stored domains.

    Each held-out window of ``params.tokens`` tokens gets its layer-1 pattern;
    its distance to its own domain's pattern is what a request of that
    domain looks like. The threshold is a high quantile of those distances
    (over all domains) times a margin, per metric.
    """
    from premoe.adapters import get_adapter
    from premoe.data import token_windows
    from premoe.modeling import load_model, load_tokenizer
    from premoe.retrieval import Retriever

    usable = [s for s in held_out if s.name in store.profile.domains]
    if not usable:
        raise InputError(f"no held-out data names a stored domain ({', '.join(store.domains)}); "
                         "name held-out data after the domains, e.g. --held-out python=val.jsonl")
    net, tokenizer = loaded or (load_model(model), load_tokenizer(model))
    retriever = Retriever(net, get_adapter(net.config), store, tokenizer)
    distances: dict[str, dict[str, list[float]]] = {metric: {} for metric in METRICS}
    for source in usable:
        windows = token_windows(source.texts, tokenizer, params.tokens, params.tokens * params.windows)
        for metric in METRICS:
            own = retriever.pattern_distances(windows, metric)[:, store.domains.index(source.name)]  # (windows,)
            distances[metric][source.name] = own.tolist()
    threshold, per_domain = {}, {}
    for metric in METRICS:
        everything = torch.tensor([d for values in distances[metric].values() for d in values], dtype=torch.float64)
        threshold[metric] = float(everything.quantile(params.quantile)) * params.margin
        per_domain[metric] = {d: round(float(torch.tensor(v).quantile(params.quantile)), 6)
                              for d, v in distances[metric].items()}
    store.threshold = threshold
    store.calibration = {**vars(params), "domains": [s.name for s in usable],
                         "origins": {s.name: s.origin for s in usable}, "quantile_per_domain": per_domain}
    return store
