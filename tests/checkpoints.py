"""Helpers for compile/verify tests: saved tiny checkpoints, hand-made plans, the forced-routing comparison."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny
from premoe.adapters import get_adapter
from premoe.errors import UnsupportedModelError
from premoe.modeling import model_identity
from premoe.plan import Plan


def save_family(family: str, path: Path, dtype=torch.float32, overrides: dict | None = None, **save_kwargs):
    """Save a tiny ``family`` checkpoint whose router biases are random too; returns (path, model, adapter).

    The default init leaves router biases and DeepSeek-style correction biases
    at zero, which would hide a bias sliced along the wrong axis. The model
    returned is the saved one read back in fp32 (a bf16 round trip in memory
    would also round buffers such as rotary frequencies, which loading recomputes).
    """
    model = tiny.build(family, **(overrides or {}))  # overrides: config fields
    try:
        adapter = get_adapter(model.config)
    except UnsupportedModelError as e:
        pytest.skip(f"{family} cannot be compiled: {e}")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter.moe_layers(model):
            vectors = [layer.router.get_parameter(name) for name in adapter.router_bias_attrs]
            vectors.append(adapter.correction_bias_of(layer))
            for vector in filter(lambda v: v is not None, vectors):
                vector.copy_(torch.randn(vector.shape, generator=generator) * 0.5)
    model.to(dtype).save_pretrained(path, **save_kwargs)
    tiny.tiny_tokenizer().save_pretrained(path)
    from transformers import AutoModelForCausalLM

    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), adapter


def spread_plan(path: Path, model, adapter, kept: dict[int, list[int]] | None = None) -> Plan:
    """A plan keeping half the experts of every layer (at least top-k), different ones per layer, even per group."""
    layers = adapter.moe_layers(model)
    num, k = layers[0].num_experts, adapter.top_k(model.config)
    n_group = adapter.groups(model.config)[0]
    size = num // n_group
    per_group = max(size // 2, -(-k // n_group))
    if kept is None:
        kept = {l.index: sorted(g * size + (l.index + 2 * j) % size for g in range(n_group) for j in range(per_group))
                for l in layers}
    order = {layer: experts + [e for e in range(num) if e not in experts] for layer, experts in kept.items()}
    return Plan(model_identity(path), adapter.name, num, k, [l.index for l in layers], kept, order,
                {"scorer": "test", "ranking": "local"}, "specialist:test", {})


def forced_difference(compiled, original, adapter, kept: dict[int, list[int]]) -> tuple[float, float]:
    """(max |Δlogit| to the forced-routing original, max |Δlogit| to the full original) on random tokens."""
    ids = torch.randint(0, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))  # (batch, seq)
    with torch.no_grad():
        got = compiled(input_ids=ids).logits  # (batch, seq, vocab)
        full = original(input_ids=ids).logits
        with adapter.restrict_routing(original, kept):
            forced = original(input_ids=ids).logits
    return float((got - forced).abs().max()), float((got - full).abs().max())
