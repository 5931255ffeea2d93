"""The router's state: retrieval over the base model's first MoE layer, backend health, and /metrics counters.

Shared by every request in flight: retrieval runs one request at a time
under a lock (the retriever's model is not thread-safe), health is a
``{backend: up}`` map that the background checker and the relay both write
(a failed request marks its backend down at once; only the health check
brings it back), and counters are guarded by their own lock.

Example::

    router = Router.load(load_config("route.json"))
    hit = router.decide("def main():")               # runs the first MoE layer
    [b.name for b in router.candidates(hit.domain)]  # ['code', 'generalist', 'de']
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx

from premoe.errors import InputError
from premoe.route.config import GENERALIST, Backend, RouteConfig

# counters /metrics shows as premoe_route_<name>_total; errors: refused by the router itself (4xx), rejected: 429s
COUNTERS = ("requests", "retrieval_seconds", "forward_seconds", "forwarded", "unanswered", "continued_streams",
            "errors", "rejected")


class Router:
    """Retrieval over the first MoE layer, backend health, and the counters /metrics shows."""

    def __init__(self, config: RouteConfig, retriever, tokenizer):
        self.config, self.retriever, self.tokenizer = config, retriever, tokenizer
        domains = set(retriever.store.domains) | {GENERALIST}
        stray = sorted(set(config.backends) - domains)
        if stray:
            raise InputError(f"route config names backends for {', '.join(stray)}, which the store does not have "
                             f"(its domains: {', '.join(sorted(retriever.store.domains))})")
        self.lock = threading.Lock()  # the retriever handles one request at a time
        self.up: dict[str, bool] = dict.fromkeys(config.backends, True)  # optimistic until the first check
        self.failed_checks: dict[str, int] = dict.fromkeys(config.backends, 0)  # requests waiting on one give up
        self._metrics_lock = threading.Lock()
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.decisions: dict[tuple[str, str], int] = {}  # (retrieved domain, backend that answered) -> requests
        self.fallbacks: dict[str, int] = {}  # reason -> requests moved to another backend

    @classmethod
    def load(cls, config: RouteConfig) -> "Router":
        """Load the store, the base model up to its first MoE layer, and the tokenizer."""
        from premoe.adapters import get_adapter
        from premoe.modeling import load_tokenizer, model_identity
        from premoe.retrieval import Retriever
        from premoe.store import Store

        store = Store.load(config.store)
        if model_identity(config.model)["config_hash"] != store.model["config_hash"]:
            raise InputError(f"store {config.store} was built for {store.model['name']}, not {config.model}; "
                             "build a store for the fleet's base model")
        model = load_first_layers(config.model, store.moe_layers[0] + 1)
        tokenizer = load_tokenizer(config.model)
        return cls(config, Retriever(model, get_adapter(model.config, model), store, tokenizer), tokenizer)

    def decide(self, text: str):
        """The retrieval for ``text`` (runs the first MoE layer; call it off the event loop)."""
        with self.lock:
            hit = self.retriever.retrieve(text, tokens=self.config.retrieval_tokens)
        self.count(retrieval_seconds=hit.seconds)
        return hit

    def candidates(self, domain: str) -> list[Backend]:
        """Backends to try in order: the domain's, the generalist, every other; the live ones first."""
        names = [domain, GENERALIST, *sorted(self.config.backends)]
        ordered = [self.config.backends[n] for n in dict.fromkeys(names) if n in self.config.backends]
        return [b for b in ordered if self.up[b.name]] + [b for b in ordered if not self.up[b.name]]

    def mark_down(self, backend: Backend) -> None:
        """Take ``backend`` out of the live ones now; its next passing health check brings it back."""
        self.up[backend.name] = False

    # ------------------------------------------------------------------ counters

    def count(self, **increments: float) -> None:
        """Add to the named :data:`COUNTERS` (thread-safe: handlers, threads and the guard all count)."""
        with self._metrics_lock:
            for key, value in increments.items():
                self.counters[key] += value

    def record(self, domain: str, backend: str | None, fallbacks: list[str]) -> None:
        """Count one finished request: which backend answered its domain, and why others were skipped."""
        with self._metrics_lock:
            if backend is not None:
                self.decisions[domain, backend] = self.decisions.get((domain, backend), 0) + 1
            for reason in fallbacks:
                self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def metrics_text(self) -> str:
        """Prometheus text format."""
        from premoe.serve import label

        with self._metrics_lock:
            lines = [f"premoe_route_{k}_total {v:g}" for k, v in self.counters.items()]
            lines += [f'premoe_route_decisions_total{{domain="{label(d)}",backend="{label(b)}"}} {n}'
                      for (d, b), n in sorted(self.decisions.items())]
            lines += [f'premoe_route_fallbacks_total{{reason="{r}"}} {n}' for r, n in sorted(self.fallbacks.items())]
            lines += [f'premoe_route_backend_up{{backend="{label(b)}"}} {int(u)}' for b, u in sorted(self.up.items())]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ health

    async def watch_health(self, client: httpx.AsyncClient) -> None:
        """Check every backend's /health forever, every ``health_interval`` seconds."""
        while True:
            await asyncio.gather(*(self._check(client, b) for b in self.config.backends.values()))
            await asyncio.sleep(self.config.health_interval)

    async def _check(self, client: httpx.AsyncClient, backend: Backend) -> None:
        """One health check: up on a 200 within ``connect_timeout``; a failure also tells requests waiting on it."""
        try:
            response = await client.get(backend.url + "/health", headers=backend.auth_headers(),
                                        timeout=self.config.connect_timeout)
            up = response.status_code == 200
        except Exception:  # noqa: BLE001 - whatever went wrong, it is not up; the watcher itself must never die
            up = False
        self.up[backend.name] = up
        if not up:
            self.failed_checks[backend.name] += 1


def load_first_layers(model: str | Path, layers: int):
    """The checkpoint with only its first ``layers`` decoder layers (fp32, eval): all retrieval runs.

    Later layers' weights are never read, so a router for a 700 GB model
    holds a few GB. Falls back to the whole model if the config cannot be cut.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from premoe.modeling import load_model, resolve_model_path, transformers_config
    from premoe.progress import loading

    path = resolve_model_path(model)
    config = transformers_config(path)
    config.num_hidden_layers = layers
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "weights of layers N.. not used" is the point, not a problem
    try:
        with loading(path):  # transformers' bar only for a long load on a terminal (premoe.progress)
            return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    except (ValueError, TypeError, RuntimeError, OSError):
        return load_model(model)
    finally:
        hf_logging.set_verbosity(verbosity)
