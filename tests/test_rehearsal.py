"""Scale rehearsal, fast version (issue 16): DeepSeek-V3's release layout — names, 256 experts, 163 shards, the MTP
layer, FP8 block scales — at 5 layers and toy width, through profile (streaming) -> plan -> compile -> verify,
plus a layout nobody tuned for (keys shuffled inside shards, experts scattered over shards, another dense count).
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import dsv3_layout
from dsv3_layout import Layout

from premoe.checkpoint import tensors
from premoe.data import Source
from premoe.plan import PlanRequest, make_plan
from premoe.profile import ProfileParams

# 3 dense + 2 MoE decoder layers + the MTP layer 5, 256 experts, the release's 163 shards, toy width
FAST = Layout(layers=5, hidden=64, moe_intermediate=32, intermediate=128, heads=2, q_lora_rank=48, kv_lora_rank=32,
              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
# what nobody tuned for: 97 shards, keys shuffled inside each, a layer's experts dealt over every shard, 1 dense layer
VARIANT = replace(FAST, shards=97, variant="scattered", first_dense=1, layers=3, seed=7)
# Kimi-K2's layout: DeepSeek-V3's modules under model_type "kimi_k2" (unknown to transformers, custom code in
# auto_map), 384 experts in one group, the first layer dense, no MTP layer
KIMI = replace(FAST, layers=3, experts=384, n_group=1, topk_group=1, first_dense=1, mtp=0, shards=40,
               model_type="kimi_k2")
TEXTS = {"code": "def add(a, b):\n    return a + b\n" * 40,
         "prose": "In the beginning God created the heaven and the earth.\n" * 40}
PARAMS = ProfileParams(max_tokens=256, seq_len=64, batch_size=4)
CODE = Source("code", [TEXTS["code"]], "code")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dsv3")
    return {"bf16": dsv3_layout.write(FAST, root / "bf16"),
            "fp8": dsv3_layout.write(replace(FAST, fp8=True), root / "fp8"),
            "variant": dsv3_layout.write(VARIANT, root / "variant")}


@pytest.fixture(scope="module")
def profiles(written) -> dict:
    from premoe.streaming import profile_streaming

    sources = [Source(name, [text], name) for name, text in TEXTS.items()]
    return {name: profile_streaming(written[name], sources, ["peu", "router_mass"], PARAMS, progress=False)
            for name in ("bf16", "fp8", "variant")}


def test_layout_is_the_release_one(written):
    """Release names and counts: 163 shards named like the release, MTP keys, per-expert scales in FP8."""
    bf16, fp8 = written["bf16"], written["fp8"]
    shards = sorted(p.name for p in bf16.glob("*.safetensors"))
    assert len(shards) == 163 and shards[0] == "model-00001-of-000163.safetensors"
    keys = set(json.loads((bf16 / "model.safetensors.index.json").read_text())["weight_map"])
    mtp = {f"model.layers.5.{k}" for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight",
                                            "shared_head.norm.weight", "shared_head.head.weight",
                                            "mlp.gate.e_score_correction_bias", "mlp.experts.255.down_proj.weight")}
    assert mtp <= keys
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"], config["num_experts_per_tok"],
            config["first_k_dense_replace"], config["num_nextn_predict_layers"]) == (256, 8, 4, 8, 3, 1)
    stored = tensors(fp8)
    weight, scale = stored["model.layers.3.mlp.experts.7.up_proj.weight"], stored[
        "model.layers.3.mlp.experts.7.up_proj.weight_scale_inv"]
    assert (weight.dtype, scale.dtype, scale.shape, scale.shard) == ("F8_E4M3", "F32", (1, 1), weight.shard)
    assert stored["model.layers.3.mlp.gate.weight"].dtype == "BF16"
    assert "model.layers.3.mlp.gate.weight_scale_inv" not in stored


def test_names_are_what_transformers_loads():
    """Every non-MTP tensor name and shape is one transformers' DeepseekV3ForCausalLM reads, none missing.

    16 experts (2 per group) instead of 256: the names are per-expert templates, and the skeleton builds 16x faster.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    layout = replace(FAST, experts=16)
    config = layout.config()
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    expected = {k: tuple(v.shape) for k, v in revert_weight_conversion(skeleton, skeleton.state_dict()).items()}
    generated = {k: v for k, v in dsv3_layout.all_tensors(layout).items() if not k.startswith("model.layers.5.")}
    assert generated == expected


