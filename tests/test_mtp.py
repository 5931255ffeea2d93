"""Multi-token-prediction layers: a DeepSeek-V3 / GLM-4-MoE checkpoint with an on-disk MTP layer compiles as shipped.

The MTP layer (``model.layers.{num_hidden_layers}.*``) is laid out as the real
shards have it (tests/tiny.py: add_mtp_layer). Each test runs the whole
pipeline — profile, plan, compile, verify — and then checks, from the files
alone, that config.json and the tensors agree on every MoE layer.
"""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import tiny
from checkpoints import save_family
from premoe.compile import MTP_RULE, check_compiled, compile_checkpoint, compiled_info
from premoe.data import Source
from premoe.errors import CheckpointError, InputError
from premoe.plan import PlanRequest, make_plan
from premoe.profile import ProfileParams, profile_model
from premoe.verify import verify

TEXT = [Source("text", [tiny.TEXT], "tiny")]
# DeepSeek-V3/R1 and GLM-4.5 (transformers also reads their MTP layer); DeepSeek-V3.2 and GLM-4.7-Flash
# (glm4_moe_lite) ship the same layout, which transformers 5.24 skips without a loader of its own
FAMILIES = ["deepseek_v3", "glm4_moe", "deepseek_v32", "glm4_moe_lite"]


@pytest.fixture(scope="module", params=FAMILIES)
def source(request, tmp_path_factory):
    """(path, adapter, plan, MTP layer index) for a family saved with an MTP layer, profiled and planned once."""
    path, model, adapter = save_family(request.param, tmp_path_factory.mktemp("src") / request.param,
                                       max_shard_size="60KB")
    tiny.add_mtp_layer(path, request.param)
    profile = profile_model(path, TEXT, ["peu_norm"], ProfileParams(max_tokens=256, seq_len=64), progress=False)
    plan = make_plan(profile, PlanRequest(keep=0.5, domain="text"))
    return path, adapter, plan, model.config.num_hidden_layers


