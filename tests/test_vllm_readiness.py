"""A compiled checkpoint is what vLLM's loader for its architecture reads: config fields, expert keys, shapes.

The expectations are data (tests/vllm_expectations.py), read from vLLM's source; vLLM itself cannot run here.
"""
import json

import pytest
from safetensors import safe_open

from checkpoints import save_family, spread_plan
from premoe.compile import compile_checkpoint, kept_experts
from vllm_expectations import EXPECTATIONS


def shapes(path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a single-file or sharded checkpoint, from the headers."""
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out


def layer_keys(template: str, layer: int, expert: int | None = None) -> str:
    return f"model.layers.{layer}." + template.format(expert=expert)


@pytest.fixture(scope="module", params=sorted(EXPECTATIONS))
def compiled(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    path, model, adapter = save_family(family, tmp / "src")
    plan = spread_plan(path, model, adapter)
    compile_checkpoint(path, plan, tmp / "out", progress=False)
    return family, EXPECTATIONS[family], path, tmp / "out"


def test_config_has_the_fields_vllm_reads(compiled):
    family, expect, _, out = compiled
    config = json.loads((out / "config.json").read_text())
    kept = kept_experts(out)
    m = len(next(iter(kept.values())))
    assert config["architectures"] == [expect.architecture]
    assert config[expect.count_key] == m, f"{family}: vLLM reads {expect.count_key}"
    for key in expect.also_count_keys:  # Qwen3-MoE: num_experts (vLLM, transformers 4) and num_local_experts (5)
        assert config[key] == m, key
    assert 1 <= config[expect.topk_key] <= m
    if expect.group_keys:
        n_group, topk_group = (config[k] for k in expect.group_keys)
        assert m % n_group == 0 and topk_group <= n_group


def test_expert_tensors_are_where_vllm_looks(compiled):
    family, expect, source, out = compiled
    before, after = shapes(source), shapes(out)
    kept = kept_experts(out)
    for layer, experts in kept.items():
        m = len(experts)
        for template in expect.router_rows:
            key = layer_keys(template, layer)
            assert after[key][0] == m and after[key][1:] == before[key][1:], key
        for template in expect.expert_keys:
            if expect.fused:
                key = layer_keys(template, layer)
                assert after[key] == (m, *before[key][1:]), key
                continue
            for expert in range(m):  # vLLM's mapping asks for experts 0..count-1, renumbered
                key = layer_keys(template, layer, expert)
                assert after[key] == before[layer_keys(template, layer, experts[expert])], key
            assert layer_keys(template, layer, m) not in after, "an expert beyond the count would be ignored"

