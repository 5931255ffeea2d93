"""Match a request to a stored domain from its first-MoE-layer routing features (TAER, DESIGN.md §2).

A request runs only up to the first MoE router (about 1/L of a forward
pass); its pattern is the mean of its token features (:mod:`premoe.patterns`)
and the store's matcher (:mod:`premoe.matchers`) scores it against every
stored domain, its token ids add each domain's n-gram NLL
(:mod:`premoe.ngram`, ``Store.classify``). The nearest domain serves it,
unless the request's fallback score (:mod:`premoe.novelty`: its lowest
n-gram NLL, alone or plus its pattern's NLL, its bigram novelty, or for a
``nearest`` store the matcher's nearest score) is beyond the threshold of
the request's length bucket: then the ``generalist`` does.

Mixed requests: ``mixed="whole"`` (default) matches the whole request;
``"halves"`` also matches its two halves and serves the generalist when they
disagree; ``"tail"`` matches only the request's second half (the text the
answer continues). docs/results/retrieval.md measures all three.

Example::

    retriever = Retriever(model, get_adapter(model.config), Store.load("stores/testbed"), tokenizer)
    hit = retriever.retrieve("def parse(path):\\n    with open(path) as f:")
    hit.domain, hit.distance, hit.distances      # 'python', 0.8, {'python': 0.8, 'de': 5.7, ...}
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from premoe.adapters import MoEAdapter
from premoe.errors import InputError
from premoe.patterns import PatternReader, prefix_means
from premoe.store import GENERALIST, Store

MIXED_RULES = ("whole", "halves", "tail")


@dataclass
class Retrieval:
    domain: str  # the domain whose experts serve the request: the nearest one, or "generalist" on fallback
    nearest: str  # the nearest stored domain, even when it was too far
    distance: float  # the classifier's score of the nearest domain (lower = nearer; Store.classify)
    distances: dict[str, float]  # every stored domain's classifier score
    fallback: bool  # the fallback score exceeded its threshold, or (mixed="halves") the halves disagreed
    method: str  # the classifier: the matcher's method, "+kn" when the store's token models join it
    tokens: int  # request tokens the pattern was computed from
    seconds: float
    mixed: bool = False  # the halves of the request matched different domains
    fallback_score: float | None = None  # what the threshold is compared with (novelty, or the nearest score)
    threshold: float | None = None  # the fallback threshold of the request's length bucket (None: never falls back)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Retriever:
    """Patterns of requests and the stored domain they retrieve.

    ``router`` is the first MoE layer's *unpruned* router module: a resident
    pruned model (the expert bank) has only M router rows, so the bank keeps
    a copy of the full router and retrieval routes through it.
    """

    def __init__(self, model: nn.Module, adapter: MoEAdapter, store: Store, tokenizer,
                 router: nn.Module | None = None, mixed: str = "whole"):
        if mixed not in MIXED_RULES:
            raise InputError(f"mixed-request rule must be one of {', '.join(MIXED_RULES)}, got {mixed!r}")
        self.model, self.adapter, self.store, self.tokenizer, self.mixed = model, adapter, store, tokenizer, mixed
        first = adapter.moe_layers(model)[0]
        if first.index != store.moe_layers[0]:
            raise InputError(f"the store's first MoE layer is {store.moe_layers[0]}, the model's is {first.index}; "
                             "is the store from this model?")
        width = router.num_experts if router is not None and hasattr(router, "num_experts") else first.num_experts
        if width != store.profile.num_experts:
            raise InputError(f"the first router has {width} experts but the store's model has "
                             f"{store.profile.num_experts}; pass the unpruned router (router=...)")
        params = store.matcher.params
        self.reader = PatternReader(model, adapter, params.feature, params.layers, router)

    def tokenize(self, text: str, tokens: int | None = None) -> torch.Tensor:
        """(1, seq) ids of ``text``, cut to its first ``tokens`` tokens when given."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: undecodable argv bytes, or JSON's "\ud800"
            raise InputError(f"the request is not valid Unicode text (character {e.start} is a lone surrogate); "
                             "send UTF-8 text") from e
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokens is not None:
            ids = ids[:tokens]
        if not ids:
            raise InputError("the request has no tokens to retrieve a domain from")
        return torch.tensor([ids], dtype=torch.long)

    def pattern(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pattern (features,) of one request (1, seq): its token features averaged."""
        return self.reader.tokens(input_ids.reshape(1, -1))[0].mean(0)

    def prefix_patterns(self, windows: torch.Tensor, lengths) -> dict[int, torch.Tensor]:
        """{T: (windows, features)}: the pattern of each window's first T tokens, from one forward per window."""
        return prefix_means(self.reader.tokens(windows), lengths)

    def retrieve(self, request: str | torch.Tensor, tokens: int | None = None) -> Retrieval:
        """The domain whose experts should serve ``request`` (text or ids), with every domain's score."""
        started = time.perf_counter()
        ids = self.tokenize(request, tokens) if isinstance(request, str) else request.reshape(1, -1)[:, :tokens]
        if ids.shape[1] == 0:
            raise InputError("the request has no tokens to retrieve a domain from")
        features = self.reader.tokens(ids)[0]  # (seq, F)
        if self.mixed == "tail" and features.shape[0] >= 2 * self.store.matcher.params.lengths[0]:
            features = features[features.shape[0] // 2:]  # (seq - seq // 2, F)
        ids = ids[0, ids.shape[1] - features.shape[0]:]  # (seq,) the tokens the pattern averages
        hit = self.decide(features.mean(0), int(features.shape[0]), ids)
        if self.mixed == "halves" and not hit.fallback and features.shape[0] >= 2 * self.store.matcher.params.lengths[0]:
            half = features.shape[0] // 2
            halves = {self.decide(part.mean(0), len(part), part_ids).nearest
                      for part, part_ids in ((features[:half], ids[:half]), (features[half:], ids[half:]))}
            if len(halves) > 1:
                hit.domain, hit.fallback, hit.mixed = GENERALIST, True, True
        hit.seconds = round(time.perf_counter() - started, 6)
        return hit

    def decide(self, pattern: torch.Tensor, tokens: int, ids: torch.Tensor | None = None) -> Retrieval:
        """The retrieval of one pattern (features,) of a ``tokens``-token request with ids (tokens,) (no model run).

        ``ids`` may be left out only for a store without token models whose
        fallback score is the matcher's nearest score (``store.fallback_method == "nearest"``).
        """
        names = self.store.domains
        scores, pattern_scores = self.store.classify(pattern, tokens, ids)  # (D,), (D,)
        best = int(scores.argmin())
        fallback_score = self.store.fallback_score(ids, pattern_scores, pattern.numel())
        threshold = self.store.fallback_threshold(tokens)
        fallback = threshold is not None and fallback_score > threshold
        return Retrieval(GENERALIST if fallback else names[best], names[best], round(float(scores[best]), 6),
                         {n: round(float(s), 6) for n, s in zip(names, scores)}, fallback,
                         self.store.method, tokens, 0.0, fallback_score=fallback_score,
                         threshold=threshold)  # unrounded: novelty ties the threshold often (it is k / (T - 1))
