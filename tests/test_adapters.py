"""Every adapter against its family's real transformers code, on tiny random models.

Per family (tiny.FAMILIES, plus tiny.GENERIC served by the generic fallback):
1. RouterCapture sees exactly the router logits transformers reports;
2. in-memory pruning reproduces forced routing (dropped experts at -inf);
3. the saved checkpoint's keys are classified, and a checkpoint rewritten
   from classify_key / rename_expert_key / slice_rows / config_updates alone
   loads with plain from_pretrained and reproduces forced routing;
4. expert_output equals the experts module's own forward for one expert.
"""
from __future__ import annotations

import copy
import inspect
import json
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tiny
from premoe import scores
from premoe.adapters import REGISTRY, get_adapter, prune_in_memory
from premoe.adapters.base import router_recorder
from premoe.capture import RouterCapture
from premoe.checkpoint import tensors
from premoe.errors import PlanError, UnsupportedModelError
from premoe.scores import ScorerSpec

ALL = [*tiny.FAMILIES, *tiny.GENERIC]


def _model(family: str):
    """The tiny model and its adapter (generic families warn; that is tested separately)."""
    model = tiny.build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, get_adapter(model.config, model)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, tiny.VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def _kept(adapter, config, layers, seed: int = 0) -> dict[int, list[int]]:
    """A different random kept set per layer: half the experts, the same number per group, ≥ 2 per group."""
    generator = torch.Generator().manual_seed(seed)
    num, k = layers[0].num_experts, adapter.top_k(config)
    n_group, topk_group = adapter.groups(config)
    size = num // n_group
    per_group = max(2, -(-k // topk_group), size // 2) if n_group > 1 else max(k, num // 2)
    return {layer.index: sorted(g * size + i for g in range(n_group)
                                for i in torch.randperm(size, generator=generator)[:per_group].tolist())
            for layer in layers}


# ---------------------------------------------------------------------- 1. router logits


@pytest.mark.parametrize("family", ALL)
def test_capture_sees_transformers_router_logits(family, monkeypatch):
    model, adapter = _model(family)
    recorded: list[tuple[int, torch.Tensor]] = []

    def record(batch):  # a scorer that keeps the raw logits the capture hands it
        recorded.append((batch.layer, batch.logits.clone()))
        return torch.zeros(batch.logits.shape, dtype=torch.float64)

    monkeypatch.setitem(scores.SCORERS, "record", record)
    ids = _ids()
    with torch.no_grad():
        reported = model(input_ids=ids, output_router_logits=True).router_logits
        with RouterCapture(model, adapter, [ScorerSpec("record")]) as capture:
            capture.run(ids)
    layers = adapter.moe_layers(model)
    assert [layer for layer, _ in recorded] == [layer.index for layer in layers]
    assert len(reported) == len(recorded) > 0
    for want, (_, got) in zip(reported, recorded):
        assert got.shape == want.shape == (ids.numel(), layers[0].num_experts)
        torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    routed = capture.stats.routed.sum(1)  # (moe_layers,) each token picks top-k experts
    assert torch.equal(routed, torch.full_like(routed, ids.numel() * adapter.top_k(model.config)))


@pytest.mark.parametrize("family", ALL)
def test_adapter_matches_the_model_declaration(family):
    model, adapter = _model(family)
    assert adapter.router_logits_index == router_recorder(model)[1]
    assert model.config.model_type in adapter.model_types
    layers = adapter.moe_layers(model)
    assert {l.num_experts for l in layers} == {adapter.num_experts(model.config)}
    assert adapter.num_experts(model.config.to_dict()) == adapter.num_experts(model.config)
    assert adapter.top_k(model.config.to_dict()) == adapter.top_k(model.config)


# ---------------------------------------------------------------------- 2. pruning in memory


@pytest.mark.parametrize("family", ALL)
def test_pruned_model_equals_forced_routing(family):
    model, adapter = _model(family)
    layers = adapter.moe_layers(model)
    kept = _kept(adapter, model.config, layers)
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits
        with adapter.restrict_routing(model, kept):
            forced = model(ids).logits
        after = model(ids).logits
        pruned = prune_in_memory(copy.deepcopy(model), adapter, kept)
        small = pruned(ids).logits
    assert torch.equal(after, full), "restrict_routing must restore the model"
    assert (forced - full).abs().max() > 1e-3, "the kept sets should change some routing decision"
    torch.testing.assert_close(small, forced, atol=1e-5, rtol=0)
    m = len(next(iter(kept.values())))
    assert adapter.num_experts(pruned.config) == m
    for layer in adapter.moe_layers(pruned):
        assert layer.num_experts == m
        assert all(t.shape[0] == m for t in layer.experts.parameters())
        assert getattr(layer.router, "num_experts", m) == m


def test_uneven_counts_prune_modules_but_leave_the_config():
    model, adapter = _model("qwen3_moe")
    first, second = (l.index for l in adapter.moe_layers(model))
    kept = {first: [1, 2, 5, 6], second: [0, 2, 3, 4, 5, 7]}  # global ranking keeps more in some layers
    with torch.no_grad(), adapter.restrict_routing(model, kept):
        forced = model(_ids()).logits
    pruned = prune_in_memory(copy.deepcopy(model), adapter, kept)
    with torch.no_grad():
        torch.testing.assert_close(pruned(_ids()).logits, forced, atol=1e-5, rtol=0)
    assert [l.num_experts for l in adapter.moe_layers(pruned)] == [4, 6]
    assert adapter.num_experts(pruned.config) == 8  # one count per config: a vanilla checkpoint needs uniform M


@pytest.mark.parametrize("family, changes", [("qwen2_moe", True), ("olmoe", True), ("deepseek_v2", True),
                                             ("jamba", True), ("qwen3_moe", False), ("mixtral", False),
                                             ("deepseek_v3", False), ("llama4_text", False), ("gpt_oss", False)])
def test_gate_changes_when_pruned_flags_unrenormalised_softmax(family, changes):
    """DESIGN.md §4: a softmax over all experts without top-k renormalisation re-weights the kept experts."""
    config = tiny.FAMILIES[family]()
    assert get_adapter(config).gate_changes_when_pruned(config) is changes


def test_multimodal_config_resolves_through_its_text_config():
    from transformers import Llama4Config

    config = Llama4Config(text_config=tiny.FAMILIES["llama4_text"]().to_dict()).to_dict()
    adapter = get_adapter(config)
    assert adapter.name == "Llama4" and adapter.num_experts(config) == 4 and adapter.top_k(config) == 1
    assert adapter.config_updates(config, 2) == {"text_config": {"num_local_experts": 2}}


def test_prune_refuses_what_the_router_cannot_route():
    model, adapter = _model("deepseek_v3")  # 2 groups of 4, top-2, topk_group 1
    index = adapter.moe_layers(model)[0].index
    for bad in ([0], [0, 1, 2, 4], [0, 4], [0, 0, 4, 5], [0, 1, 4, 9]):
        with pytest.raises(PlanError):
            prune_in_memory(copy.deepcopy(model), adapter, {index: bad})


# ---------------------------------------------------------------------- 3. checkpoint layout


def _expert_bytes_in_memory(model, adapter) -> int:
    """Bytes of every per-expert tensor of the loaded model: experts, router rows, correction bias."""
    total = 0
    for layer in adapter.moe_layers(model):
        vectors = [layer.router.get_parameter(adapter.router_weight),
                   *(getattr(layer.router, b) for b in adapter.router_bias_attrs)]
        bias = adapter.correction_bias_of(layer)
        total += sum(t.numel() for t in [*layer.experts.parameters(), *vectors, *([bias] if bias is not None else [])])
    return total * 4


@pytest.mark.parametrize("family", ALL)
def test_saved_checkpoint_keys_are_classified(family, tmp_path):
    model, adapter = _model(family)
    model.save_pretrained(tmp_path)
    layers = {l.index for l in adapter.moe_layers(model)}
    num = adapter.num_experts(model.config)
    classified = 0
    for key, info in tensors(tmp_path).items():
        kind = adapter.classify_key(key)
        layer = re.search(r"layers\.(\d+)\.", key)
        layer = int(layer.group(1)) if layer else None
        per_expert = re.search(r"\.experts\.(\d+)\.", key)
        if layer in layers and per_expert:
            assert kind == ("expert", layer, int(per_expert.group(1))), key
        elif layer in layers and (info.shape[0] == num or info.shape == (1, num)):  # tiny dims never equal E
            assert kind == ("rows", layer, None), key
            assert info.shape[adapter.expert_axis(info.shape)] == num, key
        else:
            assert kind is None, key
        if kind is not None:
            classified += info.nbytes
    assert classified == _expert_bytes_in_memory(model, adapter)


@pytest.mark.parametrize("family", ALL)
def test_rewritten_checkpoint_loads_and_matches_forced_routing(family, tmp_path):
    """A minimal compile: only adapter methods decide what to drop, rename, slice and rewrite."""
    from transformers import AutoModelForCausalLM

    model, adapter = _model(family)
    kept = _kept(adapter, model.config, adapter.moe_layers(model), seed=3)
    source, target = tmp_path / "source", tmp_path / "target"
    model.save_pretrained(source)
    rewritten = {}
    for key, tensor in load_file(source / "model.safetensors").items():
        kind = adapter.classify_key(key)
        if kind is None:
            rewritten[key] = tensor
        elif kind[0] == "expert":
            if kind[2] in kept[kind[1]]:
                rewritten[adapter.rename_expert_key(key, kind[2], kept[kind[1]].index(kind[2]))] = tensor
        else:
            rewritten[key] = adapter.slice_rows(tensor, kept[kind[1]])
    target.mkdir()
    save_file(rewritten, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.update(adapter.config_updates(config, len(next(iter(kept.values())))))
    (target / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = _ids(2)
    with torch.no_grad(), adapter.restrict_routing(model, kept):
        forced = model(ids).logits
    torch.testing.assert_close(loaded(ids).logits, forced, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- 4. one expert's output


@pytest.mark.parametrize("family", ALL)
def test_expert_output_matches_the_experts_forward(family):
    model, adapter = _model(family)
    layer = adapter.moe_layers(model)[-1]
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    fused_input = len(inspect.signature(layer.experts.forward).parameters) == 1  # Llama4: (E * tokens, hidden)
    for expert in (0, layer.num_experts - 1):
        with torch.no_grad():
            want = adapter.expert_output(layer.experts, expert, x)
            if fused_input:
                routed = torch.zeros(layer.num_experts, *x.shape)  # (experts, tokens, hidden)
                routed[expert] = x
                got = layer.experts(routed.reshape(-1, x.shape[-1])).reshape(routed.shape)[expert]
            else:
                got = layer.experts(x, torch.full((3, 1), expert), torch.ones(3, 1))
        torch.testing.assert_close(want, got, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- errors and the generic fallback


def test_dense_model_is_refused_with_the_reason():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**tiny.COMMON, intermediate_size=64)
    with pytest.raises(UnsupportedModelError, match="router_logits.*Supported families: Qwen3-MoE"):
        get_adapter(config)
    with pytest.raises(UnsupportedModelError, match="router_logits"):
        get_adapter(config.to_dict())
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM declares no router_logits"):
        get_adapter({"model_type": "qwen3_moe"}).moe_layers(model)


def test_unknown_config_dicts_are_refused():
    with pytest.raises(UnsupportedModelError, match="'no_such_moe' is unknown to transformers"):
        get_adapter({"model_type": "no_such_moe", "num_experts": 8})
    with pytest.raises(UnsupportedModelError, match="no model_type"):
        get_adapter({"hidden_size": 32})


def test_moe_without_the_common_layout_names_what_is_missing():
    from transformers import JetMoeConfig

    config = JetMoeConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=2, num_key_value_heads=1,
                          kv_channels=16, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(UnsupportedModelError, match="missing .*experts with fused gate_up_proj/down_proj"):
        get_adapter(config)


@pytest.mark.parametrize("family", tiny.GENERIC)
def test_generic_fallback_warns_naming_its_guesses(family):
    config = tiny.GENERIC[family]()
    with pytest.warns(UserWarning, match=rf"no adapter for model_type '{config.model_type}'.*expert count '\w+', "
                                         rf"top-k '\w+'"):
        adapter = get_adapter(config.to_dict())  # from config.json alone: the layout is read off a meta model
    assert adapter.name == f"generic:{config.model_type}"


def test_mtp_layers_are_the_layers_after_the_last_decoder_layer():
    """DeepSeek-V3/R1 shards hold model.layers.61.* after 61 decoder layers (vLLM deepseek_mtp.py)."""
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 61, "n_routed_experts": 256,
              "num_nextn_predict_layers": 1}
    adapter = get_adapter(config)
    assert adapter.mtp_layer("model.layers.61.eh_proj.weight", config) == 61
    assert adapter.mtp_layer("model.layers.61.mlp.experts.255.down_proj.weight", config) == 61
    assert adapter.mtp_layer("model.layers.62.enorm.weight", config) == 62
    assert adapter.mtp_layer("model.layers.60.mlp.gate.weight", config) is None
    assert adapter.mtp_layer("model.embed_tokens.weight", config) is None
    assert adapter.mtp_layer("lm_head.weight", config) is None
    assert adapter.mtp_declared(config) == 1
    assert adapter.mtp_config_updates(config, 0) == {"num_nextn_predict_layers": 0}
    both = {**config, "num_mtp_layers": 1}  # a transformers-5 spelling beside the original: both rewritten
    assert adapter.mtp_config_updates(both, 0) == {"num_nextn_predict_layers": 0, "num_mtp_layers": 0}
    silent = {k: v for k, v in config.items() if k != "num_nextn_predict_layers"}
    assert adapter.mtp_declared(silent) == 0 and adapter.mtp_config_updates(silent, 0) == {}
    assert adapter.mtp_config_updates(silent, 1) == {"num_nextn_predict_layers": 1}


def test_families_without_mtp_layers_see_none():
    config = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 8}
    adapter = get_adapter(config)
    assert adapter.mtp_count_keys == ()
    assert adapter.mtp_layer("model.layers.2.mlp.experts.0.up_proj.weight", config) is None
    assert adapter.mtp_declared(config) == 0


def test_glm4_moe_mtp_layer():
    config = {"model_type": "glm4_moe", "num_hidden_layers": 92, "n_routed_experts": 160, "num_nextn_predict_layers": 1}
    adapter = get_adapter(config)
    assert adapter.mtp_layer("model.layers.92.shared_head.head.weight", config) == 92
    assert adapter.mtp_layer("model.layers.91.mlp.gate.e_score_correction_bias", config) is None


_KEY_PARTS = ["model", "language_model", "layers", "mlp", "block_sparse_moe", "moe", "experts", "gate", "weight",
              "e_score_correction_bias", "gate_up_proj", "down_proj", "w1", "router", "bias", "0", "3", "07", "61",
              "255", "", "x\ny", "é"]
_PARTS = st.lists(st.sampled_from(_KEY_PARTS), max_size=4).map(".".join)
_KEYS = st.one_of(  # shaped like checkpoint keys (prefix, layer, block, maybe an expert, rest), or any parts at all
    st.tuples(_PARTS, st.sampled_from(["3", "07", "60", "61", "62"]),
              st.sampled_from(["mlp", "block_sparse_moe", "moe"]),
              st.sampled_from(["", "experts.5.", "experts.x.", "experts.0"]), _PARTS)
    .map(lambda t: f"{t[0]}.layers.{t[1]}.{t[2]}.{t[3]}{t[4]}".lstrip(".")),
    st.lists(st.sampled_from(_KEY_PARTS), max_size=9).map(".".join))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(REGISTRY)), st.lists(_KEYS, max_size=12))
def test_keys_classified_at_once_as_one_at_a_time(model_type, keys):
    """classify_keys and mtp_layers (one regex pass over all keys) agree with classify_key and the layer pattern per
    key, for every family, on keys of real and odd shapes (line breaks, leading zeros, empty parts)."""
    adapter, config = REGISTRY[model_type], {"num_hidden_layers": 61, "num_nextn_predict_layers": 1}
    assert adapter.classify_keys(keys) == {k: kind for k in keys if (kind := adapter.classify_key(k)) is not None}
    matches = {k: m for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))} if adapter.mtp_count_keys else {}
    assert adapter.mtp_layers(keys, config) == {k: int(m.group(1)) for k, m in matches.items() if int(m.group(1)) >= 61}
