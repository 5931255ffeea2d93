"""What premoe needs to know about one Mixture-of-Experts family.

An adapter is a frozen dataclass: where the router and experts live (module
names in memory and tensor names on disk), how the router scores, which
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

:func:`prune_in_memory` is the other half of that oracle: it slices a loaded
model down to the kept experts, using only what the adapter knows.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from premoe.errors import CheckpointError, PlanError, UnsupportedModelError

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# module attributes transformers uses for a block's / router's / experts' own routed-expert count
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _joined(keys: list[str]) -> str | None:
    """``keys`` one a line, for one multi-line regex pass; None when a key holds a line break itself."""
    lines = "\n".join(keys)
    return lines if lines.count("\n") == max(len(keys) - 1, 0) else None


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a loaded model."""

    index: int  # decoder layer index (dense layers are skipped, so not always 0..L-1)
    router_name: str  # module path, e.g. "model.layers.3.mlp.gate"
    router: nn.Module
    experts_name: str
    experts: nn.Module
    num_experts: int
    block: nn.Module | None = None  # the sparse block holding router and experts (and a correction bias)


@dataclass(frozen=True)
class MoEAdapter:
    """Per-family knowledge. Defaults describe the common transformers-5 layout.

    In memory every supported family keeps its routed experts fused in one
    module (``experts.gate_up_proj`` / ``experts.down_proj``, dim 0 = expert)
    next to a router whose ``weight`` rows are the experts. On disk the names
    can differ (Mixtral writes ``block_sparse_moe.experts.{i}.w1``): the
    ``disk_*`` fields say so.
    """

    name: str  # family name shown to users
    model_types: tuple[str, ...]  # config.model_type values this adapter serves
    expert_count_keys: tuple[str, ...]  # config fields holding the routed expert count (all rewritten)
    top_k_key: str = "num_experts_per_tok"
    # the model_type transformers builds this family as, when config.json names one transformers does not register
    # (Kimi-K2 ships model_type "kimi_k2" with DeepSeek-V3's modules and custom code premoe never runs); None: itself
    transformers_model_type: str | None = None
    scoring: str = "softmax"  # "softmax" or "sigmoid": how router logits become gate probabilities
    norm_topk_key: str | None = "norm_topk_prob"  # None: the family's renormalisation is fixed (always_renormalises)
    always_renormalises: bool = True  # used when norm_topk_key is None
    moe_block: str = "mlp"  # decoder-layer attribute of the sparse block (in memory)
    router: str = "gate"  # block attribute of the router
    experts: str = "experts"  # block attribute of the experts container
    router_weight: str = "weight"  # router-relative parameter whose F.linear gives the logits (HunYuan "wg.weight")
    router_bias_attrs: tuple[str, ...] = ()  # router-relative per-expert vectors added to the logits, e.g. "bias"
    correction_bias: str | None = None  # block-relative bias added to scores for choice only (DeepSeek-V3 noaux_tc)
    correction_bias_added_to: str = "gate"  # the choice score is "gate" prob + bias (DeepSeek-V3) or "logit" + bias
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) for grouped routing
    shared_expert_attrs: tuple[str, ...] = ()  # block attributes of always-on experts (never pruned)
    dense_layer_keys: tuple[str, ...] = ()  # config fields that make some layers dense (informational)
    fused_on_disk: bool = False  # experts stored as 3-D tensors in the checkpoint files
    disk_blocks: tuple[str, ...] = ()  # on-disk names of the sparse block; () = moe_block
    disk_router_tensors: tuple[str, ...] = ()  # block-relative on-disk router rows; () = the in-memory names
    disk_fused_experts: tuple[str, ...] = ()  # block-relative fused expert tensors outside `experts.` on disk
    # block-relative on-disk tensor ("*": expert index) -> (block-relative in-memory tensor, chunk, chunks of its
    # expert slice); transformers 5 stacks per-expert gate/up [I, H] into gate_up_proj [E, 2I, H], gate first
    disk_to_memory: tuple[tuple[str, str, int, int], ...] = (
        ("experts.*.gate_proj.weight", "experts.gate_up_proj", 0, 2),
        ("experts.*.up_proj.weight", "experts.gate_up_proj", 1, 2),
        ("experts.*.down_proj.weight", "experts.down_proj", 0, 1))
    router_logits_index: int = 0  # where the logits sit in the router's output tuple
    expert_layout: str = "linear"  # "linear": gate_up_proj (E, 2I, H) used by F.linear; "matmul": (E, H, 2I), x @ W
    activation: str = "silu"  # fallback expert activation when the experts module has no act_fn
    # multi-token-prediction (MTP) layers: shards of DeepSeek-V3/R1 and GLM-4.5 carry num_nextn_predict_layers
    # extra layers numbered after the last decoder layer (model.layers.61.* for 61 decoder layers: a full decoder
    # layer plus enorm, hnorm, eh_proj, shared_head, embed_tokens) that transformers does not load but vLLM/SGLang
    # read for speculative decoding. () = the family ships none.
    mtp_count_keys: tuple[str, ...] = ()  # config fields holding the MTP layer count (all rewritten)
    decoder_layers_key: str = "model.layers"  # on-disk prefix of the decoder layers; MTP layers continue it
    notes: tuple[str, ...] = ()  # facts shown by `premoe profile show` / verify

    # ------------------------------------------------------------------ config

    def num_experts(self, config) -> int:
        """Routed experts per layer, from a transformers config or a config.json dict."""
        text = self._text_config(config)
        for key in self.expert_count_keys:
            value = _get(text, key)
            if _positive_int(value):
                return value
        raise UnsupportedModelError(f"{self.name} config sets none of {', '.join(self.expert_count_keys)}; "
                                    "is this config.json complete?")

    def check_counts(self, config, where: str = "config.json") -> None:
        """Refuse expert, top-k and layer counts this family cannot be built with (a corrupt or hand-edited config)."""
        text = self._text_config(config)
        for key in self.expert_count_keys:
            value = _get(text, key)
            if value is not None and not _positive_int(value):
                raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}; restore the "
                                      "checkpoint's config.json")
        num, k = self.num_experts(config), _get(text, self.top_k_key)
        if not _positive_int(k) or k > num:
            raise CheckpointError(f"{where}: {self.top_k_key} must be an integer in 1..{num} (the expert count), got "
                                  f"{k!r}; restore the checkpoint's config.json")
        self.num_hidden_layers(config)

    def top_k(self, config) -> int:
        return int(_get(self._text_config(config), self.top_k_key))

    def renormalises_top_k(self, config) -> bool:
        if self.norm_topk_key is None:
            return self.always_renormalises
        return bool(_get(self._text_config(config), self.norm_topk_key))

    def groups(self, config) -> tuple[int, int]:
        """(n_group, topk_group); (1, 1) for ungrouped routers."""
        if not self.group_keys:
            return 1, 1
        n_group, topk_group = (_get(self._text_config(config), k) or 1 for k in self.group_keys)
        return int(n_group), int(topk_group)

    def gate_changes_when_pruned(self, config) -> bool:
        """True when dropping experts changes the kept experts' gate weights.

        A softmax over *all* experts without top-k renormalisation (Qwen2-MoE,
        OLMoE with ``norm_topk_prob=False``, DeepSeek-V2) gives the kept
        experts a larger share of the probability mass once the others are gone.
        """
        return self.scoring == "softmax" and not self.renormalises_top_k(config)

    def config_updates(self, config, num_kept: int) -> dict:
        """Config fields to write for a checkpoint that keeps ``num_kept`` experts per layer.

        Every name the family's loaders read is written (Qwen3-MoE: transformers 5
        reads ``num_local_experts``, 4.x and vLLM ``num_experts``). Multimodal
        configs keep the counts in ``text_config``; the update is then nested:

        >>> get_adapter({"model_type": "qwen3_moe"}).config_updates({"num_local_experts": 128}, 64)
        {'num_local_experts': 64, 'num_experts': 64}
        """
        return self._nested(config, {key: num_kept for key in self.expert_count_keys})

    def _nested(self, config, updates: dict) -> dict:
        """``updates`` placed where the counts live: top level, or inside ``text_config`` for multimodal configs."""
        if self._text_config(config) is not config:
            return {"text_config": updates}
        return updates

    # ------------------------------------------------------------------ multi-token-prediction layers

    def num_hidden_layers(self, config) -> int:
        """Decoder layers transformers builds; on-disk layers from this index on are MTP layers."""
        value = _get(self._text_config(config), "num_hidden_layers")
        if not isinstance(value, int) or value < 0:
            raise UnsupportedModelError(f"{self.name} config has no valid num_hidden_layers (got {value!r}); "
                                        "is this config.json complete?")
        return value

    def mtp_layer(self, key: str, config) -> int | None:
        """The MTP layer checkpoint tensor ``key`` belongs to, or None for a tensor of the model proper.

        >>> DEEPSEEK_V3.mtp_layer("model.layers.61.eh_proj.weight", {"num_hidden_layers": 61})
        61
        """
        return self.mtp_layers([key], config).get(key)

    def mtp_layers(self, keys: Iterable[str], config) -> dict[str, int]:
        """Of ``keys``, those in MTP layers, with their layer: :meth:`mtp_layer` for a whole checkpoint at once.

        >>> DEEPSEEK_V3.mtp_layers(["model.layers.60.mlp.gate.weight", "model.layers.61.eh_proj.weight"],
        ...                        {"num_hidden_layers": 61})
        {'model.layers.61.eh_proj.weight': 61}
        """
        if not self.mtp_count_keys:
            return {}
        keys = list(keys)
        lines = _joined(keys)
        if lines is None:  # a key holding a line break: one at a time
            layered = [(key, m.group(1)) for key in keys if (m := self._decoder_layer.match(key))]
        else:  # one regex pass over all keys, in C: DeepSeek-V3 has ~90k
            layered = self._decoder_layer_lines.findall(lines)
        if not layered:
            return {}
        first = self.num_hidden_layers(config)  # read only when some key is a layer's
        return {key: n for key, layer in layered if (n := int(layer)) >= first}

    def mtp_declared(self, config) -> int:
        """How many MTP layers the config says the checkpoint carries (0 when it says nothing)."""
        text = self._text_config(config)
        for key in self.mtp_count_keys:
            value = _get(text, key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0

    def mtp_config_updates(self, config, count: int) -> dict:
        """Config fields to write for a checkpoint carrying ``count`` MTP layers (every name the config uses).

        A config that names no count and gets none keeps silent (``{}``).

        >>> DEEPSEEK_V3.mtp_config_updates({"num_nextn_predict_layers": 1}, 0)
        {'num_nextn_predict_layers': 0}
        """
        text = self._text_config(config)
        present = [key for key in self.mtp_count_keys if _get(text, key) is not None]
        if not present and count:
            present = list(self.mtp_count_keys[:1])
        return self._nested(config, {key: count for key in present}) if present else {}

    @functools.cached_property
    def _decoder_layer(self) -> re.Pattern:
        return re.compile(rf"^{re.escape(self.decoder_layers_key)}\.(\d+)\.")

    @functools.cached_property
    def _decoder_layer_lines(self) -> re.Pattern:
        """:attr:`_decoder_layer` over keys joined one a line: (key, layer) per decoder-layer key."""
        return re.compile(rf"^({re.escape(self.decoder_layers_key)}\.(\d+)\..*)$", re.MULTILINE)

    def check_kept(self, config, kept: Mapping[int, Sequence[int]]) -> None:
        """Refuse kept sets the architecture cannot route (DESIGN.md §4 pitfalls), naming the fix."""
        num, k = self.num_experts(config), self.top_k(config)
        n_group, topk_group = self.groups(config)
        for layer, experts in kept.items():
            experts = list(experts)
            if len(set(experts)) != len(experts) or not all(0 <= e < num for e in experts):
                raise PlanError(f"layer {layer}: kept experts {experts} must be distinct indices in 0..{num - 1}")
            if len(experts) < k:
                raise PlanError(f"layer {layer} keeps {len(experts)} experts, fewer than top-k = {k}; keep ≥ {k}")
            if n_group > 1:
                size = num // n_group
                per_group = [sum(1 for e in experts if e // size == g) for g in range(n_group)]
                if len(set(per_group)) != 1 or per_group[0] < 2 or k > topk_group * per_group[0]:
                    raise PlanError(
                        f"layer {layer} keeps {per_group} experts per group; grouped routing needs the same number "
                        f"in each of the {n_group} groups, at least 2, and top-k {k} ≤ topk_group {topk_group} × "
                        "that number")

    def _text_config(self, config):
        """The (sub)config holding the expert counts: ``text_config`` for multimodal wrappers."""
        if any(_get(config, key) is not None for key in self.expert_count_keys):
            return config
        return _get(config, "text_config") or config

    # ------------------------------------------------------------------ modules

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """The MoE layers of a loaded model, in order, found from its router modules."""
        router_cls = router_recorder(model)[0]
        layers = []
        for name, module in model.named_modules():
            if not isinstance(module, router_cls):
                continue
            block_name = name.rsplit(".", 1)[0]
            block = model.get_submodule(block_name)
            experts = getattr(block, self.experts, None)
            index = layer_index(name)
            if experts is None or index is None:
                continue
            num = module.get_parameter(self.router_weight).shape[0]
            layers.append(MoELayer(index, name, module, f"{block_name}.{self.experts}", experts, num, block))
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
        if self.expert_layout == "matmul":  # Llama4: (E, H, 2I) and (E, I, H)
            gate, up = (x @ experts.gate_up_proj[expert]).chunk(2, dim=-1)  # (tokens, I) each
            return (act(gate) * up) @ experts.down_proj[expert]  # (tokens, hidden)
        gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)  # (tokens, I) each
        return F.linear(act(gate) * up, experts.down_proj[expert])  # (tokens, hidden)

    def correction_bias_of(self, layer: MoELayer) -> torch.Tensor | None:
        """The layer's choice-only score bias (experts on its last axis), if the family has one."""
        if not self.correction_bias or layer.block is None:
            return None
        return _get_tensor(layer.block, self.correction_bias)

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
                mask = torch.full((layer.num_experts,), float("-inf"))  # (experts,)
                mask[list(kept[layer.index])] = 0.0
                mode = _AddToLinear(layer.router.get_parameter(self.router_weight), mask)
                handles.append(layer.router.register_forward_pre_hook(functools.partial(_enter, mode)))
                handles.append(layer.router.register_forward_hook(functools.partial(_exit, mode)))
                bias = self.correction_bias_of(layer)
                if bias is not None:
                    saved.append((bias, bias.detach().clone()))
                    with torch.no_grad():
                        bias.add_(mask.to(bias.dtype))  # (..., experts) + (experts,)
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
        that indexes experts along one axis (fused experts, router weight and
        biases; cut it with :meth:`slice_rows`), or ``None`` for tensors that
        stay as they are (attention, shared experts, dense MLPs, norms).

        >>> get_adapter({"model_type": "mixtral"}).classify_key("model.layers.3.block_sparse_moe.experts.7.w1.weight")
        ('expert', 3, 7)
        """
        match = self._disk_block.match(key)
        if not match:
            return None
        layer, rest = int(match.group("layer")), match.group("rest")
        expert = self._expert_prefix.match(rest)
        if expert:
            return "expert", layer, int(expert.group(1))
        if rest.startswith(f"{self.experts}.") or rest in self.disk_fused_experts or rest in self._disk_router_rows:
            return "rows", layer, None
        return None

    def classify_keys(self, keys: Iterable[str]) -> dict[str, tuple[str, int, int | None]]:
        """:meth:`classify_key` of many keys at once: the keys that relate to experts, with their kind.

        One regex pass over the keys joined one a line, in C, instead of two
        matches per key in Python: DeepSeek-V3 has ~90k keys.

        >>> get_adapter({"model_type": "mixtral"}).classify_keys(["model.layers.3.block_sparse_moe.experts.7.w1.weight",
        ...                                                       "model.norm.weight"])
        {'model.layers.3.block_sparse_moe.experts.7.w1.weight': ('expert', 3, 7)}
        """
        keys = list(keys)
        lines = _joined(keys)
        if lines is None:  # a key holding a line break: one at a time
            return {key: kind for key in keys if (kind := self.classify_key(key)) is not None}
        rows_prefix, rows_names = f"{self.experts}.", {*self.disk_fused_experts, *self._disk_router_rows}
        found: dict[str, tuple[str, int, int | None]] = {}
        for key, layer, expert, rest in self._disk_block_lines.findall(lines):
            if expert:
                found[key] = ("expert", int(layer), int(expert))
            elif rest.startswith(rows_prefix) or rest in rows_names:
                found[key] = ("rows", int(layer), None)
        return found

    def rename_expert_key(self, key: str, old: int, new: int) -> str:
        return key.replace(f".{self.experts}.{old}.", f".{self.experts}.{new}.", 1)

    @staticmethod
    def expert_axis(shape: Sequence[int]) -> int:
        """The axis of a "rows" tensor that indexes experts: 0, or 1 for a correction bias stored (1, E) (Ernie)."""
        return 1 if len(shape) == 2 and shape[0] == 1 else 0

    def slice_rows(self, tensor: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
        """Keep the ``kept`` experts of a "rows" tensor, in the given order.

        >>> adapter.slice_rows(torch.zeros(128, 2048), [3, 7]).shape  # a router weight
        torch.Size([2, 2048])
        """
        index = torch.as_tensor(list(kept), dtype=torch.long, device=tensor.device)
        return tensor.index_select(self.expert_axis(tensor.shape), index).contiguous()

    def memory_place(self, key: str) -> tuple[str, int, int]:
        """Where expert or router tensor ``key`` of the checkpoint lives in the loaded sparse block.

        Returns ``(path, part, parts)``: ``path`` is relative to the block;
        expert e's on-disk tensor (or its slice of a "rows" tensor, along
        :meth:`expert_axis`) is chunk ``part`` of ``parts`` equal chunks of the
        in-memory tensor's expert-e slice, cut along that slice's first dim.
        The expert bank (premoe.bank) reads experts from disk into place with it.

        >>> QWEN3_MOE.memory_place("model.layers.0.mlp.experts.5.up_proj.weight")
        ('experts.gate_up_proj', 1, 2)
        """
        match = self._disk_block.match(key)
        if not match or self.classify_key(key) is None:
            raise KeyError(f"{key} is not an expert or router tensor of a {self.name} checkpoint")
        rest = re.sub(rf"^{re.escape(self.experts)}\.\d+\.", f"{self.experts}.*.", match.group("rest"))
        for disk, memory, part, parts in self.disk_to_memory:
            if rest == disk:
                return memory, part, parts
        if rest in self._disk_router_rows:
            return self._memory_router_rows[self._disk_router_rows.index(rest)], 0, 1
        if rest.startswith(f"{self.experts}.*."):
            raise KeyError(f"{key}: per-expert tensor with no in-memory place; add it to {self.name}'s disk_to_memory")
        return rest, 0, 1  # fused on disk as in memory

    @functools.cached_property
    def _disk_block(self) -> re.Pattern:
        blocks = "|".join(map(re.escape, self.disk_blocks or (self.moe_block,)))
        return re.compile(rf"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?:{blocks})\.(?P<rest>.+)$")

    @functools.cached_property
    def _disk_block_lines(self) -> re.Pattern:
        """:attr:`_disk_block` then :attr:`_expert_prefix` on its rest, over keys joined one a line:
        (key, layer, expert or "", rest after the expert prefix) per key in a sparse block."""
        blocks = "|".join(map(re.escape, self.disk_blocks or (self.moe_block,)))
        expert = rf"(?:{re.escape(self.experts)}\.(\d+)\.)?"
        return re.compile(rf"^((?:.*\.)?layers\.(\d+)\.(?:{blocks})\.(?=.){expert}(.*))$", re.MULTILINE)

    @functools.cached_property
    def _expert_prefix(self) -> re.Pattern:
        return re.compile(rf"{re.escape(self.experts)}\.(\d+)\.")  # compiled once: classify_key runs per tensor

    @functools.cached_property
    def _disk_router_rows(self) -> tuple[str, ...]:
        return self.disk_router_tensors or self._memory_router_rows

    @functools.cached_property
    def _memory_router_rows(self) -> tuple[str, ...]:
        """Block-relative in-memory router rows, in the order of ``disk_router_tensors``."""
        in_router = (self.router_weight, *self.router_bias_attrs)
        return (*(f"{self.router}.{name}" for name in in_router), *((self.correction_bias,) if self.correction_bias
                                                                   else ()))


def prune_in_memory(model: nn.Module, adapter: MoEAdapter, kept: Mapping[int, Sequence[int]]) -> nn.Module:
    """Slice ``model`` in place to the ``kept`` experts of each MoE layer and return it.

    Every parameter and buffer of the experts module whose dim 0 is the expert
    count, the router's weight and per-expert biases, and the correction bias
    are cut to the kept experts (in ascending order, as a compiled checkpoint
    numbers them); the modules' own expert-count attributes follow, and so does
    the config when every MoE layer keeps the same number. The result routes
    exactly like ``adapter.restrict_routing(model, kept)`` (tested per family).
    Deep-copy the model first to keep the original::

        small = prune_in_memory(copy.deepcopy(model), adapter, {3: [0, 5, 9, 12]})
    """
    layers = adapter.moe_layers(model)
    adapter.check_kept(model.config, kept)
    for layer in layers:
        if layer.index not in kept:
            continue
        index = torch.as_tensor(sorted(kept[layer.index]), dtype=torch.long)  # (kept,)
        _slice_module(layer.experts, layer.num_experts, index)
        for name in (adapter.router_weight, *adapter.router_bias_attrs):
            _slice_tensor(layer.router, name, 0, index)
        if adapter.correction_bias and layer.block is not None:
            _slice_tensor(layer.block, adapter.correction_bias, -1, index)
        for module in (layer.block or layer.router).modules():
            for attr in _COUNT_ATTRS:
                if getattr(module, attr, None) == layer.num_experts:
                    setattr(module, attr, len(index))
    counts = {len(kept[l.index]) if l.index in kept else l.num_experts for l in layers}
    if len(counts) == 1:
        _apply_updates(model.config, adapter.config_updates(model.config, counts.pop()))
    return model


def _slice_module(experts: nn.Module, num: int, index: torch.Tensor) -> None:
    for name, tensor in [*experts.named_parameters(), *experts.named_buffers()]:
        if tensor.dim() and tensor.shape[0] == num:
            _slice_tensor(experts, name, 0, index)


def _slice_tensor(root: nn.Module, path: str, axis: int, index: torch.Tensor) -> None:
    owner_name, _, attr = path.rpartition(".")
    owner = root.get_submodule(owner_name)
    tensor = getattr(owner, attr)
    sliced = tensor.detach().index_select(axis % tensor.dim(), index.to(tensor.device)).contiguous()
    if isinstance(tensor, nn.Parameter):
        setattr(owner, attr, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        owner.register_buffer(attr, sliced, persistent=attr not in owner._non_persistent_buffers_set)


def _apply_updates(config, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict):
            _apply_updates(getattr(config, key), value)
        else:
            setattr(config, key, value)


def layer_index(name: str) -> int | None:
    """The decoder layer a module or tensor name belongs to (``...layers.N....``), or None outside the layers."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _get(config, key: str):
    """A field of a transformers config or of a config.json dict."""
    if config is None:
        return None
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _get_tensor(root: nn.Module, path: str) -> torch.Tensor:
    owner_name, _, attr = path.rpartition(".")
    return getattr(root.get_submodule(owner_name), attr)


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


def router_recorder(model: nn.Module) -> tuple[type, int]:
    """The router class transformers records ``router_logits`` from, and the logits' index in its output.

    Causal-LM wrappers (Llama4ForCausalLM) leave the declaration on the inner
    model, so every submodule is asked.
    """
    for module in model.modules():
        recorder = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None:
            return getattr(recorder, "target_class", recorder), int(getattr(recorder, "index", 0) or 0)
    raise UnsupportedModelError(
        f"{type(model).__name__} declares no router_logits output, so premoe cannot find its routers: it is not a "
        "Mixture-of-Experts model premoe knows (a dense model has no experts to prune)"
    )
