"""Compile: the checkpoint a plain from_pretrained reads back is the forced-routing original, for every family."""
import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import tiny
from checkpoints import forced_difference, save_family, spread_plan
from premoe.compile import compile_checkpoint, compiled_info, kept_experts, load_compact
from premoe.errors import (CheckpointError, DiskSpaceError, InputError, MissingFileError, OutputExistsError,
                           PlanError)
from premoe.plan import Plan, format_ranges

TOL = 1e-5


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return save_family("qwen3_moe", tmp_path_factory.mktemp("src") / "qwen3_moe")


def assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temp dir was left behind"


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_compiled_checkpoint_is_the_forced_routing_original(family, tmp_path):
    path, model, adapter = save_family(family, tmp_path / "src")
    plan = spread_plan(path, model, adapter)
    report = compile_checkpoint(path, plan, tmp_path / "out", progress=False)
    compiled = load(tmp_path / "out")
    forced, full = forced_difference(compiled, model, adapter, plan.kept)
    assert forced <= TOL
    assert full > 1e-3, "pruning changed nothing: the comparison could not fail"
    m = len(next(iter(plan.kept.values())))
    assert report.plan.export == "uniform" and report.plan.bytes_after < report.plan.bytes_before
    assert adapter.num_experts(compiled.config) == m
    assert {l.index: l.num_experts for l in adapter.moe_layers(compiled)} == {l: m for l in plan.kept}
    assert kept_experts(tmp_path / "out") == plan.kept


