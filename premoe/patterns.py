"""Per-token routing features at the first MoE layer: what task-adaptive retrieval matches requests by.

A request runs only up to the first MoE router (about 1/L of a forward
pass, DESIGN.md §2); a hook records, for every token, one of:

* ``router_input``: the hidden state the first router sees (hidden,) — the
  richest thing available at that point, at no extra cost;
* ``router_logits``: the first router's raw scores (experts,);
* ``router_mass``: its gate probabilities (experts,);
* any scorer preset (``peu``, ``tcess``, ``frequency`` …): that scorer's token
  scores (experts,) — the paper's pattern is ``tcess``'s mean.

``layers=2`` appends the same feature of the second MoE layer (twice the
cost; the expert bank cannot give it, since its first layer holds only M
experts). A request's *pattern* is the mean of its token features.

Example::

    reader = PatternReader(model, get_adapter(model.config), "router_input")
    tokens = reader.tokens(ids)          # (batch, seq, hidden)
    pattern = tokens.mean(1)             # (batch, hidden)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

from premoe.adapters import MoEAdapter
from premoe.errors import InputError

FEATURES = ("router_input", "router_logits", "router_mass")  # besides the scorer presets


class _Stop(Exception):
    """Raised by the last hook: nothing after the needed routers runs."""


class PatternReader:
    """Token features at the first ``layers`` MoE routers of ``model``.

    ``router`` is the first MoE layer's *unpruned* router, for a resident
    model pruned to M experts (the expert bank): it is swapped in for the
    duration of each read, so the features are those of the full model
    (everything before the first router is unaffected by pruning).
    """

    def __init__(self, model: nn.Module, adapter: MoEAdapter, feature: str, layers: int = 1,
                 router: nn.Module | None = None):
        self.model, self.adapter, self.feature, self.router = model, adapter, feature, router
        self.layers = adapter.moe_layers(model)[:layers]
        if len(self.layers) != layers:
            raise InputError(f"pattern layers = {layers} but the model has {len(self.layers)} MoE layers")
        if router is not None and layers > 1:
            raise InputError("a pruned resident model cannot give second-layer patterns (its first layer holds only "
                             "M experts); build the store with --pattern-layers 1")
        self.spec = None
        if feature not in FEATURES:
            from premoe.scores import parse_scorer

            try:
                self.spec = parse_scorer(feature)
            except InputError as e:
                raise InputError(f"pattern feature {feature!r} is neither {', '.join(FEATURES)} nor a scorer") from e
            if self.spec.needs_expert_outputs:
                raise InputError(f"pattern feature {feature!r} needs expert outputs; retrieval runs only the router")
        self.top_k = adapter.top_k(model.config)

    @torch.no_grad()
    def tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq, features) float32 for ``input_ids`` (batch, seq)."""
        found: dict[int, torch.Tensor] = {}
        handles = []
        with self._full_router():
            for position, layer in enumerate(self.layers):
                hook = functools.partial(self._record, position, layer, found)
                module = self.router if position == 0 and self.router is not None else layer.router
                handles.append(module.register_forward_hook(hook))
            try:
                self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
            except _Stop:
                pass
            finally:
                for handle in handles:
                    handle.remove()
        batch, seq = input_ids.shape
        return torch.cat([found[p].reshape(batch, seq, -1) for p in range(len(self.layers))], dim=-1)

    def _record(self, position: int, layer, found: dict, module: nn.Module, args, output) -> None:
        if self.feature == "router_input":
            found[position] = args[0].detach().float()  # (tokens, hidden) or (batch, seq, hidden)
        else:
            logits = self.adapter.router_logits(output).detach().float()
            logits = logits.reshape(-1, logits.shape[-1])  # (tokens, E): the full router's E when substituted
            if self.feature == "router_logits":
                found[position] = logits
            elif self.feature == "router_mass":
                found[position] = self.adapter.gate_probs(logits).float()
            else:
                from premoe.scores import RouterBatch

                selected = self.adapter.selected_experts(output, logits, self.top_k)  # (tokens, k)
                batch = RouterBatch(logits, self.adapter.gate_probs(logits), selected, layer=layer.index)
                found[position] = self.spec(batch).float()  # (tokens, E)
        if position == len(self.layers) - 1:
            raise _Stop

    @contextlib.contextmanager
    def _full_router(self) -> Iterator[None]:
        """Route the first MoE layer through the unpruned router for the duration of one read."""
        if self.router is None:
            yield
            return
        first = self.layers[0]
        block_name, attr = first.router_name.rsplit(".", 1)
        block = self.model.get_submodule(block_name)
        resident = getattr(block, attr)
        setattr(block, attr, self.router)
        try:
            yield
        finally:
            setattr(block, attr, resident)


def prefix_means(tokens: torch.Tensor, lengths) -> dict[int, torch.Tensor]:
    """{T: (windows, features)} means of the first T token features of each window (requests start at 0)."""
    return {t: tokens[:, :t].mean(1) for t in lengths if t <= tokens.shape[1]}


def chunk_means(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """(windows * seq // length, features): means of consecutive ``length``-token chunks of each window.

    Calibration patterns at request length ``length``: more samples than one
    prefix per window (later chunks see a little more context than a fresh
    request, which the prefix-only validation split measures).
    """
    windows, seq, features = tokens.shape
    count = seq // length
    return tokens[:, : count * length].reshape(windows, count, length, features).mean(2).reshape(-1, features)
