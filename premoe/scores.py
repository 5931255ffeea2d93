"""Token-level expert utility scores: pure functions of what the router hooks recorded.

Every scorer maps one layer's :class:`RouterBatch` to a ``(tokens, experts)``
tensor of non-negative-or-signed utilities; a profile keeps their sum over the
calibration tokens and the token count, so the per-domain utility is
``sum / tokens`` and domains merge token-weighted (DESIGN.md §2, eq. 11).

PEU (the paper's "predicted expert utility") is one parameterised scorer:

1. candidates C = ``candidates`` experts chosen by the rule ``candidates_from``:

   * ``logits`` – the largest raw router logits (pre-sigmoid for sigmoid
     routers): the authors' released code and the paper's TCESS;
   * ``routed`` – the experts the router really chose (the recorded top-k,
     after DeepSeek-V3's correction bias and group limits), best first by the
     router's own choice score; ``candidates`` ≤ top-k;
   * ``biased`` – the largest choice scores (sigmoid(logit) + correction bias
     on DeepSeek-V3-style routers), ranked as the router ranks them but
     ignoring its group limits; the ``logits`` rule on routers without a bias;

2. a local softmax over the candidates' raw logits gives p_i;
3. keep i when i ∈ C and p_i ≥ ``threshold``;
4. a kept expert scores ``transform(s_i)``: ``logit`` (the raw score, TCESS),
   ``prob`` (p_i), ``gate`` (the router's own softmax/sigmoid probability),
   ``shifted_logit`` (s_i minus the largest logit outside C; ≥ 0 under the
   ``logits`` rule), ``sigmoid_bias`` (the router's biased choice score; the
   gate probability on routers without a correction bias) or ``gate_norm``
   (the gate probability times the expert's output norm ‖f_i(x)‖, REAP's
   token score; needs expert outputs).

On routers without a correction bias or groups the three candidate rules agree
(up to ties). On biased, grouped routers they do not; on the trained
DeepSeek-V3-router testbed's validation split (docs/selection.md) ``biased``
ranked best at 50% kept (0.0400 ± 0.0041 mean ΔNLL against 0.0456 for
``logits``, ``routed`` 0.0408) and tied at 25%, so premoe's default
``peu_norm`` uses it. ``peu``, ``tcess`` and ``tcess_top1`` keep the authors'
rule (``logits``), as the paper and their code define them.

TCESS (v1) is ``peu(candidates=2, threshold=0.55, transform="logit")``; the
authors' released code is ``peu(candidates=1, threshold=0, transform="logit")``.

Baselines (DESIGN.md §3, §7) follow the peers' released code:

* ``reap`` – official REAP saliency: mean over the tokens routed to j of
  gate_j · ‖f_j(x)‖₂, the gate renormalised over the selected top-k where the
  model renormalises (``norm_topk_prob``), as CerebrasResearch/reap does by
  default since 2026-03-11; ``reap_softmax`` keeps the router's probability
  over all experts (REAP before that fix). Where official REAP applies a
  softmax to every router, premoe uses the router's own probability (sigmoid on
  sigmoid routers: the gate the model really multiplies by, up to a constant).
* ``ean_sum`` – Σ‖f_j(x)‖ over the tokens routed to j (official ``ean_sum``;
  stored divided by the token count, which keeps every layer's ranking);
  ``ean_mean`` – its mean over those tokens (official ``ean_mean``);
  ``ean`` is an alias of ``ean_mean`` (premoe's earlier ``ean``).

premoe.baselines holds independent ports of the peers' code that the tests
compare these scorers with.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch

TRANSFORMS = ("logit", "prob", "gate", "shifted_logit", "sigmoid_bias", "gate_norm")
CANDIDATE_RULES = ("logits", "routed", "biased")


@dataclass
class RouterBatch:
    """What the hooks recorded for one MoE layer and one batch of tokens."""

    logits: torch.Tensor  # (tokens, experts) raw router logits, fp32
    gate_probs: torch.Tensor  # (tokens, experts) the router's softmax / sigmoid
    selected: torch.Tensor  # (tokens, top_k) indices the model routed to
    expert_norms: torch.Tensor | None = None  # (tokens, top_k) ‖f_e(x)‖ of each selected expert
    layer: int = 0  # decoder layer index (for the seeded random scorer)
    correction_bias: torch.Tensor | None = None  # (experts,) choice-only bias (DeepSeek-V3 e_score_correction_bias)
    bias_added_to: str = "gate"  # what the bias is added to for the choice: "gate" probability or raw "logit"
    renormalises: bool = False  # the model renormalises the top-k gate weights to sum to 1 (norm_topk_prob)
    _top: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest logits and their experts, each (tokens, k), largest first.

        One top-k serves every scorer of the batch (tcess, tcess_top1 and peu
        slice the same one): top-k is most of a hook's cost on CPU.
        """
        if self._top is None or self._top[0].shape[1] < k:
            self._top = self.logits.topk(k, dim=-1)  # sorted: the first j columns are the top-j
        values, indices = self._top
        return values[:, :k], indices[:, :k]

    @property
    def choice_scores(self) -> torch.Tensor:
        """(tokens, experts) what the router ranks experts by before its group limit: score + correction bias."""
        base = self.logits if self.bias_added_to == "logit" else self.gate_probs
        if self.correction_bias is None:
            return base
        return base + self.correction_bias.to(base.dtype)  # (tokens, experts) + (experts,)


