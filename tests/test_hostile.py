"""Hostile inputs found by the sweep in docs/hostile.md: each once gave exit 70, a hang or a silently wrong result.

Every case asserts the one-line premoe error that replaced it (the file/key/option named, the fix given).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tiny
from checkpoints import save_family, spread_plan
from premoe.compile import compile_checkpoint, compiled_info
from premoe.errors import CheckpointError, DiskSpaceError, InputError, MissingFileError, PlanError, PremoeError
from premoe.fileio import check_output, read_small_text
from premoe.modeling import check_config, load_model
from premoe.plan import Plan, PlanRequest, make_plan
from premoe.route.config import load_config
from premoe.store import Store
from test_hardening_cli import fails
from test_plan import toy_profile, valid_plan
from test_store import known_store


def _copy_with_config(src: Path, dest: Path, **fields) -> Path:
    """``src`` copied to ``dest`` with config.json fields replaced (None: removed)."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(fields)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


# --------------------------------------------------------------------------- config.json


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.integers(-5, 0), st.floats(allow_nan=True), st.text(max_size=3), st.booleans(),
                       st.lists(st.integers(), max_size=2)))
def test_bad_expert_counts_are_refused_before_transformers_builds(tiny_qwen3, tmp_path_factory, value):
    path = _copy_with_config(tiny_qwen3, tmp_path_factory.mktemp("c") / "m", num_local_experts=value)
    with pytest.raises(CheckpointError, match=r"config.json: num_local_experts must be a positive integer, got"):
        check_config(path)


@pytest.mark.parametrize("top_k", [0, 9, "2", 2.0])
def test_top_k_outside_the_expert_count_is_refused(tiny_qwen3, tmp_path, top_k):
    path = _copy_with_config(tiny_qwen3, tmp_path / "m", num_experts_per_tok=top_k)
    with pytest.raises(CheckpointError, match=r"num_experts_per_tok must be an integer in 1\.\.8 .*got"):
        check_config(path)


def test_a_config_that_is_a_json_list_is_one_line(capsys, monkeypatch, tiny_qwen3, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny_qwen3, path)
    (path / "config.json").write_text("[1, 2]")
    fails(capsys, monkeypatch, "profile", path, "--data", f"a={tiny_qwen3 / 'config.json'}", "--out",
          tmp_path / "p", expect="holds a JSON list, expected an object of config fields")


def test_layers_missing_from_the_weights_are_refused_not_randomly_initialised(tiny_qwen3, tmp_path):
    layers = json.loads((tiny_qwen3 / "config.json").read_text())["num_hidden_layers"]
    path = _copy_with_config(tiny_qwen3, tmp_path / "m", num_hidden_layers=layers + 1)
    with pytest.raises(CheckpointError, match=rf"the weights lack \d+ tensors .*model\.layers\.{layers}\."):
        load_model(path)
    assert load_model(tiny_qwen3).config.num_hidden_layers == layers  # the intact checkpoint still loads


def test_layers_the_config_no_longer_declares_are_refused_not_dropped(tiny_qwen3, tmp_path):
    layers = json.loads((tiny_qwen3 / "config.json").read_text())["num_hidden_layers"]
    path = _copy_with_config(tiny_qwen3, tmp_path / "m", num_hidden_layers=layers - 1)
    with pytest.raises(CheckpointError, match=rf"decoder layers \[{layers - 1}\] beyond config.json's num_hidden"):
        load_model(path)


def test_symlink_loops_as_model_or_output_are_one_line(capsys, monkeypatch, tiny_qwen3, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    text = tmp_path / "t.txt"
    text.write_text(tiny.TEXT)
    fails(capsys, monkeypatch, "profile", tmp_path / "a", "--data", f"x={text}", "--out", tmp_path / "p",
          expect="is a symlink loop")
    fails(capsys, monkeypatch, "profile", tiny_qwen3, "--data", f"x={text}", "--out", tmp_path / "a",
          expect="is a symlink loop")


# --------------------------------------------------------------------------- small JSON inputs, outputs


def test_devices_are_not_read_as_plans_or_route_configs(tmp_path):
    with pytest.raises(PlanError, match="not a regular file"):
        Plan.load("/dev/zero")  # was read until MemoryError
    with pytest.raises(InputError, match="route config /dev/zero is not a regular file"):
        load_config("/dev/zero")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2048)
    with pytest.raises(InputError, match="larger than 0 MiB"):
        read_small_text(big, "plan", limit=1024)


