"""Reconstruction-guided expert selection: keep the experts whose loss changes the MoE layer's output least.

A scorer ranks experts one at a time; but what a pruned layer computes depends
on the *set* kept: when expert j goes, its tokens are re-routed to the next
kept experts, which may do the job almost as well (then j is cheap to drop)
or not at all. "Not All Experts are Equal" (Lu et al., 2024) therefore picks,
per layer, the kept set that minimises the layer's output reconstruction
error on calibration tokens. Here that search is greedy backward elimination:

1. on a sample of calibration tokens record the layer's input ``h`` and compute
   the router logits and every expert's output ``f_j(h)``;
2. the reference is the full layer's routed output ``y(h) = Σ_{j∈topk} g_j f_j(h)``;
3. starting from all experts, repeatedly drop the expert whose removal adds the
   least ``Σ_t ‖y_S(h_t) − y(h_t)‖²``, where ``y_S`` routes exactly as the
   compiled checkpoint does: dropped experts' logits are ``−inf`` (so a softmax
   gate renormalises over the kept experts), top-k among the kept, then the
   model's own top-k renormalisation;
4. the order of elimination, reversed, ranks every expert: the kept set for any
   M is the first M of that order, so one search serves every keep ratio and the
   plan machinery (local ranking, padding, ``order``) is unchanged.

On grouped routers (DeepSeek-V3 ``n_group``) an expert is only removed from a
group holding the most experts, so every M that is a multiple of ``n_group``
keeps the groups even, as the compiled checkpoint needs. The search ignores the
group limit itself (``topk_group``) when re-routing: a documented approximation.

Cost: one pass over the sampled tokens to record ``h`` (a fraction of one
forward pass), every expert on every sampled token (``E / top_k`` times the
MoE work of a forward pass over the sample), then a search that re-routes only
the tokens whose top-k held the expert under test.

Example::

    hidden = record_hidden(model, adapter, windows, tokens=2048)   # {decoder layer: (tokens, hidden)}
    utility = reconstruction_utility(model, adapter, hidden)        # (layers, experts): higher = keep
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from premoe.adapters import MoEAdapter, MoELayer


@dataclass(frozen=True)
class Routing:
    """How the layer turns router logits into gates: what the compiled checkpoint does."""

    top_k: int
    scoring: str = "softmax"  # "softmax" or "sigmoid"
    renormalise: bool = True  # divide the top-k gates by their sum (norm_topk_prob)
    correction_bias: torch.Tensor | None = None  # (experts,) added to the gate for the choice only
    n_group: int = 1  # routing groups; eliminations keep them even


@dataclass
class LayerSample:
    """What the search needs for one layer: router logits and every expert's output on the sampled tokens."""

    logits: torch.Tensor  # (tokens, experts) raw router logits
    outputs: torch.Tensor  # (tokens, experts, hidden) f_j(h_t), unweighted


def route(logits: torch.Tensor, alive: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts (tokens, k) and their gate weights (tokens, k) with only the ``alive`` experts routable.

    ``alive`` is a (experts,) bool mask; a dropped expert's logit is −inf, as in
    the compiled checkpoint.
    """
    masked = logits.masked_fill(~alive, float("-inf"))  # (tokens, experts)
    probs = masked.softmax(dim=-1) if routing.scoring == "softmax" else masked.sigmoid()  # (tokens, experts)
    choice = probs if routing.correction_bias is None else probs + routing.correction_bias
    choice = choice.masked_fill(~alive, float("-inf"))
    selected = choice.topk(routing.top_k, dim=-1).indices  # (tokens, k)
    gates = probs.gather(1, selected)  # (tokens, k)
    if routing.renormalise:
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return selected, gates


def combine(outputs: torch.Tensor, selected: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The routed output (tokens, hidden): Σ_k gate_k · f_{selected_k}."""
    picked = outputs.gather(1, selected.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))  # (tokens, k, hidden)
    return (gates.to(outputs.dtype).unsqueeze(-1) * picked).sum(1)  # (tokens, hidden)