def test_fp8_quantisation_roundtrips():
    """Block FP8 as released: dequantised = fp8 x scale of its block, within e4m3's 2^-3 relative step."""
    weight = torch.randn(200, 136) * torch.linspace(0.01, 1, 136)  # columns of different scales, partial blocks
    q, scale = dsv3_layout.quantize_fp8(weight)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 2)
    back = q.float() * scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :136]
    assert ((back - weight).abs() <= weight.abs() / 16 + scale.max() * 2**-9).all()


def test_streaming_profile_reads_fp8_scales(profiles):
    """FP8 profile ~ bf16 profile of the same random weights (the raw float8 values alone correlate at ~0.1)."""
    a, b = profiles["bf16"].utility("code", "router_mass"), profiles["fp8"].utility("code", "router_mass")
    assert a.shape == (2, 256)
    for layer in range(2):
        assert torch.corrcoef(torch.stack([a[layer], b[layer]]))[0, 1] > 0.98


@pytest.mark.parametrize("keep,mtp,ranking", [(0.5, "drop", "local"), (0.25, "prune", "local"),
                                              (0.25, "drop", "global")])
def test_bf16_profile_plan_compile_verify(written, profiles, tmp_path, keep, mtp, ranking):
    from premoe.verify import verify

    plan = make_plan(profiles["bf16"], PlanRequest(keep=keep, domain="code", scorer="peu", ranking=ranking))
    assert sum(map(len, plan.kept.values())) == int(256 * keep) * len(plan.kept)
    for experts in plan.kept.values():  # every routing group of every layer keeps the same number
        assert len({sum(1 for e in experts if e // 32 == g) for g in range(8)}) == 1
    if ranking == "global":  # compile pads to one count (by whole tiers): the checkpoint vLLM loads
        plan = plan.padded(n_group=8)
        keep = plan.max_kept / 256
    assert {len(v) for v in plan.kept.values()} == {int(256 * keep)}
    out = _compile(written["bf16"], plan, tmp_path, mtp)
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == int(256 * keep)
    mtp_keys = [k for k in tensors(out) if k.startswith("model.layers.5.")]
    if mtp == "drop":
        assert config["num_nextn_predict_layers"] == 0 and mtp_keys == []
    else:  # the MTP layer keeps as many experts as the config says, numbered 0..M-1
        assert config["num_nextn_predict_layers"] == 1
        assert f"model.layers.5.mlp.experts.{int(256 * keep) - 1}.up_proj.weight" in mtp_keys
        assert f"model.layers.5.mlp.experts.{int(256 * keep)}.up_proj.weight" not in mtp_keys
        assert "model.layers.5.eh_proj.weight" in mtp_keys
    report = verify(written["bf16"], out, [CODE], max_tokens=128, seq_len=64, progress=False)
    assert report.passed, report.summary()


def test_fp8_compile_carries_scales_with_their_experts(written, profiles, tmp_path):
    from safetensors import safe_open

    plan = make_plan(profiles["fp8"], PlanRequest(keep=0.25, domain="prose", scorer="peu"))
    out = _compile(written["fp8"], plan, tmp_path, "prune")
    source, compiled = tensors(written["fp8"]), tensors(out)
    for layer, kept in plan.kept.items():
        for new, old in [(0, kept[0]), (63, kept[63])]:
            for suffix in ("weight", "weight_scale_inv"):
                old_key = f"model.layers.{layer}.mlp.experts.{old}.down_proj.{suffix}"
                new_key = f"model.layers.{layer}.mlp.experts.{new}.down_proj.{suffix}"
                a = safe_open(str(written["fp8"] / source[old_key].shard), "pt").get_tensor(old_key)
                b = safe_open(str(out / compiled[new_key].shard), "pt").get_tensor(new_key)
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert "model.layers.3.mlp.experts.64.down_proj.weight_scale_inv" not in compiled
    assert "model.layers.5.mlp.experts.63.down_proj.weight_scale_inv" in compiled  # the MTP layer's too


def test_layout_variant_profile_plan_compile_verify(written, profiles, tmp_path):
    """Shuffled keys, experts scattered over 97 shards, 1 dense layer: the same pipeline, verified."""
    from premoe.verify import verify

    profile = profiles["variant"]
    assert profile.moe_layers == [1, 2]
    plan = make_plan(profile, PlanRequest(keep=0.25, domain="code", scorer="peu"))
    out = _compile(written["variant"], plan, tmp_path, "drop")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {p.name for p in out.glob("*.safetensors")}  # shards left empty are not written
    report = verify(written["variant"], out, [CODE], max_tokens=128, seq_len=64, progress=False)
    assert report.passed, report.summary()


def test_kimi_k2_layout_profile_plan_compile_verify(tmp_path):
    """model_type kimi_k2 is built as DeepSeek-V3 from transformers' classes, never from the checkpoint's code."""
    from premoe.modeling import transformers_config
    from premoe.streaming import profile_streaming
    from premoe.verify import verify

    model = dsv3_layout.write(KIMI, tmp_path / "kimi")
    assert json.loads((model / "config.json").read_text())["auto_map"]  # what would make transformers ask
    assert transformers_config(model).model_type == "deepseek_v3"
    profile = profile_streaming(model, [CODE], ["peu"], PARAMS, progress=False)
    assert profile.family == "DeepSeek-V3"  # the modules it is built from
    assert profile.moe_layers == [1, 2] and profile.num_experts == 384
    plan = make_plan(profile, PlanRequest(keep=0.5, domain="code", scorer="peu"))
    out = _compile(model, plan, tmp_path, "drop")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["n_routed_experts"]) == ("kimi_k2", 192)
    report = verify(model, out, [CODE], max_tokens=128, seq_len=64, progress=False)
    assert report.passed, report.summary()
    assert report.family == "Kimi-K2"  # what config.json says, not the classes it is built from


def test_unregistered_model_type_is_refused_before_transformers_asks_to_run_its_code(tmp_path):
    from premoe.errors import UnsupportedModelError
    from premoe.modeling import load_tokenizer, transformers_config

    model = dsv3_layout.write(replace(KIMI, model_type="moonshot_next", shards=3), tmp_path / "unknown")
    for load in (transformers_config, load_tokenizer):
        with pytest.raises(UnsupportedModelError, match="'moonshot_next' is unknown to transformers .* never runs"):
            load(model)
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="config.json has no model_type"):
        transformers_config(model)


def test_a_tokenizer_that_needs_the_checkpoints_code_is_refused_with_the_fix(tmp_path):
    from premoe.errors import CheckpointError
    from premoe.modeling import load_tokenizer

    model = dsv3_layout.write(replace(KIMI, shards=3), tmp_path / "kimi")
    (model / "tokenizer.json").unlink()  # as released: tiktoken, loaded by tokenization_kimi.py
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TikTokenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer",
                                                                                 None]}}))
    with pytest.raises(CheckpointError, match="custom code.*never runs a checkpoint's own code: save the tokenizer"):
        load_tokenizer(model)