def on_disk(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        with safe_open(path / shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(tensors) == set(index), "the index and the shards disagree"
    return tensors


def moe_layers_on_disk(tensors, adapter) -> dict[int, dict]:
    """layer -> {"experts": set of expert indices, "rows": {key: experts along the axis}}, read off the keys."""
    layers: dict[int, dict] = {}
    for key, tensor in tensors.items():
        kind = adapter.classify_key(key)
        if kind is None:
            continue
        entry = layers.setdefault(kind[1], {"experts": set(), "rows": {}})
        if kind[0] == "expert":
            entry["experts"].add(kind[2])
        else:
            entry["rows"][key] = tensor.shape[adapter.expert_axis(tensor.shape)]
    return layers


def test_the_source_is_laid_out_as_the_real_shards(source):
    path, adapter, plan, mtp = source
    tensors = on_disk(path)
    config = json.loads((path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == mtp
    for name in tiny.MTP_EXTRA + ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "input_layernorm.weight",
                                  "post_attention_layernorm.weight", "mlp.experts.7.down_proj.weight",
                                  "mlp.shared_experts.gate_proj.weight"):
        assert f"model.layers.{mtp}.{name}" in tensors, name
    assert moe_layers_on_disk(tensors, adapter)[mtp]["experts"] == set(range(8))
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2


@pytest.mark.parametrize("mode", ["drop", "prune"])
def test_profile_plan_compile_verify(source, mode, tmp_path):
    path, adapter, plan, mtp = source
    out = tmp_path / "out"
    report = compile_checkpoint(path, plan, out, mtp=mode, progress=False)
    m = len(plan.kept[max(plan.kept)])
    assert {len(v) for v in plan.kept.values()} == {m} and m == 4

    # config and keys agree on every MoE layer, the MTP layer included when kept
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == m
    assert config["num_nextn_predict_layers"] == (1 if mode == "prune" else 0)
    source_tensors, tensors = on_disk(path), on_disk(out)
    layers = moe_layers_on_disk(tensors, adapter)
    assert set(layers) == set(plan.kept) | ({mtp} if mode == "prune" else set())
    for layer, entry in layers.items():
        assert entry["experts"] == set(range(m)), layer
        assert sorted(k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in entry["rows"]) == \
            ["gate.e_score_correction_bias", "gate.weight"]
        assert set(entry["rows"].values()) == {m}, entry["rows"]
    check_compiled(out)  # the library's own read-back check agrees

    mtp_keys = {k for k in source_tensors if k.startswith(f"model.layers.{mtp}.")}
    info = compiled_info(out)["mtp"]
    if mode == "drop":
        assert not any(k.startswith(f"model.layers.{mtp}.") for k in tensors)
        assert set(report.plan.dropped) >= mtp_keys and info["kept_experts"] == {}
    else:  # the MTP layer took the last decoder layer's experts, byte for byte, renumbered 0..M-1
        last = max(plan.kept)
        kept = plan.kept[last]
        assert info["kept_experts"] == {str(mtp): kept} and info["source_layer"] == last and info["rule"] == MTP_RULE
        prefix = f"model.layers.{mtp}."
        for new, old in enumerate(kept):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(tensors[f"{prefix}mlp.experts.{new}.{proj}.weight"],
                                   source_tensors[f"{prefix}mlp.experts.{old}.{proj}.weight"])
        for name in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
            assert torch.equal(tensors[prefix + name], source_tensors[prefix + name][kept])
        for name in tiny.MTP_EXTRA + ("mlp.shared_experts.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(tensors[prefix + name], source_tensors[prefix + name])
    assert info["mode"] == mode and info["layers_found"] == [mtp]

    # plain from_pretrained loads it, and it is the forced-routing original
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert {l.index: l.num_experts for l in adapter.moe_layers(loaded)} == {l: m for l in plan.kept}
    result = verify(path, out, TEXT, max_tokens=128, seq_len=32, progress=False)
    assert result.passed and result.max_abs_diff <= 1e-5


def test_dry_run_says_the_mtp_choice(source, tmp_path):
    path, adapter, plan, mtp = source
    drop = compile_checkpoint(path, plan, tmp_path / "out", dry_run=True).summary()
    assert f"mtp: drop layer(s) {mtp} (config num_nextn_predict_layers 1 -> 0" in drop
    prune = compile_checkpoint(path, plan, tmp_path / "out", mtp="prune", dry_run=True).summary()
    assert f"mtp: prune layer(s) {mtp} to layer {max(plan.kept)}'s kept experts" in prune
    assert "-> experts 0..3 (config num_nextn_predict_layers 1 -> 1)" in prune and MTP_RULE in prune
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="--mtp must be one of drop, prune"):
        compile_checkpoint(path, plan, tmp_path / "out", mtp="keep", dry_run=True)


def test_cli_mtp_and_explain(source, tmp_path):
    from premoe.cli.compile import command

    path, adapter, plan, mtp = source
    plan.save(tmp_path / "plan.json")
    args = [str(path), str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(command, [*args, "--mtp", "prune", "--explain"])
    assert result.exit_code == 0, result.output
    assert f"mtp: prune layer(s) {mtp}" in result.output and "nothing written" in result.output
    result = CliRunner().invoke(command, [*args, "--mtp", "prune", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mtp"]["written"] == 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_no_mtp_layer_on_disk_sets_the_count_to_zero(tmp_path):
    path, model, adapter = save_family("deepseek_v3", tmp_path / "src")  # config says 1, shards hold none
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    from checkpoints import spread_plan

    report = compile_checkpoint(path, spread_plan(path, model, adapter), tmp_path / "out", mtp="prune",
                                progress=False)
    assert "mtp: no MTP layer in the shards; config num_nextn_predict_layers 1 -> 0" in report.plan.describe()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_an_incomplete_mtp_layer_is_refused_when_kept(source, tmp_path):
    path, adapter, plan, mtp = source
    src = tmp_path / "src"
    shutil.copytree(path, src)
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"][f"model.layers.{mtp}.mlp.gate.weight"]
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / shard))
    for proj in ("gate_proj", "up_proj", "down_proj"):  # expert 5 of the MTP layer is gone
        del tensors[f"model.layers.{mtp}.mlp.experts.5.{proj}.weight"]
        del index["weight_map"][f"model.layers.{mtp}.mlp.experts.5.{proj}.weight"]
    save_file(tensors, str(src / shard))
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"layer {mtp}: .*missing \\[5\\]"):
        compile_checkpoint(src, plan, tmp_path / "out", mtp="prune", progress=False)
    assert not (tmp_path / "out").exists()
    compile_checkpoint(src, plan, tmp_path / "out", mtp="drop", progress=False)  # dropped: nothing to miss
    check_compiled(tmp_path / "out")


def test_a_pruned_mtp_layer_is_the_original_with_its_routing_restricted(source, tmp_path, monkeypatch):
    """transformers' own MTP loader (the one generate(use_mtp=True) uses) reads the pruned layer, which computes
    exactly what the original MTP layer computes when only the kept experts may be routed to."""
    from transformers.modeling_layers import MtpModel

    path, adapter, plan, mtp = source
    if not hasattr(AutoConfig.from_pretrained(path), "num_mtp_layers"):
        pytest.skip(f"transformers has no MTP loader for {adapter.name}")
    compile_checkpoint(path, plan, tmp_path / "prune", mtp="prune", progress=False)
    compile_checkpoint(path, plan, tmp_path / "drop", progress=False)

    import transformers

    # transformers names the real MTP layer (61 for DeepSeek-V3, 92 for GLM-4.5); the tiny one is `mtp`. Set before
    # the main model loads: that load records which keys are MTP weights.
    architecture = getattr(transformers, json.loads((path / "config.json").read_text())["architectures"][0])
    monkeypatch.setattr(architecture, "_keys_to_ignore_on_load_unexpected", [rf"model\.layers\.{mtp}\..*"])

    def mtp_model(checkpoint):
        main = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        model = MtpModel.from_pretrained(main).eval()  # raises on any missing MTP weight
        model._can_record_outputs = main.model._can_record_outputs  # so the adapter finds its router (as layer 0)
        return model

    full, pruned = mtp_model(path), mtp_model(tmp_path / "prune")
    assert [(l.index, l.num_experts) for l in adapter.moe_layers(pruned)] == [(0, 4)]
    assert len(mtp_model(tmp_path / "drop").layers) == 0  # dropped: the config declares no MTP layer
    ids = torch.randint(0, tiny.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))  # (batch, seq)
    hidden = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(1))  # (batch, seq, hidden) from the trunk
    positions = torch.arange(12)[None]
    with torch.no_grad():
        got = pruned.forward_layer(0, hidden, positions, None, input_ids=ids)  # (batch, seq, hidden)
        everything = full.forward_layer(0, hidden, positions, None, input_ids=ids)
        with adapter.restrict_routing(full, {0: plan.kept[max(plan.kept)]}):
            forced = full.forward_layer(0, hidden, positions, None, input_ids=ids)
    assert float((got - forced).abs().max()) <= 1e-5
    assert float((got - everything).abs().max()) > 1e-2, "pruning changed nothing: the comparison could not fail"


def test_size_estimates_match_the_default_compile(source, tmp_path):
    """Budgets (premoe plan --budget-gb) use size_breakdown: it must predict what compile writes, MTP dropped."""
    from premoe.checkpoint import size_breakdown

    path, adapter, plan, mtp = source
    sizes = size_breakdown(path, adapter, 8)
    report = compile_checkpoint(path, plan, tmp_path / "out", dry_run=True)
    assert sizes.bytes_with({l: len(v) for l, v in plan.kept.items()}) == report.plan.bytes_after
    assert sizes.total_bytes == report.plan.bytes_before
    mtp_bytes = sum(t.numel() * t.element_size() for k, t in on_disk(path).items()
                    if k.startswith(f"model.layers.{mtp}."))
    assert sizes.mtp_bytes == mtp_bytes > 0
    assert set(sizes.expert_bytes) == set(plan.kept)


def test_streaming_profile_ignores_the_mtp_layer(source):
    """A 700B DeepSeek-V3 is profiled layer by layer from disk: the MTP layer on disk must not disturb it."""
    from premoe.streaming import profile_streaming

    path, adapter, plan, mtp = source
    params = ProfileParams(max_tokens=256, seq_len=64)
    streamed = profile_streaming(path, TEXT, ["peu"], params, progress=False)
    loaded = profile_model(path, TEXT, ["peu"], params, progress=False)
    assert streamed.moe_layers == loaded.moe_layers and mtp not in streamed.moe_layers
    assert streamed.domains["text"].tokens == loaded.domains["text"].tokens > 0
    assert torch.allclose(streamed.domains["text"].sums["peu"], loaded.domains["text"].sums["peu"], atol=1e-4)


def test_plan_explain_says_the_size_drop_includes_the_mtp_layer():
    from types import SimpleNamespace

    from premoe.plan import Plan, explain

    plan = Plan(model={"name": "m"}, family="deepseek_v3", target="specialist:code", num_experts=4, top_k=2,
                moe_layers=[1], kept={1: [0, 1]}, order={1: [0, 1, 2, 3]},
                request={"scorer": "peu_norm", "ranking": "local"}, utility_kept={"code": 0.9},
                notes=[])
    sizes = SimpleNamespace(total_bytes=10_000_000_000, mtp_bytes=2_000_000_000, bytes_with=lambda c: 5_000_000_000,
                            file_bytes_with=lambda c: 5_000_100_000)
    text = explain(plan, sizes)
    assert "checkpoint size: 10.0000 GB -> 5.0000 GB (50.0%)" in text
    assert "of which 2.0000 GB are multi-token-prediction layers that compile drops by default" in text
    assert "multi-token" not in explain(plan, SimpleNamespace(**{**vars(sizes), "mtp_bytes": 0}))