def reconstruction_error(sample: LayerSample, kept: Sequence[int], routing: Routing) -> float:
    """Σ_t ‖y_S(h_t) − y(h_t)‖² for the kept set S: what the search minimises (used by tests and reports)."""
    experts = sample.logits.shape[1]
    everyone = torch.ones(experts, dtype=torch.bool)
    alive = torch.zeros(experts, dtype=torch.bool)
    alive[list(kept)] = True
    full = combine(sample.outputs, *route(sample.logits, everyone, routing))  # (tokens, hidden)
    pruned = combine(sample.outputs, *route(sample.logits, alive, routing))
    return float(((pruned - full) ** 2).sum())


class _Search:
    """The current kept set, each token's routing under it and its squared error; trial changes re-route few tokens.

    When the gates of a token depend only on its own top-k (renormalised
    softmax, or sigmoid) a change of the kept set re-routes only the tokens
    that lose an expert or gain a better one; a softmax without renormalisation
    re-weights every token, so then every token is re-routed.
    """

    def __init__(self, sample: LayerSample, routing: Routing, alive: torch.Tensor):
        self.logits, self.outputs, self.routing = sample.logits.double(), sample.outputs, routing
        self.local = routing.renormalise or routing.scoring == "sigmoid"
        everyone = torch.ones(self.logits.shape[1], dtype=torch.bool)
        self.full = combine(self.outputs, *route(self.logits, everyone, routing))  # (tokens, hidden) reference
        self.alive = alive.clone()
        self.selected, self.gates = route(self.logits, self.alive, routing)  # (tokens, k) each
        self.error = self._error(torch.arange(self.logits.shape[0]), self.selected, self.gates)  # (tokens,)

    def _error(self, rows: torch.Tensor, selected: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return ((combine(self.outputs[rows], selected, gates) - self.full[rows]) ** 2).sum(-1).double()

    def _choice(self) -> torch.Tensor:
        probs = self.logits if self.routing.scoring == "softmax" else self.logits.sigmoid()  # same order as softmax
        return probs if self.routing.correction_bias is None else probs + self.routing.correction_bias

    def trial(self, out: int, into: int | None = None) -> tuple[float, tuple]:
        """The change in total error if ``out`` leaves (and ``into`` joins), and what :meth:`apply` needs."""
        alive = self.alive.clone()
        alive[out] = False
        if into is not None:
            alive[into] = True
        if self.local:
            hit = (self.selected == out).any(dim=1)  # (tokens,) lose an expert
            if into is not None:
                choice = self._choice()  # (tokens, experts)
                hit |= choice[:, into] > choice.gather(1, self.selected).min(dim=1).values  # gain a better one
            rows = hit.nonzero(as_tuple=True)[0]
        else:
            rows = torch.arange(self.logits.shape[0])
        selected, gates = route(self.logits[rows], alive, self.routing)
        error = self._error(rows, selected, gates)
        return float(error.sum() - self.error[rows].sum()), (alive, rows, selected, gates, error)

    def apply(self, change: tuple) -> None:
        alive, rows, selected, gates, error = change
        self.alive = alive
        self.selected[rows], self.gates[rows], self.error[rows] = selected, gates, error


def eliminate(sample: LayerSample, routing: Routing) -> list[int]:
    """Every expert, best first: greedy backward elimination of the layer's reconstruction error.

    The first M of the returned order are the set the greedy search keeps at M
    (for any M ≥ top-k). The last ``top_k`` survivors, which a router always
    needs, are ordered by how much gate weight they carry on the sample.
    """
    experts = sample.logits.shape[1]
    size = experts // max(routing.n_group, 1)
    search = _Search(sample, routing, torch.ones(experts, dtype=torch.bool))
    removed: list[int] = []
    while int(search.alive.sum()) > routing.top_k and _removable(search.alive, size, routing):
        trials = [(search.trial(j), j) for j in _removable(search.alive, size, routing)]
        (_, change), j = min(trials, key=lambda t: t[0][0])
        search.apply(change)
        removed.append(j)
    survivors = search.alive.nonzero(as_tuple=True)[0]
    weight = torch.zeros(experts, dtype=torch.float64).scatter_add_(0, search.selected.reshape(-1),
                                                                    search.gates.reshape(-1).double())
    survivors = survivors[weight[survivors].argsort(descending=True)].tolist()
    return survivors + removed[::-1]


def _removable(alive: torch.Tensor, size: int, routing: Routing) -> list[int]:
    """Experts that may go next: on grouped routers only from a group holding the most alive experts (≥ 3)."""
    if routing.n_group <= 1:
        return alive.nonzero(as_tuple=True)[0].tolist()
    counts = alive.view(routing.n_group, size).sum(1)  # (groups,)
    most = int(counts.max())
    if most <= 2 or int(alive.sum()) - 1 < routing.top_k:
        return []  # grouped routing needs ≥ 2 experts per group
    return [e for e in alive.nonzero(as_tuple=True)[0].tolist() if int(counts[e // size]) == most]


def order_utility(order: Sequence[int]) -> torch.Tensor:
    """(experts,) a utility whose top-M are the first M of ``order``: E for the best, 1 for the worst."""
    experts = len(order)
    utility = torch.zeros(experts, dtype=torch.float64)
    utility[list(order)] = torch.arange(experts, 0, -1, dtype=torch.float64)
    return utility


# --------------------------------------------------------------------------- the model side


def routing_of(adapter: MoEAdapter, config, layer: MoELayer) -> Routing:
    """The layer's :class:`Routing`, from the adapter's knowledge of the family."""
    bias = adapter.correction_bias_of(layer)
    return Routing(adapter.top_k(config), adapter.scoring, adapter.renormalises_top_k(config),
                   None if bias is None else bias.detach().double().reshape(-1), adapter.groups(config)[0])


@torch.no_grad()
def layer_sample(adapter: MoEAdapter, layer: MoELayer, hidden: torch.Tensor) -> LayerSample:
    """Router logits and all experts' outputs for the recorded router inputs ``hidden`` (tokens, hidden)."""
    dtype = next(layer.experts.parameters()).dtype
    x = hidden.to(dtype)
    logits = adapter.router_logits(layer.router(x)).float().reshape(x.shape[0], -1)  # (tokens, experts)
    outputs = torch.stack([adapter.expert_output(layer.experts, e, x).float()
                           for e in range(layer.num_experts)], dim=1)  # (tokens, experts, hidden)
    return LayerSample(logits, outputs)


@torch.no_grad()
def reconstruction_utility(model: nn.Module, adapter: MoEAdapter, hidden: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """(layers, experts) utilities whose per-layer top-M is the greedy reconstruction choice at every M.

    ``hidden`` maps each MoE layer's decoder index to its sampled router
    inputs (tokens, hidden), e.g. from :class:`premoe.capture.HiddenRecorder`.
    Layers are in the order of ``adapter.moe_layers(model)``.
    """
    rows = []
    for layer in adapter.moe_layers(model):
        if layer.index not in hidden:
            raise ValueError(f"no recorded hidden states for MoE layer {layer.index}")
        sample = layer_sample(adapter, layer, hidden[layer.index])
        rows.append(order_utility(eliminate(sample, routing_of(adapter, model.config, layer))))
    return torch.stack(rows)  # (layers, experts)


def refine(sample: LayerSample, kept: Sequence[int], routing: Routing, rounds: int = 4) -> list[int]:
    """Improve a kept set by single swaps (one kept expert out, one dropped in) while the error falls.

    Greedy elimination is not optimal: an expert dropped early cannot come
    back. Each round tries every swap that keeps grouped routing even and takes
    the best; at most ``rounds`` rounds. Returns the kept set, sorted.
    """
    experts = sample.logits.shape[1]
    size = experts // max(routing.n_group, 1)
    alive = torch.zeros(experts, dtype=torch.bool)
    alive[list(kept)] = True
    search = _Search(sample, routing, alive)
    total = float(search.error.sum())
    for _ in range(rounds):
        kept_now = search.alive.nonzero(as_tuple=True)[0].tolist()
        dropped = (~search.alive).nonzero(as_tuple=True)[0].tolist()
        swaps = [(out, into) for out in kept_now for into in dropped
                 if routing.n_group <= 1 or out // size == into // size]
        if not swaps:
            break
        (delta, change) = min((search.trial(out, into) for out, into in swaps), key=lambda t: t[0])
        if delta >= -1e-9 * max(total, 1e-30):
            break
        search.apply(change)
        total += delta
    return search.alive.nonzero(as_tuple=True)[0].tolist()


# --------------------------------------------------------------------------- plan-time entry point

STRIDE = 4  # keep every 4th calibration token: a sample spanning 4x more text than its size


@torch.no_grad()
def record_hidden(model: nn.Module, adapter: MoEAdapter, windows: torch.Tensor, tokens: int,
                  stride: int = STRIDE, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """{decoder layer: (≤ tokens, hidden)} router inputs on every ``stride``-th token of ``windows`` (n, seq)."""
    from premoe.capture import HiddenRecorder

    with HiddenRecorder(model, adapter, tokens=tokens, stride=stride) as rec:
        for start in range(0, windows.shape[0], batch_size):
            if rec.full:
                break
            model(input_ids=windows[start : start + batch_size], use_cache=False)
    return rec.hidden


def reconstruct(profile, domains: Sequence[str], m: int, tokens: int = 2048,
                loaded=None) -> tuple[torch.Tensor, list[list[int]]]:
    """The reconstruction plan's (layers, experts) utility (greedy order) and kept rows (after swaps) at M = ``m``.

    Re-reads the profile's calibration text (the origins it recorded) and the
    model (``profile.model``, wherever :func:`~premoe.modeling.locate_model` finds it, or ``loaded``) to
    sample ``tokens`` router inputs per layer and domain; a generalist pools the domains equally, at most
    2 × ``tokens`` in all. ``loaded`` is an optional (model, tokenizer) pair.
    """
    from premoe.adapters import get_adapter
    from premoe.data import parse_sources, token_windows
    from premoe.errors import InputError
    from premoe.modeling import load_model, load_tokenizer, locate_model
    from premoe.sweep import calib_specs_of

    if tokens < 1:
        raise InputError(f"--sample-tokens must be ≥ 1, got {tokens}")
    specs = {s.partition("=")[0].partition(":")[0]: s for s in calib_specs_of(profile)}
    unknown = [d for d in domains if d not in specs]
    if unknown:
        raise InputError(f"the profile does not record where the text of {', '.join(unknown)} came from, which "
                         "--select reconstruct rereads; profile the model again, or use --select top")
    model = locate_model(profile.model) if loaded is None else None
    net, tokenizer = loaded or (load_model(model), load_tokenizer(model))
    adapter = get_adapter(net.config)
    per_domain = tokens if len(domains) == 1 else max(1, 2 * tokens // len(domains))
    seq_len = int(profile.params.get("seq_len", 256))
    pooled: dict[int, list[torch.Tensor]] = {}
    for domain in domains:
        texts = parse_sources([specs[domain]], tokenizer=tokenizer)[0].texts
        windows = token_windows(texts, tokenizer, seq_len, per_domain * STRIDE)  # (n, seq)
        for layer, x in record_hidden(net, adapter, windows, per_domain).items():
            pooled.setdefault(layer, []).append(x)
    utility, kept = [], []
    for layer in adapter.moe_layers(net):
        sample = layer_sample(adapter, layer, torch.cat(pooled[layer.index]))
        routing = routing_of(adapter, net.config, layer)
        order = eliminate(sample, routing)
        utility.append(order_utility(order))
        kept.append(refine(sample, order[:m], routing))
    return torch.stack(utility), kept  # (layers, experts), per layer the kept experts