def test_grouped_routing_needs_the_same_count_per_group(tmp_path):
    path, model, adapter = save_family("deepseek_v3", tmp_path / "src")
    uneven = spread_plan(path, model, adapter, kept={l: [0, 1, 2, 5] for l in spread_plan(path, model, adapter).kept})
    with pytest.raises(PlanError, match="group"):
        compile_checkpoint(path, uneven, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_shared_experts_stay(tmp_path):
    path, model, adapter = save_family("qwen2_moe", tmp_path / "src")
    compile_checkpoint(path, spread_plan(path, model, adapter), tmp_path / "out", progress=False)
    shared = {k for k in load_file(str(path / "model.safetensors")) if "shared_expert" in k}
    assert shared and shared <= set(load_file(str(tmp_path / "out" / "model.safetensors")))


def test_quantisation_scales_follow_their_expert_and_dtypes_are_kept(qwen3, tmp_path):
    path, model, adapter = qwen3
    src = tmp_path / "src"
    shutil.copytree(path, src)
    tensors = load_file(str(src / "model.safetensors"))
    for e in range(8):  # FP8-style checkpoint: per-expert scales and an 8-bit weight
        tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight_scale_inv"] = torch.full((2, 2), float(e))
        tensors[f"model.layers.0.mlp.experts.{e}.fp8_probe"] = torch.full((3,), e / 8).to(torch.float8_e4m3fn)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    plan = spread_plan(src, model, adapter)
    compile_checkpoint(src, plan, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for new, old in enumerate(plan.kept[0]):
        assert torch.equal(out[f"model.layers.0.mlp.experts.{new}.down_proj.weight_scale_inv"], torch.full((2, 2), float(old)))
        probe = out[f"model.layers.0.mlp.experts.{new}.fp8_probe"]
        assert probe.dtype == torch.float8_e4m3fn
        assert torch.equal(probe.view(torch.uint8), tensors[f"model.layers.0.mlp.experts.{old}.fp8_probe"].view(torch.uint8))
    assert sum("weight_scale_inv" in k for k in out) == len(plan.kept[0])


def test_bf16_bytes_are_copied_exactly_and_rows_sliced(tmp_path):
    path, model, adapter = save_family("gpt_oss", tmp_path / "src", dtype=torch.bfloat16)  # fused on disk
    plan = spread_plan(path, model, adapter)
    compile_checkpoint(path, plan, tmp_path / "out", progress=False)
    source, out = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(source)
    for key, tensor in out.items():
        assert tensor.dtype == source[key].dtype == torch.bfloat16
        kind = adapter.classify_key(key)
        expected = source[key][plan.kept[kind[1]]] if kind else source[key]
        assert torch.equal(tensor, expected), key
    forced, _ = forced_difference(load(tmp_path / "out"), model, adapter, plan.kept)
    assert forced <= TOL
    # the data section starts 8-byte aligned (as safetensors writes it), so loaders can map tensors in place
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0


def test_sharded_checkpoint_keeps_its_split_and_index(tmp_path):
    path, model, adapter = save_family("qwen3_moe", tmp_path / "src", max_shard_size="40KB")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2
    plan = spread_plan(path, model, adapter)
    compile_checkpoint(path, plan, tmp_path / "out", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    written = {}
    for shard in sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")):
        assert shard in shards
        with safe_open(tmp_path / "out" / shard, "pt") as f:
            written.update({k: shard for k in f.keys()})
            total = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
            index["metadata"]["total_size"] -= total
    assert index["weight_map"] == written and index["metadata"]["total_size"] == 0
    assert forced_difference(load(tmp_path / "out"), model, adapter, plan.kept)[0] <= TOL


def global_plan(path, model, adapter) -> Plan:
    plan = spread_plan(path, model, adapter, kept={0: [0, 3, 5], 1: [1, 2, 4, 6, 7]})
    plan.order = {0: [3, 0, 5, 7, 1, 2, 4, 6], 1: [2, 1, 4, 6, 7, 0, 3, 5]}
    return plan


def test_global_plan_exports_padded_by_default(qwen3, tmp_path):
    path, model, adapter = qwen3
    report = compile_checkpoint(path, global_plan(path, model, adapter), tmp_path / "out", progress=False)
    assert report.plan.export == "padded"
    assert kept_experts(tmp_path / "out") == {0: [0, 1, 3, 5, 7], 1: [1, 2, 4, 6, 7]}
    assert forced_difference(load(tmp_path / "out"), model, adapter, kept_experts(tmp_path / "out"))[0] <= TOL


def test_global_plan_exported_compact(qwen3, tmp_path):
    path, model, adapter = qwen3
    plan = global_plan(path, model, adapter)
    report = compile_checkpoint(path, plan, tmp_path / "out", export="compact", progress=False)
    assert report.plan.export == "compact"
    info = compiled_info(tmp_path / "out")
    assert info["experts_per_layer"] == {"0": 3, "1": 5} and adapter.num_experts(report.plan.config) == 5
    with pytest.raises(RuntimeError, match="mismatch"):  # vanilla loaders read one count: the loader is needed
        load(tmp_path / "out")
    compact = load_compact(tmp_path / "out")
    assert {l.index: l.num_experts for l in adapter.moe_layers(compact)} == {0: 3, 1: 5}
    assert forced_difference(compact, model, adapter, plan.kept)[0] <= TOL
    from premoe.modeling import load_model

    served = load_model(tmp_path / "out")  # what eval, serve and verify load with: it takes compact exports too
    assert {l.index: l.num_experts for l in adapter.moe_layers(served)} == {0: 3, 1: 5}
    assert forced_difference(served, model, adapter, plan.kept)[0] <= TOL


def test_profile_plan_compile(qwen3, tmp_path):
    from premoe.data import Source
    from premoe.plan import PlanRequest, make_plan
    from premoe.profile import ProfileParams, profile_model

    path, model, adapter = qwen3
    profile = profile_model(path, [Source("text", [tiny.TEXT], "tiny")], ["peu_norm"],
                            ProfileParams(max_tokens=256, seq_len=64), progress=False)
    plan = make_plan(profile, PlanRequest(keep=0.5, domain="text"))
    compile_checkpoint(path, plan, tmp_path / "out", progress=False)
    assert forced_difference(load(tmp_path / "out"), model, adapter, plan.kept)[0] <= TOL
    assert compiled_info(tmp_path / "out")["target"] == "specialist:text"


def test_dry_run_writes_nothing(qwen3, tmp_path):
    path, model, adapter = qwen3
    report = compile_checkpoint(path, spread_plan(path, model, adapter), tmp_path / "out", dry_run=True)
    assert not report.written and list(tmp_path.iterdir()) == []
    text = report.summary()
    assert "layer   0: keep   4/8" in text and "size:" in text and "nothing written" in text
    assert json.loads(json.dumps(report.to_json()))["tensors_dropped"] == 2 * 4 * 3


def test_other_files_copied_other_weights_not(qwen3, tmp_path):
    path, model, adapter = qwen3
    src = tmp_path / "src"
    shutil.copytree(path, src)
    (src / "README.md").write_text("card")
    (src / "LICENSE").write_text("terms")
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    (src / "original").mkdir()
    report = compile_checkpoint(src, spread_plan(src, model, adapter), tmp_path / "out", progress=False)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"README.md", "LICENSE", "tokenizer.json", "generation_config.json", "config.json"} <= names
    assert not {"pytorch_model.bin", "original"} & names
    assert (tmp_path / "out" / "README.md").read_text() != "card"  # premoe's own card, not the source's
    assert [s.split(" ")[0] for s in report.plan.skipped] == ["README.md", "original/", "pytorch_model.bin"]


def test_the_model_card_describes_the_compiled_checkpoint(tmp_path):
    from huggingface_hub import ModelCard

    from premoe.data import Source
    from premoe.plan import PlanRequest, make_plan
    from premoe.profile import ProfileParams, profile_model

    path, model, adapter = save_family("qwen3_moe", tmp_path / "src")
    (path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [base]\n---\n# The original model\nAll 8 experts.\n")
    for artefact in ("card.json", "loss.png", "training.json", "train.log", "events.out.tfevents.1.host"):
        (path / artefact).write_text("source only")
    profile = profile_model(path, [Source("text", [tiny.TEXT], "tiny")], ["peu_norm"],
                            ProfileParams(max_tokens=256, seq_len=64), progress=False)
    profile.save(tmp_path / "prof")
    plan = make_plan(profile, PlanRequest(keep=0.5, domain="text"), profile_path=str(tmp_path / "prof"))
    report = compile_checkpoint(path, plan, tmp_path / "out", base_model="acme/tiny-qwen3-moe", progress=False)
    out = tmp_path / "out"
    assert not {"card.json", "loss.png", "training.json", "train.log", "events.out.tfevents.1.host"} & \
        {p.name for p in out.iterdir()}
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "acme/tiny-qwen3-moe"
    assert (card.data.pipeline_tag, card.data.library_name, card.data.license) == ("text-generation", "transformers",
                                                                                  "apache-2.0")
    assert card.data.tags == ["premoe", "moe", "pruned", "qwen3_moe"]
    text = card.text
    assert "All 8 experts" not in text and "pruned to 4 of 8 routed experts" in text
    for layer, experts in plan.kept.items():
        assert f"| {layer} | {format_ranges(experts)} |" in text
    assert "| target | specialist:text |" in text and "| scorer / ranking | peu_norm / local |" in text
    tokens = profile.domains["text"].tokens
    assert f"text: {tokens} tokens (profile `{tmp_path / 'prof'}`)" in text
    assert f"({report.plan.bytes_after / report.plan.bytes_before:.1%})" in text
    assert "Pruned for `text`" in text


def test_the_model_card_base_model_comes_from_a_hub_id_only(qwen3, tmp_path):
    from huggingface_hub import ModelCard

    path, model, adapter = qwen3
    src = tmp_path / "src"
    shutil.copytree(path, src)
    compile_checkpoint(src, spread_plan(src, model, adapter), tmp_path / "local", progress=False)
    assert ModelCard.load(tmp_path / "local" / "README.md").data.base_model is None  # a local path is no Hub id
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "Qwen/Qwen3-30B-A3B"}))
    compile_checkpoint(src, spread_plan(src, model, adapter), tmp_path / "hub", progress=False)
    assert ModelCard.load(tmp_path / "hub" / "README.md").data.base_model == "Qwen/Qwen3-30B-A3B"


