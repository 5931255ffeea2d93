"""Independent ports of the peers' released scoring code, the reference premoe's scorers are tested against.

Written from the peers' files, not from premoe.scores, and fed with what their
observers see: every router's raw logits and every expert's output on every
token (official REAP runs all experts on all tokens).

* :class:`OfficialReap` – CerebrasResearch/reap ``pruning_metrics.update_pruning_state``
  (commit 1970473, 2026-04): per batch, softmax over all router logits,
  optionally divided by the sum over the raw-logit top-k (``renormalize``;
  ``main._setup_observer`` turns it on when ``config.norm_topk_prob`` is true
  and ``ObserverArgs.renormalize_router_weights`` is, its default), then for each
  expert ``reap = mean(‖f_j(x)‖ · w_j)``, ``ean_mean = mean(‖f_j(x)‖)`` over the
  tokens routed to it and ``ean_sum = Σ‖f_j(x)‖``; batch means are merged by
  ``metrics.OnlineStatsTracker`` (count-weighted, Welford + Kahan, float32).
* :class:`OfficialPreMoe` – JarvisPei/PreMoe ``collect_utils.collect_moe_gate_logits_r1``
  with ``build_logits_permutations``: per token a "marker" vector holding the
  raw router logit (``F.linear`` of the gate's input, fp32) of its top-``k``
  experts — ``k = 1, r = -1`` as released; the unused branch keeps the top-``k``
  whose softmax over the top-``k`` logits is ≥ ``r`` — summed over tokens and
  divided by the token count; experts are ranked by that mean. As released
  the file does not run (``.shape()`` on a shape, missing imports, CUDA only);
  this is what it evidently computes.

Example::

    ports = observe(model, adapter, windows, lambda: (OfficialReap(32, 4, True), OfficialPreMoe()))
    ports[3][0].result()["reap"]   # (experts,) REAP saliency of decoder layer 3
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _OnlineMean:
    """``reap.metrics.OnlineStatsTracker``'s mean: a count-weighted running mean with Kahan compensation."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
        self.count = torch.zeros(shape, dtype=torch.long)
        self.mean = torch.zeros(shape, dtype=dtype)
        self.compensation = torch.zeros(shape, dtype=dtype)

    def update(self, new_mean: torch.Tensor, new_count: torch.Tensor) -> None:
        new_mean = new_mean.to(self.mean.dtype)
        updated = self.count + new_count
        y = ((new_mean - self.mean) * new_count / updated).nan_to_num(0) - self.compensation
        t = self.mean + y
        self.compensation = (t - self.mean) - y
        self.mean, self.count = t, updated


@dataclass
class OfficialReap:
    """The pruning saliencies of official REAP's observer, for one MoE layer."""

    num_experts: int
    top_k: int
    renormalize: bool
    dtype: torch.dtype = torch.float32  # the observer's accumulation dtype for reap / ean_mean
    total_tokens: int = 0
    expert_frequency: torch.Tensor = field(init=False)
    ean_sum: torch.Tensor = field(init=False)
    _reap: _OnlineMean = field(init=False)
    _ean_mean: _OnlineMean = field(init=False)

    def __post_init__(self) -> None:
        self.expert_frequency = torch.zeros(self.num_experts, dtype=torch.long)
        self.ean_sum = torch.zeros(self.num_experts, dtype=torch.float64)
        self._reap = _OnlineMean((self.num_experts,), self.dtype)
        self._ean_mean = _OnlineMean((self.num_experts,), self.dtype)

    def update(self, router_logits: torch.Tensor, activations: torch.Tensor) -> None:
        """One batch: ``router_logits`` (tokens, experts), ``activations`` (experts, tokens, hidden)."""
        selected = torch.topk(router_logits, self.top_k, dim=-1).indices  # (tokens, k): raw-logit top-k
        frequency = torch.bincount(selected.reshape(-1), minlength=self.num_experts)  # (experts,)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)  # (tokens, experts)
        if self.renormalize and selected.numel():
            weights = weights / torch.gather(weights, 1, selected).sum(dim=-1, keepdim=True)
            weights = torch.clamp(weights, min=torch.finfo(weights.dtype).eps)
        reap = torch.zeros(self.num_experts, dtype=self.dtype)
        ean_mean = torch.zeros(self.num_experts, dtype=self.dtype)
        ean_sum = torch.zeros(self.num_experts, dtype=torch.float64)
        for i in range(self.num_experts):
            active = (selected == i).any(dim=-1)  # (tokens,)
            if not active.any():
                continue
            norm = torch.linalg.norm(activations[i, active, :], dim=-1)  # (active tokens,)
            ean_sum[i] = norm.sum()
            ean_mean[i] = norm.mean()
            reap[i] = (norm * weights[active, i]).mean()
        self.total_tokens += selected.shape[0]
        self.expert_frequency += frequency
        self.ean_sum += ean_sum
        self._ean_mean.update(ean_mean, frequency)
        self._reap.update(reap, frequency)

    def result(self) -> dict[str, torch.Tensor]:
        """``reap``, ``ean_mean``, ``ean_sum`` and ``expert_frequency``, each (experts,)."""
        return {"reap": self._reap.mean.clone(), "ean_mean": self._ean_mean.mean.clone(),
                "ean_sum": self.ean_sum.clone(), "expert_frequency": self.expert_frequency.clone()}