def _compile(model: Path, plan, tmp_path: Path, mtp: str) -> Path:
    from premoe.compile import compile_checkpoint

    return compile_checkpoint(model, plan, tmp_path / "out", mtp=mtp, progress=False).plan.out


def test_store_and_swaps_at_256_experts(written, profiles):
    """A store of the two domains, then swaps between random valid sets (8 per group): only new experts are read."""
    import random

    from premoe.bank import ExpertBank
    from premoe.store import build_store

    sources = [Source(name, [text], name) for name, text in TEXTS.items()]
    store = build_store(written["bf16"], profiles["bf16"], sources, scorer="router_mass")
    start = store.kept("code", 64)
    assert sorted(start) == [3, 4] and {len(v) for v in start.values()} == {64}
    bank = ExpertBank(written["bf16"], start)
    rng, held = random.Random(0), {layer: set(v) for layer, v in start.items()}
    for _ in range(20):
        target = {layer: sorted(g * 32 + e for g in range(8) for e in rng.sample(range(32), 8)) for layer in (3, 4)}
        report = bank.swap(target)
        assert report.experts == sum(len(set(target[l]) - held[l]) for l in target)
        held = {layer: set(v) for layer, v in target.items()}
    assert bank.swap(store.kept("prose", 64)).experts > 0


def test_the_bank_refuses_fp8_experts_before_loading_anything(written, monkeypatch):
    import premoe.streaming
    from premoe.bank import ExpertBank
    from premoe.errors import UnsupportedModelError

    def load_pruned(*args, **kwargs):
        raise AssertionError("the bank loaded the model before checking its dtypes")

    monkeypatch.setattr(premoe.streaming, "load_pruned", load_pruned)
    kept = {layer: [g * 32 + e for g in range(8) for e in range(2)] for layer in (3, 4)}
    with pytest.raises(UnsupportedModelError, match="F8_E4M3.*dequantize it first"):
        ExpertBank(written["fp8"], kept)