def test_bad_plans_are_refused(qwen3, tmp_path):
    path, model, adapter = qwen3
    out = tmp_path / "out"
    other = spread_plan(path, model, adapter)
    other.model = {**other.model, "config_hash": "0" * 16, "name": "another"}
    with pytest.raises(PlanError, match="made for another"):
        compile_checkpoint(path, other, out, progress=False)
    with pytest.raises(PlanError, match="top-k"):
        compile_checkpoint(path, spread_plan(path, model, adapter, kept={0: [1], 1: [2]}), out, progress=False)
    with pytest.raises(InputError, match="model directory itself"):
        compile_checkpoint(path, spread_plan(path, model, adapter), path, force=True, progress=False)
    assert_nothing_written(out)


def test_broken_checkpoints_are_refused(tmp_path):
    path, model, adapter = save_family("qwen3_moe", tmp_path / "src", max_shard_size="40KB")
    plan, out = spread_plan(path, model, adapter), tmp_path / "out"
    shards = sorted(path.glob("*.safetensors"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        compile_checkpoint(path, plan, out, progress=False)
    shards[0].write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt"):
        compile_checkpoint(path, plan, out, progress=False)
    shards[0].unlink()
    with pytest.raises(MissingFileError, match="missing"):
        compile_checkpoint(path, plan, out, progress=False)
    assert_nothing_written(out)


def test_no_disk_space_and_existing_output(qwen3, tmp_path, monkeypatch):
    path, model, adapter = qwen3
    plan, out = spread_plan(path, model, adapter), tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr("premoe.compile.shutil.disk_usage", lambda p: namedtuple("Usage", "total used free")(1, 1, 1000))
        with pytest.raises(DiskSpaceError, match="needs .* free"):
            compile_checkpoint(path, plan, out, progress=False)
    assert_nothing_written(out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        compile_checkpoint(path, plan, out, progress=False)
    assert (out / "keep.txt").exists()
    with pytest.raises(OutputExistsError, match="not written by premoe"):  # --force replaces only premoe's output
        compile_checkpoint(path, plan, out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_compile(qwen3, tmp_path):
    from premoe.cli.compile import command

    path, model, adapter = qwen3
    spread_plan(path, model, adapter).save(tmp_path / "plan.json")
    result = CliRunner().invoke(command, [str(path), str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"),
                                          "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] is True
    again = subprocess.run([sys.executable, "-c", "from premoe.cli import main; main()", "compile", str(path),
                            str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    assert again.stderr.strip().count("\n") == 0
    threaded = CliRunner().invoke(command, [str(path), str(tmp_path / "plan.json"), "--out", str(tmp_path / "t3"),
                                            "--threads", "3"])
    assert threaded.exit_code == 0, threaded.output
    for file in (tmp_path / "out").glob("*.safetensors"):
        assert (tmp_path / "t3" / file.name).read_bytes() == file.read_bytes()
    for bad in ("0", "65", "two"):
        refused = CliRunner().invoke(command, [str(path), str(tmp_path / "plan.json"), "--out", str(tmp_path / "t0"),
                                               "--threads", bad])
        assert refused.exit_code == 2 and "--threads" in refused.output and not (tmp_path / "t0").exists()


def test_a_corrupt_header_is_refused_before_copying(tmp_path):
    import struct

    path, model, adapter = save_family("qwen3_moe", tmp_path / "src")
    file = path / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin - 4, end - 4]  # overlaps its neighbour: safetensors would refuse it
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* (overlaps|gap)"):
        compile_checkpoint(path, spread_plan(path, model, adapter), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_a_written_checkpoint_that_disagrees_with_its_config_is_never_renamed(qwen3, tmp_path, monkeypatch):
    import premoe.compile as compile_module

    path, model, adapter = qwen3
    plan = spread_plan(path, model, adapter)
    real = compile_module._new_config

    def off_by_one(*args):  # an injected bug: the config claims one expert more than the shards hold
        config = real(*args)
        return {**config, "num_experts": config["num_experts"] + 1, "num_local_experts": config["num_experts"] + 1}

    monkeypatch.setattr(compile_module, "_new_config", off_by_one)
    with pytest.raises(CheckpointError, match="declares 5 experts per layer"):
        compile_checkpoint(path, plan, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")
    monkeypatch.setattr(compile_module, "_new_config", real)
    monkeypatch.setattr(compile_module.TensorWrite, "nbytes", property(lambda w: sum(e - b for b, e in w.ranges)
                                                                        - (4 if w.rows else 0)))
    with pytest.raises(CheckpointError):  # router rows cut short: the written headers are refused
        compile_checkpoint(path, plan, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_check_compiled_names_what_disagrees(qwen3, tmp_path):
    from safetensors.torch import load_file, save_file

    from premoe.compile import check_compiled

    path, model, adapter = qwen3
    out = tmp_path / "out"
    compile_checkpoint(path, spread_plan(path, model, adapter), out, progress=False)
    check_compiled(out)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.experts.4.up_proj.weight"] = tensors["model.layers.1.mlp.experts.3.up_proj.weight"].clone()
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layer 1 holds experts \[0, 1, 2, 3, 4\], not 0..3"):
        check_compiled(out)
    del tensors["model.layers.1.mlp.experts.4.up_proj.weight"]
    tensors["model.layers.0.mlp.gate.weight"] = tensors["model.layers.0.mlp.gate.weight"][:3].clone()
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate.weight has shape \[3, 32\]; config.json says "
                                              r"layer 0 holds 4 experts"):
        check_compiled(out)


def test_the_output_folder_is_ready_to_upload(qwen3, tmp_path):
    """What huggingface_hub.upload_folder would send: weights, config, tokenizer, card — nothing else."""
    from huggingface_hub import ModelCard

    path, model, adapter = qwen3
    compile_checkpoint(path, spread_plan(path, model, adapter), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert all(p.is_file() for p in out.iterdir())
    metadata = ModelCard.load(out / "README.md").data.to_dict()
    assert {k: metadata[k] for k in ("library_name", "pipeline_tag")} == {"library_name": "transformers",
                                                                          "pipeline_tag": "text-generation"}


def test_byte_ranges_of_a_tensor_sliced_along_an_inner_axis():
    from premoe.compile import TensorWrite

    # source (2, 4, 3) float32 sliced along axis 1 (experts), keeping experts 1 and 3: for each of the 2 outer
    # indices, experts' blocks of 3 x 4 bytes at (outer * 4 + expert) * 12
    write = TensorWrite("k", "k", "s", "F32", (2, 2, 3), (1, 3), (100, 100 + 96), (2, 4, 3), axis=1)
    assert write.ranges == [(112, 124), (136, 148), (160, 172), (184, 196)]
    assert write.nbytes == 48
    merged = TensorWrite("k", "k", "s", "F32", (2, 2, 3), (2, 3), (0, 96), (2, 4, 3), axis=1)
    assert merged.ranges == [(24, 48), (72, 96)]  # adjacent experts merge into one copy


# --------------------------------------------------------------------------- the byte copy (coalesced runs)

ROOT = Path(__file__).resolve().parents[1]


def _dsv3_fp8(tmp_path):
    """DeepSeek-V3's FP8 release layout at toy width: FP8 weights and F32 block scales interleaved, 11 shards."""
    sys.path.insert(0, str(ROOT / "bench"))
    import dsv3_layout

    layout = dsv3_layout.Layout(layers=5, hidden=64, moe_intermediate=32, intermediate=128, heads=2, q_lora_rank=48,
                                kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, shards=11,
                                fp8=True)
    path = dsv3_layout.write(layout, tmp_path / "fp8")
    generator = torch.Generator().manual_seed(3)
    # 12 of every routing group's 32 experts, at random: runs of 1-4 experts cut by dropped ones
    kept = {layer: sorted(g * 32 + e for g in range(8) for e in torch.randperm(32, generator=generator)[:12].tolist())
            for layer in (3, 4)}
    from premoe.modeling import model_identity

    plan = Plan(model_identity(path), "DeepSeek-V3", 256, 8, [3, 4], kept, {l: list(range(256)) for l in kept},
                {"scorer": "random"}, "specialist:test", {})
    return path, plan


def test_every_copy_path_writes_the_same_bytes_and_each_tensor_is_its_source(tmp_path, monkeypatch):
    """Kernel copies, gathered writev batches (one run per window, several windows), the default mix, and threads
    copying parts of shards cut mid-run write byte-identical checkpoints, whose every tensor is its source tensor (rows sliced) and whose shards keep their
    source's metadata."""
    import premoe.compile as compile_module

    path, plan = _dsv3_fp8(tmp_path)
    outs = {}
    variants = [("default", compile_module._KERNEL_RUN, 1024, 64 << 20, 1, 32 << 20),
                ("kernel", 0, 1024, 64 << 20, 1, 32 << 20), ("gathered", 1 << 40, 3, 20_000, 1, 32 << 20),
                # threads taking parts of shards cut mid-run (kernel copies and gathered runs), in any order
                ("threads", 3000, 5, 20_000, 3, 7001), ("threads-kernel", 0, 1024, 64 << 20, 4, 4099)]
    for name, kernel_run, iov_max, chunk, threads, job_bytes in variants:
        monkeypatch.setattr(compile_module, "_KERNEL_RUN", kernel_run)
        monkeypatch.setattr(compile_module, "_IOV_MAX", iov_max)
        monkeypatch.setattr(compile_module, "_CHUNK", chunk)
        monkeypatch.setattr(compile_module, "_JOB_BYTES", job_bytes)
        report = compile_checkpoint(path, plan, tmp_path / name / "out", mtp="prune", progress=False,
                                    threads=threads)
        outs[name] = report.plan.out
    files = sorted(p.name for p in outs["default"].iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) == 11
    for name in ("kernel", "gathered", "threads", "threads-kernel"):
        assert sorted(p.name for p in outs[name].iterdir()) == files
        for file in files:
            assert (outs[name] / file).read_bytes() == (outs["default"] / file).read_bytes(), (name, file)
    source, written = _shards(path), _shards(outs["default"])
    sliced = 0
    for write in report.plan.writes:
        expected = source[write.shard][0][write.source]
        if write.rows is not None:
            expected = expected.index_select(write.axis, torch.tensor(write.rows))
            sliced += 1
        got = written[write.shard][0][write.key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, write.key
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), write.key
    assert sliced == 2 * 3  # router weight and correction bias of layers 3, 4 and the MTP layer 5
    assert all(written[shard][1] == source[shard][1] for shard in written)  # each shard's __metadata__


def _shards(path) -> dict:
    """shard name -> (its tensors, its metadata), read by safetensors itself."""
    found = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            found[file.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return found


def test_a_short_writev_is_finished_and_a_shard_cut_after_planning_is_refused(tmp_path, monkeypatch):
    import premoe.compile as compile_module
    from premoe.compile import plan_writes, write_checkpoint

    path, plan = _dsv3_fp8(tmp_path)
    reference = compile_checkpoint(path, plan, tmp_path / "ref", progress=False).plan.out
    real = compile_module.os.pwritev
    monkeypatch.setattr(compile_module, "_KERNEL_RUN", 1 << 40)  # every run gathered
    calls = []
    half = lambda fd, parts, at: calls.append(at) or real(fd, [parts[0][: len(parts[0]) // 2]], at)  # noqa: E731
    for name, fake in [("half", half),  # a short pwritev
                       ("none", lambda fd, parts, at: calls.append(at) or 0)]:  # and one that writes nothing
        monkeypatch.setattr(compile_module.os, "pwritev", fake)
        out = compile_checkpoint(path, plan, tmp_path / name, progress=False).plan.out
        for file in reference.glob("*.safetensors"):
            assert (out / file.name).read_bytes() == file.read_bytes()  # finished by plain writes
    assert calls  # the fakes were used
    monkeypatch.undo()
    written = plan_writes(path, plan, tmp_path / "cut")
    shard, writes = next(iter(written.shards().items()))
    last = max(end for w in writes for _, end in w.ranges)  # the last kept byte, within the data section
    with open(path / shard, "r+b") as f:
        f.truncate(written.data_start[shard] + last - 1)
    with pytest.raises(CheckpointError, match=f"{shard} ends at byte .* the shard is truncated"):
        write_checkpoint(written, progress=False)
    assert_nothing_written(tmp_path / "cut")


def test_the_index_is_written_as_json_indents_it():
    from premoe.compile import _dumps_index

    for metadata, weight_map in [({}, {}), ({"total_size": 5, "nested": {"a": [1, 2]}}, {'a"b': "é", "b\n": "s"}),
                                 ({"total_size": 1}, {"k": "v"})]:
        assert _dumps_index(metadata, weight_map) == json.dumps({"metadata": metadata, "weight_map": weight_map},
                                                                indent=2)


def test_a_shard_written_short_is_caught_before_the_rename(tmp_path, monkeypatch):
    """The written files are checked against their headers' sizes: a copy that stopped early (here the last run of
    one shard left out) fails the compile and leaves no output."""
    import premoe.compile as compile_module

    path, plan = _dsv3_fp8(tmp_path)
    real = compile_module._copy_jobs
    cut = []

    def short(source, dest, runs, data_start, out):
        jobs = real(source, dest, runs, data_start, out)
        if not cut and jobs and len(jobs[-1].runs) > 1:
            cut.append(dest.name)
            jobs[-1] = jobs[-1]._replace(runs=jobs[-1].runs[:-1])
        return jobs

    monkeypatch.setattr(compile_module, "_copy_jobs", short)
    with pytest.raises(CheckpointError, match="a copy was cut short or ran long"):
        compile_checkpoint(path, plan, tmp_path / "out", progress=False, threads=2)
    assert cut
    assert_nothing_written(tmp_path / "out")


def test_an_expert_tensor_missing_or_of_another_shape_is_named_before_anything_is_written(qwen3, tmp_path):
    """Every expert of a per-expert layer must hold the same tensors, dtypes and shapes (_check_same_layout): the
    message names the odd expert's key, what it is and what the others are."""
    import re

    path, model, adapter = qwen3
    plan = spread_plan(path, model, adapter)
    original = load_file(str(path / "model.safetensors"))
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    rows, cols = original[key].shape
    for name, change, message in [
        ("odd", lambda t: t.__setitem__(key, t[key][:-1].clone()),
         f"layer 1: tensor {key} is F32 [{rows - 1}, {cols}] but the other experts' are F32 [{rows}, {cols}]; "
         "the checkpoint is corrupt (re-download it)"),
        ("bf16", lambda t: t.__setitem__(key, t[key].to(torch.bfloat16)),
         f"layer 1: tensor {key} is BF16 [{rows}, {cols}] but the other experts' are F32 [{rows}, {cols}]"),
        ("missing", lambda t: t.pop(key),
         f"layer 1: tensor {key} is missing from the shards though the other experts have it"),
    ]:
        src = tmp_path / name
        shutil.copytree(path, src)
        tensors = dict(original)
        change(tensors)
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=re.escape(message)):
            compile_checkpoint(src, plan, tmp_path / f"out-{name}", progress=False)
        assert_nothing_written(tmp_path / f"out-{name}")


def test_an_interrupted_threaded_copy_leaves_no_output_and_no_thread(tmp_path, monkeypatch):
    """Ctrl-C (or the SIGTERM premoe turns into it) while threads copy: the parts not started are cancelled, the
    running ones finish before the temp dir is removed, and no copy thread outlives the compile."""
    import threading

    import premoe.compile as compile_module

    path, plan = _dsv3_fp8(tmp_path)
    monkeypatch.setattr(compile_module, "_JOB_BYTES", 4096)  # many parts per shard
    real, calls = compile_module._run_job, []

    def interrupted(job, advance):
        calls.append(job.dest.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(job, advance)

    monkeypatch.setattr(compile_module, "_run_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compile_checkpoint(path, plan, tmp_path / "out", progress=False, threads=4)
    assert_nothing_written(tmp_path / "out")
    assert not [t for t in threading.enumerate() if t.name.startswith("premoe-copy")]
    jobs = sum(len(compile_module._copy_jobs(path / s, tmp_path / s, layout.runs, 0, 0))
               for s, layout in compile_module.plan_writes(path, plan, tmp_path / "x").layouts.items())
    assert 5 <= len(calls) <= 5 + 3 < jobs  # at most the parts running beside it: the rest never start


def test_a_header_that_does_not_tile_its_data_is_refused_before_its_bytes_are_copied(tmp_path, monkeypatch):
    """Each output header is checked as read_header checks a shard before its bytes are copied: a layout whose
    entries do not tile the data section (here one entry a byte short) stops the compile with nothing written."""
    import premoe.compile as compile_module

    path, plan = _dsv3_fp8(tmp_path)
    real = compile_module._shard_layout

    def broken(writes, metadata):
        layout = real(writes, metadata)
        entry = next(iter(layout.entries.values()))
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] - 1]
        return layout

    monkeypatch.setattr(compile_module, "_shard_layout", broken)
    with pytest.raises(CheckpointError, match="spans .* bytes but .* needs"):
        compile_checkpoint(path, plan, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")
