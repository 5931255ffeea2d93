"""An adapter guessed from the model itself, for families premoe has no entry for.

transformers 5 MoE models mostly share one layout: a router recorded as
``router_logits`` whose parent block also holds ``experts`` with fused
``gate_up_proj`` / ``down_proj`` tensors. When an unknown ``model_type`` has
that layout, :func:`generic_adapter` builds the model on the meta device (no
memory, no weights), reads the layout off it, guesses the config keys and
warns naming every guess. Anything missing raises
:class:`~premoe.errors.UnsupportedModelError` naming what was not found.

Example::

    adapter = generic_adapter(AutoConfig.from_pretrained(path))  # UserWarning: ... guessed ...
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from premoe.adapters.base import MoEAdapter, router_recorder
from premoe.errors import UnsupportedModelError

COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k")
CORRECTION_BIASES = ("e_score_correction_bias", "expert_bias")


def generic_adapter(config, model: nn.Module | None = None) -> MoEAdapter:
    """An adapter read off ``model`` (or off a meta-device model built from ``config``)."""
    config = _as_config(config)
    model_type = config.model_type
    model = model if model is not None else _meta_model(config)
    router_cls, logits_index = router_recorder(model)
    router_name, router = next(((n, m) for n, m in model.named_modules() if isinstance(m, router_cls)), (None, None))
    if router is None:
        raise UnsupportedModelError(f"model_type {model_type!r}: no {router_cls.__name__} module found in the model")
    block_name, router_attr = router_name.rsplit(".", 1)
    block = model.get_submodule(block_name)
    text = getattr(config, "text_config", None) or config
    stored = text.to_dict()  # the names config.json really uses, not attribute_map aliases
    missing = []
    experts = getattr(block, "experts", None)
    if experts is None or not all(isinstance(getattr(experts, a, None), torch.Tensor)
                                  for a in ("gate_up_proj", "down_proj")):
        missing.append(f"{block_name}.experts with fused gate_up_proj/down_proj tensors")
    count_keys = tuple(k for k in COUNT_KEYS if isinstance(stored.get(k), int))
    top_k_key = next((k for k in TOP_K_KEYS if isinstance(stored.get(k), int)), None)
    if not count_keys:
        missing.append(f"an expert count in the config (one of {', '.join(COUNT_KEYS)})")
    if top_k_key is None:
        missing.append(f"a top-k in the config (one of {', '.join(TOP_K_KEYS)})")
    router_weight = _router_weight(router, stored.get(count_keys[0]) if count_keys else None)
    if router_weight is None:
        missing.append(f"a {router_name} weight holding one row per expert")
    if missing:
        raise UnsupportedModelError(f"model_type {model_type!r} has no premoe adapter and does not have the common "
                                    f"MoE layout: missing {'; '.join(missing)}. Write an adapter in "
                                    "premoe/adapters/families.py")
    correction = _correction_bias(block, router_attr)
    grouped = all(isinstance(stored.get(k), int) for k in ("n_group", "topk_group"))
    sigmoid = correction is not None or stored.get("scoring_func") == "sigmoid"
    # (E, 2I, H) / (E, H, I) for F.linear; (E, H, 2I) / (E, I, H) for x @ W
    matmul = experts.down_proj.shape[1] != stored.get("hidden_size", experts.down_proj.shape[1])
    shared = tuple(n for n, _ in block.named_children() if "shared" in n)
    adapter = MoEAdapter(
        name=f"generic:{model_type}",
        model_types=(model_type,),
        expert_count_keys=count_keys,
        top_k_key=top_k_key,
        scoring="sigmoid" if sigmoid else "softmax",
        norm_topk_key="norm_topk_prob" if "norm_topk_prob" in stored else None,
        moe_block=block_name.rsplit(".", 1)[-1],
        router=router_attr,
        router_weight=router_weight,
        router_bias_attrs=_router_bias(router, router_weight),
        correction_bias=correction,
        group_keys=("n_group", "topk_group") if grouped else None,
        shared_expert_attrs=shared,
        router_logits_index=logits_index,
        expert_layout="matmul" if matmul else "linear",
        notes=("generic adapter: layout read off the model, config keys guessed",),
    )
    warnings.warn(
        f"premoe has no adapter for model_type {model_type!r}; using the common MoE layout with guessed config keys: "
        f"expert count {count_keys[0]!r}, top-k {top_k_key!r}, scoring {adapter.scoring!r}"
        + (", groups ('n_group', 'topk_group')" if grouped else "")
        + (f", correction bias {correction!r}" if correction else "")
        + ". Check the result with `premoe verify`; add an adapter in premoe/adapters/families.py to silence this",
        stacklevel=3,
    )
    return adapter


def _router_weight(router: nn.Module, num_experts: int | None) -> str | None:
    """Router-relative name of its (experts, hidden) logits weight: ``weight`` or a wrapped Linear's."""
    for name, tensor in router.named_parameters():
        if tensor.dim() == 2 and tensor.shape[0] == num_experts:
            return name
    return None


def _router_bias(router: nn.Module, weight: str) -> tuple[str, ...]:
    """The bias beside the logits weight (GPT-OSS style routers), if the router has one."""
    owner, _, _ = weight.rpartition(".")
    path = f"{owner}.bias" if owner else "bias"
    return (path,) if isinstance(getattr(router.get_submodule(owner), "bias", None), torch.Tensor) else ()


def _correction_bias(block: nn.Module, router_attr: str) -> str | None:
    """Block-relative path of a choice-only score bias (on the router or the block), if any."""
    for name in CORRECTION_BIASES:
        for path in (f"{router_attr}.{name}", name):
            owner, _, attr = path.rpartition(".")
            if isinstance(getattr(block.get_submodule(owner), attr, None), torch.Tensor):
                return path
    return None


def _as_config(config):
    """A transformers config from a config object or a config.json dict."""
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig

    model_type = config.get("model_type")
    try:
        return AutoConfig.for_model(**config)
    except ValueError as e:
        raise UnsupportedModelError(f"model_type {model_type!r} is unknown to transformers, so premoe cannot read its "
                                    "layout; upgrade transformers or write an adapter in "
                                    "premoe/adapters/families.py") from e


def _meta_model(config) -> nn.Module:
    """The model built on the meta device: its module tree without allocating weights."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"model_type {config.model_type!r} has no causal-LM class in transformers "
                                    f"({str(e).splitlines()[0]}); premoe prunes decoder MoE models") from e
