"""Match a request to the nearest stored domain from its first-MoE-layer routing (TAER, DESIGN.md §2).

A request runs only up to the first MoE router (about 1/L of a forward
pass); its layer-1 pattern is the store's scorer averaged over its tokens,
and the chosen domain is the stored pattern nearest by L2 (the paper's rule,
v1 eq. 10) or cosine distance. A request farther than the store's calibrated
threshold from every domain gets the ``generalist`` instead.

Example::

    retriever = Retriever(model, get_adapter(model.config), Store.load("stores/testbed"), tokenizer)
    hit = retriever.retrieve("def parse(path):\\n    with open(path) as f:")
    hit.domain, hit.distance, hit.distances      # 'python', 0.12, {'python': 0.12, 'de': 0.57, ...}
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from premoe.adapters import MoEAdapter
from premoe.capture import RouterCapture
from premoe.errors import InputError
from premoe.profile import Profile
from premoe.store import GENERALIST, METRICS, Store


@dataclass
class Retrieval:
    domain: str  # the domain whose experts serve the request: the nearest one, or "generalist" on fallback
    nearest: str  # the nearest stored domain, even when it was too far
    distance: float  # distance to the nearest domain
    distances: dict[str, float]  # every stored domain's distance
    fallback: bool  # the nearest distance exceeded the threshold
    metric: str
    tokens: int  # request tokens the pattern was computed from
    seconds: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def distances(pattern: torch.Tensor, stored: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Distance of ``pattern`` (experts,) to each stored pattern (domains, experts): (domains,).

    ``l2``: Euclidean; ``cosine``: 1 - cosine similarity (blind to overall scale).
    """
    if metric == "l2":
        return (stored - pattern).norm(dim=1)
    if metric == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(stored, pattern.unsqueeze(0), dim=1)
    raise InputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def choose(pattern: torch.Tensor, store: Store, metric: str = "l2") -> tuple[str, str, float, dict[str, float], bool]:
    """(domain, nearest, distance, all distances, fallback) for one layer-1 pattern."""
    names, stored = store.patterns()
    dist = distances(pattern.double(), stored.double(), metric)  # (domains,)
    best = int(dist.argmin())
    threshold = store.threshold.get(metric)
    fallback = threshold is not None and float(dist[best]) > threshold
    return (GENERALIST if fallback else names[best]), names[best], float(dist[best]), \
        {n: round(float(d), 6) for n, d in zip(names, dist)}, fallback


class Retriever:
    """Layer-1 patterns of requests and the nearest stored domain.

    ``router`` is the first MoE layer's *unpruned* router module: a resident
    pruned model (the expert bank) has only M router rows, so the bank keeps
    a copy of the full router and retrieval routes through it. Everything
    before the first router is unaffected by pruning, so the pattern is the
    one the full model would give. One request at a time (the server holds
    its model lock): the capture's sums are reused between calls.
    """

    def __init__(self, model: nn.Module, adapter: MoEAdapter, store: Store, tokenizer,
                 router: nn.Module | None = None, metric: str = "l2"):
        self.model, self.adapter, self.store, self.tokenizer = model, adapter, store, tokenizer
        self.router, self.metric = router, metric
        self.spec = store.scorer_spec
        self.info = store.profile.scorers[store.scorer]
        first = adapter.moe_layers(model)[0]
        if first.index != store.moe_layers[0]:
            raise InputError(f"the store's first MoE layer is {store.moe_layers[0]}, the model's is {first.index}; "
                             "is the store from this model?")
        width = (router.num_experts if router is not None and hasattr(router, "num_experts") else first.num_experts)
        if width != store.profile.num_experts:
            raise InputError(f"the first router has {width} experts but the store's patterns have "
                             f"{store.profile.num_experts}; pass the unpruned router (router=...)")
        self.first = first
        with self._full_router():  # hooks the router that will run: the full one when substituted
            self.capture = RouterCapture(model, adapter, [self.spec], layers=[first.index], stop_after_last=True)

    def tokenize(self, text: str, tokens: int | None = None) -> torch.Tensor:
        """(1, seq) ids of ``text``, cut to its first ``tokens`` tokens when given."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokens is not None:
            ids = ids[:tokens]
        if not ids:
            raise InputError("the request has no tokens to retrieve a domain from")
        return torch.tensor([ids], dtype=torch.long)

    @torch.no_grad()
    def pattern(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Layer-1 pattern (experts,) of one request (1, seq): the scorer's token scores averaged."""
        self.capture.reset()
        with self._full_router(), self.capture:
            self.capture.run(input_ids.reshape(1, -1))
        return Profile.mean_utility(self.capture.stats, self.spec.name, self.info)[0]  # (experts,)

    def pattern_distances(self, windows: torch.Tensor, metric: str | None = None) -> torch.Tensor:
        """(windows, domains) distances of each window's own pattern to every stored domain."""
        _, stored = self.store.patterns()
        rows = [distances(self.pattern(w).double(), stored.double(), metric or self.metric) for w in windows]
        return torch.stack(rows)

    def retrieve(self, request: str | torch.Tensor, tokens: int | None = None, metric: str | None = None) -> Retrieval:
        """The domain whose experts should serve ``request`` (text or ids), with every distance."""
        started = time.perf_counter()
        ids = self.tokenize(request, tokens) if isinstance(request, str) else request.reshape(1, -1)[:, :tokens]
        metric = metric or self.metric
        domain, nearest, distance, all_distances, fallback = choose(self.pattern(ids), self.store, metric)
        return Retrieval(domain, nearest, round(distance, 6), all_distances, fallback, metric, int(ids.shape[1]),
                         round(time.perf_counter() - started, 6))

    @contextlib.contextmanager
    def _full_router(self) -> Iterator[None]:
        """Route the first MoE layer through the unpruned router for the duration of one capture."""
        if self.router is None:
            yield
            return
        block_name, attr = self.first.router_name.rsplit(".", 1)
        block = self.model.get_submodule(block_name)
        resident = getattr(block, attr)
        setattr(block, attr, self.router)
        try:
            yield
        finally:
            setattr(block, attr, resident)
