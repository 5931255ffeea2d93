"""A compiled checkpoint is what vLLM's loader for its architecture reads: config fields, expert keys, shapes.

The expectations are data (tests/vllm_expectations.py), read from vLLM's source; vLLM itself cannot run here.
Every family of tests/tiny.py is compiled (half its experts kept) and checked against its entry.
"""
import json

import pytest
from safetensors import safe_open

import tiny
from checkpoints import save_family, spread_plan
from premoe.compile import compile_checkpoint, kept_experts
from vllm_expectations import EXPECTATIONS, NO_VLLM


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


def intermediate_size(expect, config: dict) -> int | None:
    """The expert hidden size vLLM sizes FusedMoE with: the first of ``intermediate_keys`` the config sets."""
    return next((config[k] for k in expect.intermediate_keys if config.get(k) is not None), None)


def symbolic_shape(symbols: tuple[str, ...], experts: int, hidden: int, inner: int) -> tuple[int, ...]:
    """``("E", "2I", "H")`` -> ``(experts, 2 * inner, hidden)``."""
    value = {"E": experts, "H": hidden, "I": inner, "2I": 2 * inner}
    return tuple(value[s] for s in symbols)


def test_every_family_has_an_entry_or_a_reason():
    assert not set(EXPECTATIONS) & set(NO_VLLM)
    assert set(tiny.FAMILIES) == set(EXPECTATIONS) | set(NO_VLLM)
    assert all(reason for reason in NO_VLLM.values())


@pytest.mark.parametrize("family", sorted(EXPECTATIONS))
def test_expectation_is_complete(family):
    expect = EXPECTATIONS[family]
    assert ".py" in expect.source or "registry" in expect.source  # names the vLLM file it was read from
    assert len(expect.expert_shapes) == len(expect.expert_keys)
    # fused tensors hold every expert on dim 0; per-expert tensors have no expert dimension
    assert all((shape[0] == "E") == expect.fused and shape.count("E") <= 1 for shape in expect.expert_shapes)
    assert expect.intermediate_keys


@pytest.fixture(scope="module", params=sorted(EXPECTATIONS))
def compiled(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    path, model, adapter = save_family(family, tmp / "src")
    plan = spread_plan(path, model, adapter)
    compile_checkpoint(path, plan, tmp / "out", progress=False)
    return family, EXPECTATIONS[family], path, tmp / "out"


def test_config_has_the_fields_vllm_reads(compiled):
    family, expect, source, out = compiled
    config = json.loads((out / "config.json").read_text())
    before = json.loads((source / "config.json").read_text())
    kept = kept_experts(out)
    m = len(next(iter(kept.values())))
    # vLLM dispatches on architectures[0]; compile keeps the source's (a transformers save may spell it otherwise)
    assert config["architectures"] == before["architectures"] == [expect.transformers_architecture
                                                                 or expect.architecture]
    assert config[expect.count_key] == m, f"{family}: vLLM reads {expect.count_key}"
    for key in expect.also_count_keys:  # the other name of the count, e.g. Qwen3-MoE's for transformers 5
        assert config[key] == m, key
    assert 1 <= config[expect.topk_key] <= m
    if expect.group_keys:
        n_group, topk_group = (config[k] for k in expect.group_keys)
        assert m % n_group == 0 and topk_group <= n_group
    inner = intermediate_size(expect, config)
    assert inner is not None or set(expect.intermediate_keys) <= set(expect.config_gaps), \
        f"{family}: config sets none of {expect.intermediate_keys}"
    for key in expect.config_gaps:  # fields vLLM reads that compile must carry through untouched
        assert config.get(key) == before.get(key), key


def test_expert_tensors_are_where_vllm_looks(compiled):
    family, expect, source, out = compiled
    before, after = shapes(source), shapes(out)
    config = json.loads((out / "config.json").read_text())
    inner = intermediate_size(expect, config)
    kept = kept_experts(out)
    for layer, experts in kept.items():
        m = len(experts)
        for template in expect.router_rows:
            key = layer_keys(template, layer)
            assert after[key][0] == m and after[key][1:] == before[key][1:], key
        for template in expect.router_cols:
            key = layer_keys(template, layer)
            assert after[key][-1] == m and after[key][:-1] == before[key][:-1], key
        for template in expect.shared_keys:
            key = layer_keys(template, layer)
            assert after[key] == before[key], key
        for template, symbols in zip(expect.expert_keys, expect.expert_shapes):
            if expect.fused:
                key = layer_keys(template, layer)
                assert after[key] == (m, *before[key][1:]), key
                if inner is not None:
                    assert after[key] == symbolic_shape(symbols, m, config["hidden_size"], inner), key
                continue
            for expert in range(m):  # vLLM's mapping asks for experts 0..count-1, renumbered
                key = layer_keys(template, layer, expert)
                assert after[key] == before[layer_keys(template, layer, experts[expert])], key
                if inner is not None:
                    assert after[key] == symbolic_shape(symbols, m, config["hidden_size"], inner), key
            assert layer_keys(template, layer, m) not in after, "an expert beyond the count would be ignored"


@pytest.mark.parametrize("family", sorted(f for f, e in EXPECTATIONS.items() if e.also_count_keys))
def test_a_config_naming_the_count_as_vllm_does_compiles(family, tmp_path):
    """A release's config.json may carry only vLLM's name of the count (Kolibri-1: num_experts, which
    transformers aliases to num_local_experts); compile must read it and write every name."""
    expect = EXPECTATIONS[family]
    path, model, adapter = save_family(family, tmp_path / "src")
    config = json.loads((path / "config.json").read_text())
    count = config[expect.also_count_keys[0]]
    for key in expect.also_count_keys:
        del config[key]
    config[expect.count_key] = count
    (path / "config.json").write_text(json.dumps(config))
    compile_checkpoint(path, spread_plan(path, model, adapter), tmp_path / "out", progress=False)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    m = len(next(iter(kept_experts(tmp_path / "out").values())))
    assert m == count // 2
    assert [out[k] for k in (expect.count_key, *expect.also_count_keys)] == [m] * (1 + len(expect.also_count_keys))