def test_virtual_file_systems_are_not_outputs():
    with pytest.raises(DiskSpaceError, match="/proc is not on a disk"):
        check_output("/proc/premoe-out")


@pytest.mark.parametrize("layer, experts, message", [
    ("\u00b2", [0, 1, 2, 3], r"layer key '\u00b2', expected a decimal layer index"),  # isdigit() but not int()
    ("0", [0, 1, 2, float("inf")], r"kept\['0'\] .*integer expert indices, got \[inf\]"),
    ("0", [0, 1, 2, True], r"got \[True\]"),
])
def test_plan_entries_name_what_is_wrong(tmp_path, layer, experts, message):
    path = valid_plan().save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    data["kept"][layer] = experts
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_keep_that_rounds_below_top_k_names_keep():
    with pytest.raises(PlanError, match=r"--keep 0.01 of 8 experts gives M = 1 is below top-k = 2"):
        make_plan(toy_profile(), PlanRequest(keep=0.01, domain="a", scorer="router_mass"))


def test_a_domain_listed_twice_would_weigh_double_and_is_refused():
    with pytest.raises(InputError, match="domain a is listed twice"):
        toy_profile().generalist_utility("router_mass", ["a", "b", "a"])


def test_merging_a_profile_with_itself_is_refused(capsys, monkeypatch, tmp_path):
    toy_profile().save(tmp_path / "p")
    (tmp_path / "same").symlink_to(tmp_path / "p")
    fails(capsys, monkeypatch, "profile", "merge", tmp_path / "p", tmp_path / "same", "--out", tmp_path / "m",
          expect="is given twice (also as")
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- compile / verify


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint and a plan that keeps expert 1 of every layer."""
    path, model, adapter = save_family("qwen3_moe", tmp_path_factory.mktemp("s") / "model")
    plan = spread_plan(path, model, adapter, {l: [0, 1, 2, 3] for l in range(model.config.num_hidden_layers)})
    return path, plan


@pytest.mark.parametrize("damage, message", [
    (lambda t, k: t.pop(k), r"tensor \S+experts\.1\.down_proj\.weight is missing from the shards"),
    (lambda t, k: t.__setitem__(k, t[k][:, :3].contiguous()), r"experts\.1\.down_proj\.weight is F32 \[\d+, 3\] but"),
])
def test_an_expert_lacking_a_projection_is_not_compiled(spread, tmp_path, damage, message):
    source, plan = spread
    model = tmp_path / "model"
    shutil.copytree(source, model)
    tensors = load_file(model / "model.safetensors")
    damage(tensors, next(k for k in sorted(tensors) if "layers.0.mlp.experts.1.down_proj" in k))
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        compile_checkpoint(model, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("block", ["junk", {"source": "x"}, {"source": {"name": "m", "config_hash": "h"},
                                                             "kept_experts": {"0": ["1"]}, "experts_per_layer": {},
                                                             "export": "uniform"}])
def test_a_malformed_premoe_block_is_one_line(spread, tmp_path, block):
    source, plan = spread
    out = tmp_path / "c"
    compile_checkpoint(source, plan, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "premoe": block}))
    with pytest.raises(CheckpointError, match="malformed 'premoe' block"):
        compiled_info(out)


# --------------------------------------------------------------------------- store, route


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["domains", "matcher", "novelty", "ngram", "scorer", "moe_layers", "calibration"]),
       value=st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)))
def test_a_damaged_store_manifest_loads_or_fails_in_one_line(tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("st") / "store"
    known_store(path).save(path)
    manifest = json.loads((path / "store.json").read_text())
    manifest[key] = value
    (path / "store.json").write_text(json.dumps(manifest))
    try:
        Store.load(path)
    except PremoeError as e:
        assert "store.json" in str(e) and "\n" not in str(e)


@pytest.mark.parametrize("edit, message", [
    ({"matcher": {"params": {"method": "magic"}}}, "retrieval method must be one of"),
    ({"matcher": {"params": {"lengths": [-1, "x"]}}}, "request-length buckets must be positive"),
])
def test_a_store_with_a_bad_matcher_is_refused_when_loaded(tmp_path, edit, message):
    path = tmp_path / "store"
    known_store(path).save(path)
    manifest = json.loads((path / "store.json").read_text())
    manifest["matcher"]["params"].update(edit["matcher"]["params"])
    (path / "store.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=message):
        Store.load(path)


@pytest.mark.parametrize("field, value, message", [
    ("health_interval", math.nan, "must be a positive number, got nan"),
    ("connect_timeout", math.inf, "must be a positive number, got inf"),
    ("retrieval_tokens", math.inf, "must be a positive number, got inf"),
    ("retrieval_tokens", 2.5, "must be a whole number of tokens, got 2.5"),
])
def test_route_config_numbers_must_be_finite(tmp_path, field, value, message):
    config = {"model": "testbed", "store": "store", field: value,
              "backends": {"generalist": {"url": "http://127.0.0.1:1"}}}
    (tmp_path / "r.json").write_text(json.dumps(config))  # json writes NaN / Infinity, as a hand edit might
    with pytest.raises(InputError, match=message):
        load_config(tmp_path / "r.json")


def test_dangling_model_symlink_is_missing_not_internal(tmp_path):
    (tmp_path / "m").symlink_to(tmp_path / "gone")
    with pytest.raises(MissingFileError, match="symlink to nowhere"):
        check_config(tmp_path / "m")



@pytest.mark.parametrize("body, chat, message", [
    (b'{"prompt": ""}', False, "'prompt' must be a non-empty string, not an empty string"),
    (b'{"messages": []}', True, "'messages' must be a non-empty list of {role, content} objects, not an empty list"),
])
def test_empty_request_fields_say_empty(body, chat, message):
    from premoe.guard import ApiError
    from premoe.openai_request import parse_request

    with pytest.raises(ApiError) as raised:
        parse_request(body, chat)
    assert raised.value.status == 400 and raised.value.message == message


def test_a_sweep_dry_run_refuses_scorers_the_run_would_refuse(tiny_qwen3, tmp_path):
    from premoe.modeling import model_identity
    from premoe.sweep import SweepConfig, estimate_sweep

    profile = toy_profile()
    profile.model = model_identity(tiny_qwen3)
    profile.save(tmp_path / "p")
    with pytest.raises(InputError, match="scorer 'nope' was not collected in this profile"):
        estimate_sweep(tiny_qwen3, tmp_path / "p", tmp_path / "s", SweepConfig(scorers=["nope"], default_scorer="router_mass"),
                       eval_data=[f"a={tiny_qwen3 / 'config.json'}"])


def test_an_empty_keep_list_is_refused():
    import click

    from premoe.cli.options import FRACTION, ListOf

    with pytest.raises(click.BadParameter, match="lists no values"):
        ListOf(FRACTION, allow_empty=False).convert(",", None, None)
    assert ListOf(FRACTION).convert("", None, None) == []  # --calib-tokens "": the study is off


@pytest.mark.parametrize("name", ["org/x\nlicense: evil", "org/x\n", "../../etc/passwd x", "/abs/path"])
def test_base_model_must_be_a_hub_id(spread, tmp_path, name):
    source, plan = spread
    with pytest.raises(InputError, match="is not a Hugging Face Hub id"):
        compile_checkpoint(source, plan, tmp_path / "out", base_model=name)
    assert not (tmp_path / "out").exists()


def test_a_busy_port_or_unknown_host_is_refused_before_the_model_loads():
    import socket

    from premoe.guard import check_bindable

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InputError, match=rf"cannot listen on 127.0.0.1:{port}: Address already in use"):
            check_bindable("127.0.0.1", port)
    with pytest.raises(InputError, match="--host '999.1.1.1' is not an address"):
        check_bindable("999.1.1.1", 8000)


def test_route_config_names_the_dsv3_testbed_not_a_relative_path(tmp_path):
    config = {"model": "testbed-dsv3", "store": "store", "backends": {"generalist": {"url": "http://127.0.0.1:1"}}}
    (tmp_path / "r.json").write_text(json.dumps(config))
    assert load_config(tmp_path / "r.json").model == "testbed-dsv3"


def test_an_output_below_a_file_says_so(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DiskSpaceError, match=r"f is a file, not a directory"):
        check_output(tmp_path / "f" / "sub")


def test_a_data_path_with_a_control_character_is_shown_quoted(tmp_path):
    from premoe.data import parse_sources

    with pytest.raises(MissingFileError, match=r"data path '.*d\.txt\\x01' does not exist"):
        parse_sources([f"a={tmp_path / 'd.txt'}\x01"], tokenizer=tiny.tiny_tokenizer(), max_tokens=8)
