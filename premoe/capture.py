"""Router hooks that reduce token-level expert scores on the fly.

:class:`RouterCapture` registers one forward hook per MoE router, owns the
handles and removes them on exit. Each hook turns the router's output into a
:class:`~premoe.scores.RouterBatch` and adds every scorer's token scores into
per-layer sums, so memory stays constant however many calibration tokens run
through. There is no global state: two captures on two models (or a server
handling requests) never see each other.

Example::

    with RouterCapture(model, adapter, [PRESETS["peu"]]) as cap:
        cap.run(input_ids, attention_mask)
    stats = cap.stats   # DomainStats: tokens, sums[name] (layers, experts), routed
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from premoe.adapters import MoEAdapter, MoELayer
from premoe.scores import RouterBatch, ScorerSpec


@dataclass
class DomainStats:
    """Sums of token scores for one domain: what a profile stores."""

    tokens: int
    sums: dict[str, torch.Tensor]  # scorer name -> (moe_layers, experts) float64
    routed: torch.Tensor  # (moe_layers, experts) how many tokens were routed to each expert

    @classmethod
    def empty(cls, names: Sequence[str], layers: int, experts: int) -> "DomainStats":
        zeros = lambda: torch.zeros(layers, experts, dtype=torch.float64)  # noqa: E731
        return cls(0, {n: zeros() for n in names}, zeros())

    def merge(self, other: "DomainStats") -> "DomainStats":
        """Token-weighted union of two sets of sums (profiles of the same model)."""
        return DomainStats(self.tokens + other.tokens, {n: self.sums[n] + other.sums[n] for n in self.sums},
                           self.routed + other.routed)


class _StopForward(Exception):
    """Raised by a hook to end the forward pass early (retrieval needs only the first router)."""


class RouterCapture:
    """Hook the routers of ``model`` and accumulate scorer sums in :attr:`stats`.

    ``layers`` restricts capture to some MoE layers (decoder indices);
    ``stop_after_last`` ends each forward pass right after the last captured
    router, which is how retrieval gets a layer-1 pattern for ~1/L of a pass.
    """

    def __init__(self, model: nn.Module, adapter: MoEAdapter, scorers: Sequence[ScorerSpec],
                 layers: Sequence[int] | None = None, stop_after_last: bool = False):
        self.model, self.adapter, self.scorers = model, adapter, list(scorers)
        all_layers = adapter.moe_layers(model)
        self.layers: list[MoELayer] = [l for l in all_layers if layers is None or l.index in layers]
        if not self.layers:
            raise ValueError(f"no MoE layer among {layers}; the model's MoE layers are {[l.index for l in all_layers]}")
        self.top_k = adapter.top_k(model.config)
        self.renormalises = adapter.renormalises_top_k(model.config)
        self.stop_after_last = stop_after_last
        self.need_outputs = any(s.needs_expert_outputs for s in self.scorers)
        self._token_mask: torch.Tensor | None = None
        self._handles: list = []
        self.reset()

    # ------------------------------------------------------------------ lifecycle

    def reset(self) -> DomainStats:
        """Start new sums and return the old ones."""
        old = getattr(self, "stats", None)
        self.stats = DomainStats.empty([s.name for s in self.scorers], len(self.layers), self.layers[0].num_experts)
        return old

    def __enter__(self) -> "RouterCapture":
        for position, layer in enumerate(self.layers):
            hook = functools.partial(self._on_router, position, layer)
            self._handles.append(layer.router.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """One forward pass; padding tokens (mask 0) are not counted."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.batch(attention_mask):
            try:
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass

    @contextlib.contextmanager
    def batch(self, attention_mask: torch.Tensor) -> Iterator[None]:
        """Count one batch's unpadded tokens and let the hooks skip its padding while the caller runs the model.

        :meth:`run` wraps a whole forward pass in it; streaming wraps one
        decoder layer at a time (premoe.streaming), e.g.::

            with capture.batch(torch.ones(4, 256)):
                hidden = decoder_layer(hidden, **layer_kwargs)
        """
        mask = attention_mask.reshape(-1).bool()  # (batch * seq,)
        self.stats.tokens += int(mask.sum())
        self._token_mask = None if mask.all() else mask  # without padding the hooks skip the indexing
        try:
            yield
        finally:
            self._token_mask = None

    # ------------------------------------------------------------------ the hook

    def _on_router(self, position: int, layer: MoELayer, module: nn.Module, args, output) -> None:
        logits = self.adapter.router_logits(output).detach().float().reshape(-1, layer.num_experts)  # (tokens, E)
        selected = self.adapter.selected_experts(output, logits, self.top_k)  # (tokens, k)
        hidden = args[0].detach().reshape(logits.shape[0], -1) if args else None  # (tokens, hidden)
        if self._token_mask is not None and self._token_mask.numel() == logits.shape[0]:
            keep = self._token_mask
            logits, selected = logits[keep], selected[keep]
            hidden = hidden[keep] if hidden is not None else None
        batch = RouterBatch(logits, self.adapter.gate_probs(logits), selected, layer=layer.index,
                            correction_bias=self._correction_bias(layer),
                            bias_added_to=self.adapter.correction_bias_added_to, renormalises=self.renormalises)
        if self.need_outputs and hidden is not None:
            batch.expert_norms = self._expert_norms(layer, hidden, selected)
        self.stats.routed[position] += torch.bincount(selected.reshape(-1), minlength=layer.num_experts)
        for scorer in self.scorers:
            self.stats.sums[scorer.name][position] += scorer(batch).sum(0)
        if self.stop_after_last and position == len(self.layers) - 1:
            raise _StopForward

    def _correction_bias(self, layer: MoELayer) -> torch.Tensor | None:
        """(experts,) the layer's choice-only bias as the router sees it now (restrict_routing masks it in place)."""
        bias = self.adapter.correction_bias_of(layer)
        if bias is None:
            return None
        return bias.detach().float().reshape(-1)  # (experts,); Ernie stores it (1, experts)

    def _expert_norms(self, layer: MoELayer, hidden: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """‖f_e(x)‖ for every (token, selected expert): REAP and EAN need it."""
        norms = torch.zeros(selected.shape, dtype=torch.float32)  # (tokens, k)
        hidden = hidden.float()
        for expert in selected.unique().tolist():
            rows, slots = (selected == expert).nonzero(as_tuple=True)
            out = self.adapter.expert_output(layer.experts, expert, hidden[rows].to(_dtype(layer.experts)))
            norms[rows, slots] = out.float().norm(dim=-1)
        return norms


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class HiddenRecorder:
    """Hook the routers of ``model`` and keep up to ``tokens`` of each MoE layer's router inputs.

    What reconstruction-guided selection (premoe.select) needs: the hidden
    states entering each MoE layer on calibration text. Memory is bounded by
    ``tokens × hidden`` per layer; every ``stride``-th token is kept so a sample
    spans many windows rather than the first few.

    Example::

        with HiddenRecorder(model, adapter, tokens=2048, stride=4) as rec:
            model(input_ids=windows)
        rec.hidden   # {decoder layer: (≤ 2048, hidden) float32}
    """

    def __init__(self, model: nn.Module, adapter: MoEAdapter, tokens: int, stride: int = 1):
        if tokens < 1 or stride < 1:
            raise ValueError(f"tokens and stride must be ≥ 1, got {tokens} and {stride}")
        self.layers = adapter.moe_layers(model)
        self.tokens, self.stride = tokens, stride
        self.hidden: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "HiddenRecorder":
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(functools.partial(self._on_router, layer.index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def full(self) -> bool:
        return len(self.hidden) == len(self.layers) and all(len(h) >= self.tokens for h in self.hidden.values())

    def _on_router(self, index: int, module: nn.Module, args, output) -> None:
        have = self.hidden.get(index)
        room = self.tokens - (0 if have is None else len(have))
        if room <= 0 or not args:
            return
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])[:: self.stride][:room]  # (≤ room, hidden)
        self.hidden[index] = x.clone() if have is None else torch.cat([have, x])