@dataclass(frozen=True)
class ScorerSpec:
    """A named scorer with its parameters, e.g. ``peu(candidates=4, threshold=0.0, transform=gate)``."""

    kind: str
    params: tuple[tuple[str, object], ...] = ()
    label: str = ""  # the user-facing name; defaults to the canonical spelling

    @property
    def name(self) -> str:
        return self.label or self.canonical

    @property
    def canonical(self) -> str:
        if not self.params:
            return self.kind
        return f"{self.kind}(" + ",".join(f"{k}={v}" for k, v in self.params) + ")"

    @property
    def needs_expert_outputs(self) -> bool:
        return self.kind in ("reap", "ean", "ean_sum") or dict(self.params).get("transform") == "gate_norm"

    @property
    def per_routed_token(self) -> bool:
        """Utility is the mean over the tokens routed to the expert, not over all tokens."""
        return self.kind in ("reap", "ean")

    def __call__(self, batch: RouterBatch) -> torch.Tensor:
        return SCORERS[self.kind](batch, **dict(self.params))


# --------------------------------------------------------------------------- scorers


def _check(batch: RouterBatch) -> tuple[int, int]:
    tokens, experts = batch.logits.shape
    if batch.gate_probs.shape != (tokens, experts) or batch.selected.shape[0] != tokens:
        raise ValueError(f"inconsistent RouterBatch shapes: logits {tuple(batch.logits.shape)}, "
                         f"gate_probs {tuple(batch.gate_probs.shape)}, selected {tuple(batch.selected.shape)}")
    return tokens, experts


def candidate_experts(batch: RouterBatch, candidates: int, rule: str = "logits") -> torch.Tensor:
    """(tokens, candidates) the experts PEU considers for each token, by ``rule`` (module docstring)."""
    if rule == "logits":
        return batch.top(candidates)[1]
    if rule == "biased":  # without a correction bias this is the logits rule (probabilities may be sparse: top-k only)
        ranked_by = batch.choice_scores if batch.correction_bias is not None else batch.logits
        return ranked_by.topk(candidates, dim=-1).indices
    if rule == "routed":
        top_k = batch.selected.shape[1]
        if candidates > top_k:
            raise ValueError(f"candidates_from=routed takes candidates from the {top_k} routed experts; "
                             f"candidates must be ≤ {top_k}, got {candidates}")
        rank = batch.choice_scores.gather(1, batch.selected).argsort(dim=-1, descending=True)  # (tokens, top_k)
        return batch.selected.gather(1, rank[:, :candidates])
    raise ValueError(f"candidates_from must be one of {CANDIDATE_RULES}, got {rule!r}")