@dataclass
class OfficialPreMoe:
    """The authors' PreMoe ranking for one MoE layer: mean over tokens of the top-k raw-logit markers."""

    k: int = 1  # as released
    r: float = -1  # -1: no threshold (as released); the unused branch: keep softmax(top-k) ≥ r
    sums: torch.Tensor | None = None
    total_num: int = 0

    def update(self, router_logits: torch.Tensor, activations: torch.Tensor | None = None) -> None:
        """One batch of raw logits (tokens, experts)."""
        logits = router_logits.float()
        markers = torch.zeros_like(logits)  # (tokens, experts)
        top_values, top_indices = torch.topk(logits, k=self.k, dim=1)
        rows = torch.arange(logits.shape[0]).unsqueeze(1).expand(-1, self.k)  # (tokens, k)
        if self.r == -1:
            markers[rows, top_indices] = logits[rows, top_indices]
        else:
            keep = F.softmax(top_values, dim=1) >= self.r
            markers[rows[keep], top_indices[keep]] = logits[rows[keep], top_indices[keep]]
        batch_sum = markers.sum(dim=0)
        self.sums = batch_sum if self.sums is None else self.sums + batch_sum
        self.total_num += logits.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        """``mean_logit`` (experts,) and ``ranking``: experts by it, best first."""
        mean = self.sums / self.total_num
        return {"mean_logit": mean, "ranking": torch.argsort(mean, descending=True)}


Port = OfficialReap | OfficialPreMoe


def observe(model: nn.Module, adapter, windows: torch.Tensor, make_ports: Callable[[], Sequence[Port]],
            batch_size: int = 8) -> dict[int, Sequence[Port]]:
    """Run ``windows`` (n, seq) through ``model`` and feed every MoE layer's ports, as the peers' observers do.

    Each router's input is captured by a hook; the ports get the raw logits
    ``F.linear(x, W_router)`` in fp32 and every expert's output on every token.
    Only the fused "linear" expert layout (Qwen3-MoE, Mixtral, … in transformers 5) is supported.
    Returns decoder layer -> its ports.
    """
    layers = adapter.moe_layers(model)
    ports = {layer.index: list(make_ports()) for layer in layers}
    handles = [layer.router.register_forward_hook(functools.partial(_feed, layer, ports[layer.index]))
               for layer in layers]
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return ports


def _feed(layer, ports: Sequence[Port], module: nn.Module, args, output) -> None:
    hidden = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, hidden)
    logits = F.linear(hidden.float(), module.weight.float())  # (tokens, experts)
    activations = torch.stack([_expert_output(layer.experts, e, hidden) for e in range(layer.num_experts)])
    for port in ports:  # activations: (experts, tokens, hidden)
        port.update(logits, activations)


def _expert_output(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s SwiGLU output (tokens, hidden) from ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)  # (tokens, I) each
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])  # (tokens, hidden)
