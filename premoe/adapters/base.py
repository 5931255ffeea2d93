"""What premoe needs to know about one Mixture-of-Experts family.

An adapter is a frozen dataclass: where the router and experts live (module
names, which are also the on-disk key names), how the router scores, which
config fields hold the counts, and how one expert computes its output. Only
files in ``premoe.adapters`` name model types; everything else asks an adapter.

Two facts make most of this generic:

* transformers declares ``_can_record_outputs["router_logits"]`` on every MoE
  model: the router class and where its logits sit in the router's output. We
  hook exactly those modules, so capture needs no copy of model code.
* routers compute logits with ``F.linear`` over their own weight. Forcing the
  routing onto a subset of experts (the correctness oracle, DESIGN.md §4)
  adds ``-inf`` to that one linear's output for dropped experts, so every
  family's own softmax / sigmoid / top-k / group logic then runs unchanged.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a loaded model."""

    index: int  # decoder layer index (dense layers are skipped, so not always 0..L-1)
    router_name: str  # module path, e.g. "model.layers.3.mlp.gate"; also the on-disk key prefix
    router: nn.Module
    experts_name: str
    experts: nn.Module
    num_experts: int


@dataclass(frozen=True)
class MoEAdapter:
    """Per-family knowledge. Defaults describe the common transformers-5 layout."""

    name: str  # family name shown to users
    model_types: tuple[str, ...]  # config.model_type values this adapter serves
    expert_count_keys: tuple[str, ...]  # config fields holding the routed expert count (all rewritten)
    top_k_key: str = "num_experts_per_tok"
    scoring: str = "softmax"  # "softmax" or "sigmoid": how router logits become gate probabilities
    norm_topk_key: str | None = "norm_topk_prob"  # None: the family always renormalises top-k
    always_renormalises: bool = True  # used when norm_topk_key is None
    moe_block: str = "mlp"  # decoder-layer attribute of the sparse block
    router: str = "gate"  # block attribute of the router
    experts: str = "experts"  # block attribute of the experts container
    router_bias_attrs: tuple[str, ...] = ()  # per-expert router vectors besides the weight, e.g. "bias"
    correction_bias_attr: str | None = None  # added to scores for choice only (DeepSeek-V3 noaux_tc)
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) for grouped routing
    shared_expert_attrs: tuple[str, ...] = ()  # block attributes of always-on experts (never pruned)
    dense_layer_keys: tuple[str, ...] = ()  # config fields that make some layers dense (informational)
    fused_on_disk: bool = False  # experts stored as 3-D tensors in the checkpoint files
    router_logits_index: int = 0  # where the logits sit in the router's output tuple
    activation: str = "silu"  # expert MLP activation for expert_output (gated: act(gate) * up)
    notes: tuple[str, ...] = ()  # facts shown by `premoe profile show` / verify

    # ------------------------------------------------------------------ config

    def num_experts(self, config) -> int:
        for key in self.expert_count_keys:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise KeyError(f"none of {self.expert_count_keys} is set in the config")

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_key))

    def renormalises_top_k(self, config) -> bool:
        if self.norm_topk_key is None:
            return self.always_renormalises
        return bool(getattr(config, self.norm_topk_key, False))

    def groups(self, config) -> tuple[int, int]:
        """(n_group, topk_group); (1, 1) for ungrouped routers."""
        if not self.group_keys:
            return 1, 1
        n_group, topk_group = (getattr(config, k, None) or 1 for k in self.group_keys)
        return int(n_group), int(topk_group)

    def gate_changes_when_pruned(self, config) -> bool:
        """True when dropping experts changes the kept experts' gate weights.

        A softmax over *all* experts without top-k renormalisation (Qwen2-MoE,
        OLMoE with ``norm_topk_prob=False``) gives the kept experts a larger
        share of the probability mass once the others are gone.
        """
        return self.scoring == "softmax" and not self.renormalises_top_k(config)

    def config_updates(self, config, num_kept: int) -> dict:
        """Config fields to write for a checkpoint that keeps ``num_kept`` experts per layer."""
        return {key: num_kept for key in self.expert_count_keys}

    # ------------------------------------------------------------------ modules

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """The MoE layers of a loaded model, in order, found from its router modules."""
        router_cls = router_class(model)
        layers = []
        for name, module in model.named_modules():
            if not isinstance(module, router_cls):
                continue
            block_name = name.rsplit(".", 1)[0]
            block = model.get_submodule(block_name)
            experts = getattr(block, self.experts, None)
            match = _LAYER_INDEX.search(name)
            if experts is None or match is None:
                continue
            layers.append(MoELayer(int(match.group(1)), name, module, f"{block_name}.{self.experts}", experts,
                                   int(getattr(module, "num_experts", None) or self.num_experts(model.config))))
        return layers

    def router_logits(self, output) -> torch.Tensor:
        """Raw router logits (tokens, experts) from the router module's output."""
        if isinstance(output, torch.Tensor):
            return output
        return output[self.router_logits_index]

    def selected_experts(self, output, logits: torch.Tensor, top_k: int) -> torch.Tensor:
        """Indices (tokens, top_k) the model routed to: the router's own choice when it returns one.

        Grouped and biased routers (DeepSeek-V3) choose differently from a
        plain top-k of the logits, so the router's returned indices win.
        """
        if isinstance(output, (tuple, list)) and len(output) >= 3:
            indices = output[2]
            if isinstance(indices, torch.Tensor) and not indices.is_floating_point():
                return indices.reshape(logits.shape[0], -1).long()
        return logits.topk(top_k, dim=-1).indices

    def gate_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert gate probabilities over all experts, the router's own transformation."""
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def expert_output(self, experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Output of one routed expert for tokens ``x`` (tokens, hidden), unweighted by its gate."""
        act = getattr(experts, "act_fn", None) or _ACTIVATIONS[self.activation]
        gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)  # (tokens, I) each
        return F.linear(act(gate) * up, experts.down_proj[expert])  # (tokens, hidden)

    # ------------------------------------------------------------------ forced routing

    @contextlib.contextmanager
    def restrict_routing(self, model: nn.Module, kept: Mapping[int, Sequence[int]]) -> Iterator[None]:
        """Run ``model`` as if only ``kept[layer]`` experts existed in each MoE layer.

        Dropped experts get a router logit of ``-inf`` (and a correction bias
        of ``-inf`` where the family has one), which is exactly how the
        pruned checkpoint routes. Layers missing from ``kept`` are unchanged.
        """
        handles, saved = [], []
        try:
            for layer in self.moe_layers(model):
                if layer.index not in kept:
                    continue
                mask = torch.full((layer.num_experts,), float("-inf"))
                mask[list(kept[layer.index])] = 0.0
                mode = _AddToLinear(layer.router.weight, mask)
                handles.append(layer.router.register_forward_pre_hook(functools.partial(_enter, mode)))
                handles.append(layer.router.register_forward_hook(functools.partial(_exit, mode)))
                if self.correction_bias_attr:
                    bias = getattr(layer.router, self.correction_bias_attr)
                    saved.append((bias, bias.detach().clone()))
                    with torch.no_grad():
                        bias.add_(mask.to(bias.dtype))
            yield
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for tensor, original in saved:
                    tensor.copy_(original)

    # ------------------------------------------------------------------ on-disk layout

    def classify_key(self, key: str) -> tuple[str, int, int | None] | None:
        """How a checkpoint tensor relates to experts.

        Returns ``("expert", layer, e)`` for a per-expert tensor (sliced by
        dropping it and renumbering), ``("rows", layer, None)`` for a tensor
        whose dim 0 indexes experts (fused experts, router weight, biases),
        or ``None`` for tensors that stay as they are.
        """
        block = rf"^.*\.layers\.(?P<layer>\d+)\.{re.escape(self.moe_block)}\."
        match = re.match(block + rf"{re.escape(self.experts)}\.(?P<expert>\d+)\.", key)
        if match:
            return "expert", int(match.group("layer")), int(match.group("expert"))
        match = re.match(block + rf"{re.escape(self.experts)}\.[^.]+$", key)  # fused 3-D experts
        if match:
            return "rows", int(match.group("layer")), None
        router_attrs = ("weight", *self.router_bias_attrs, *((self.correction_bias_attr,) if self.correction_bias_attr else ()))
        match = re.match(block + rf"{re.escape(self.router)}\.(?:{'|'.join(map(re.escape, router_attrs))})$", key)
        if match:
            return "rows", int(match.group("layer")), None
        return None

    def rename_expert_key(self, key: str, old: int, new: int) -> str:
        return key.replace(f".{self.experts}.{old}.", f".{self.experts}.{new}.", 1)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _enter(mode: TorchFunctionMode, module, args) -> None:
    mode.__enter__()  # returns None so the hook leaves the router's inputs alone


def _exit(mode: TorchFunctionMode, module, args, output) -> None:
    mode.__exit__(None, None, None)


class _AddToLinear(TorchFunctionMode):
    """Adds ``delta`` to the output of ``F.linear`` calls whose weight is ``weight``."""

    def __init__(self, weight: torch.Tensor, delta: torch.Tensor):
        super().__init__()
        self.weight, self.delta = weight, delta

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            out = out + self.delta.to(out.dtype)  # (tokens, experts) + (experts,)
        return out


def router_class(model: nn.Module) -> type:
    """The router module class transformers records ``router_logits`` from."""
    from premoe.errors import UnsupportedModelError

    recorders = getattr(model, "_can_record_outputs", None) or {}
    recorder = recorders.get("router_logits")
    if recorder is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} declares no router_logits output, so premoe cannot find its routers; "
            "is this a Mixture-of-Experts model?"
        )
    return getattr(recorder, "target_class", recorder)