def peu(batch: RouterBatch, *, candidates: int, threshold: float, transform: str,
        candidates_from: str = "logits") -> torch.Tensor:
    """Predicted expert utility: confident candidates, transformed (see module docstring)."""
    tokens, experts = _check(batch)
    if not 1 <= candidates <= experts:
        raise ValueError(f"candidates must be in 1..{experts}, got {candidates}")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    idx = candidate_experts(batch, candidates, candidates_from)  # (tokens, Ka)
    top = batch.logits.gather(1, idx)  # (tokens, Ka) the candidates' raw logits
    local = top.softmax(dim=-1)  # (tokens, Ka)
    confident = local >= threshold
    if transform == "logit":
        value = top
    elif transform == "prob":
        value = local
    elif transform == "gate":
        value = batch.gate_probs.gather(1, idx)
    elif transform == "sigmoid_bias":
        value = batch.choice_scores.gather(1, idx)
    elif transform == "gate_norm":  # REAP's gate · ‖f(x)‖ on PEU's confident tokens (0 at an unrouted candidate)
        value = batch.gate_probs.gather(1, idx).double() * _routed(batch, _norms(batch)).gather(1, idx)
    else:  # shifted_logit: margin over the best expert outside the candidates
        value = top - _best_outside(batch, idx, top, candidates_from)
    out = torch.zeros(tokens, experts, dtype=torch.float64)
    out.scatter_(1, idx, torch.where(confident, value, torch.zeros_like(value)).double())
    return out


def _best_outside(batch: RouterBatch, idx: torch.Tensor, top: torch.Tensor, rule: str) -> torch.Tensor:
    """(tokens, 1) the largest logit outside the candidates; the weakest candidate's when all are candidates."""
    if idx.shape[1] == batch.logits.shape[1]:
        return top.min(dim=-1, keepdim=True).values
    if rule == "logits":
        return batch.top(idx.shape[1] + 1)[0][:, -1:]
    return batch.logits.scatter(1, idx, float("-inf")).max(dim=-1, keepdim=True).values


def frequency(batch: RouterBatch) -> torch.Tensor:
    """1 where the model routed the token to the expert (how often it is in the top-k)."""
    tokens, experts = _check(batch)
    return torch.zeros(tokens, experts, dtype=torch.float64).scatter_(1, batch.selected, 1.0)


def router_mass(batch: RouterBatch) -> torch.Tensor:
    """The router's probability for every expert (softmax or sigmoid), routed or not."""
    _check(batch)
    return batch.gate_probs.double()


def _routed(batch: RouterBatch, value: torch.Tensor) -> torch.Tensor:
    """(tokens, experts) with ``value`` (tokens, top_k) at each token's routed experts, 0 elsewhere."""
    tokens, experts = _check(batch)
    return torch.zeros(tokens, experts, dtype=torch.float64).scatter_(1, batch.selected, value.double())


def _norms(batch: RouterBatch) -> torch.Tensor:
    if batch.expert_norms is None:
        raise ValueError("this scorer needs expert output norms; capture with needs_expert_outputs")
    return batch.expert_norms.double()  # (tokens, top_k)


def reap(batch: RouterBatch, *, renormalise: bool | str = "model") -> torch.Tensor:
    """REAP (Cerebras): gate_e(x) · ‖f_e(x)‖ at the routed experts; the profile averages it over routed tokens.

    The gate is renormalised over the selected top-k when ``renormalise`` is
    true, or (``"model"``) when the model itself renormalises: official REAP's
    default. ``renormalise=False`` is REAP's earlier all-experts weight.
    """
    if renormalise not in (True, False, "model"):
        raise ValueError(f"renormalise must be true, false or model, got {renormalise!r}")
    norms = _norms(batch)
    gate = batch.gate_probs.gather(1, batch.selected).double()  # (tokens, top_k)
    if batch.renormalises if renormalise == "model" else renormalise:
        # as official REAP: divide by the selected weights' sum, floor at float32 eps
        gate = (gate / gate.sum(dim=-1, keepdim=True)).clamp(min=torch.finfo(torch.float32).eps)
    return _routed(batch, gate * norms)


def ean(batch: RouterBatch) -> torch.Tensor:
    """Expert activation norm ‖f_e(x)‖ at the routed experts; the profile averages it over routed tokens."""
    return _routed(batch, _norms(batch))


def random_scores(batch: RouterBatch, *, seed: int = 0) -> torch.Tensor:
    """A seeded random utility per (layer, expert), the same for every token."""
    tokens, experts = _check(batch)
    digest = hashlib.sha256(f"{seed}/{batch.layer}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % 2**63)
    return torch.rand(experts, generator=gen, dtype=torch.float64).expand(tokens, experts)


SCORERS: dict[str, Callable[..., torch.Tensor]] = {
    "peu": peu, "frequency": frequency, "router_mass": router_mass, "reap": reap, "ean": ean,
    "ean_sum": ean,  # the same token scores; only the denominator differs (all tokens, see per_routed_token)
    "random": random_scores,
}


# --------------------------------------------------------------------------- names

PRESETS: dict[str, ScorerSpec] = {
    # the paper's v1 setting and the authors' released code
    "tcess": ScorerSpec("peu", (("candidates", 2), ("threshold", 0.55), ("transform", "logit")), "tcess"),
    "tcess_top1": ScorerSpec("peu", (("candidates", 1), ("threshold", 0.0), ("transform", "logit")), "tcess_top1"),
    "frequency": ScorerSpec("frequency"),
    "router_mass": ScorerSpec("router_mass"),
    # renormalised where the model renormalises (official REAP's default); the parameter is recorded so a profile
    # made before it (whose "reap" was the all-experts weight, params {}) is told apart on load
    "reap": ScorerSpec("reap", (("renormalise", "model"),), "reap"),
    "reap_softmax": ScorerSpec("reap", (("renormalise", False),), "reap_softmax"),  # REAP before 2026-03-11
    "ean_sum": ScorerSpec("ean_sum"),  # official ean_sum
    "ean_mean": ScorerSpec("ean", (), "ean_mean"),  # official ean_mean
    "ean": ScorerSpec("ean"),  # alias of ean_mean (premoe's earlier name)
    "random": ScorerSpec("random", (("seed", 0),), "random"),
}
# premoe's default PEU: TCESS's confidence filter (top-2 candidates, local softmax ≥ 0.55) with the router's own
# probability as the token score instead of the raw logit. A softmax router's logits are only defined up to a
# per-token shift, so summing raw logits mixes in that arbitrary offset; the gate probability does not. Chosen on
# the validation split of a mid-training testbed checkpoint (docs/scorer_selection.md); premoe's default until
# peu_norm below.
PRESETS["peu"] = ScorerSpec("peu", (("candidates", 2), ("threshold", 0.55), ("transform", "gate")), "peu")

# PEU's confidence filter with REAP's token score (gate · ‖f(x)‖): the expert must be confidently chosen *and* move
# the output. Chosen on the testbed's validation split (docs/selection.md): best of all settings at 50% kept, second
# (0.007 nats behind reconstruction-guided selection) at 25%, and the only one beating official REAP on ≥ 5/6 domains
# at both ratios. premoe's default (DEFAULT_SCORER). Needs expert outputs at profile time, like REAP.
# Candidates as the router ranks them (correction bias included; the logits where there is none): chosen on the
# DeepSeek-V3-router testbed's validation split; the same experts as the authors' rule on the first testbed.
PRESETS["peu_norm"] = ScorerSpec("peu", (("candidates", 2), ("threshold", 0.55), ("transform", "gate_norm"),
                                         ("candidates_from", "biased")), "peu_norm")
DEFAULT_SCORER = "peu_norm"  # what plan, store, sweep and demo rank experts by unless told otherwise

DEFAULT_SCORERS = ("peu", "peu_norm", "tcess", "tcess_top1", "frequency", "router_mass", "reap", "reap_softmax",
                   "ean_sum", "ean_mean", "random")


def parse_scorer(text: str) -> ScorerSpec:
    """A preset name (``peu``, ``tcess`` …) or ``peu(candidates=2,threshold=0.5,transform=prob)``."""
    from premoe.errors import InputError

    text = text.strip()
    if text in PRESETS:
        return PRESETS[text]
    kind, _, rest = text.partition("(")
    if kind not in SCORERS or (rest and not rest.endswith(")")):
        raise InputError(f"unknown scorer {text!r}; choose from {', '.join(PRESETS)} or e.g. "
                         "'peu(candidates=2,threshold=0.55,transform=logit)'")
    params = []
    for item in filter(None, rest[:-1].split(",")):
        key, _, value = item.partition("=")
        params.append((key.strip(), _number(value.strip())))
    spec = ScorerSpec(kind, tuple(params))
    try:  # validate the parameters on a tiny fake batch now, not after an hour of calibration
        spec(RouterBatch(torch.zeros(1, 8), torch.full((1, 8), 1 / 8), torch.arange(8).reshape(1, 8),
                         torch.ones(1, 8)))
    except (TypeError, ValueError) as e:
        raise InputError(f"bad scorer {text!r}: {e}") from e
    return spec


def _number(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
