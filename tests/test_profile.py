"""Profiles: round trip, merge = profiling the union, generalist weighting, coverage, and input errors."""
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from premoe.capture import DomainStats
from premoe.data import Source
from premoe.errors import CheckpointError, InputError, MissingFileError, OutputExistsError, UnsupportedModelError
from premoe.profile import Profile, ProfileParams, profile_model
from premoe.errors import PremoeError

PARAMS = ProfileParams(max_tokens=160, seq_len=32, batch_size=2)
SCORERS = ["peu", "tcess", "frequency", "router_mass", "reap"]
A = Source("code", [tiny.TEXT[:700]], "code.txt")
B = Source("bible", [tiny.TEXT[700:1500]], "bible.txt")


@pytest.fixture(scope="module")
def both(tiny_qwen3) -> Profile:
    return profile_model(tiny_qwen3, [A, B], SCORERS, PARAMS, progress=False)


def assert_same_stats(x: DomainStats, y: DomainStats) -> None:
    assert x.tokens == y.tokens
    assert torch.equal(x.routed, y.routed)
    assert x.sums.keys() == y.sums.keys()
    for name in x.sums:
        assert torch.allclose(x.sums[name], y.sums[name], rtol=1e-12, atol=1e-9), name


def test_round_trip(both, tmp_path):
    out = both.save(tmp_path / "prof")
    loaded = Profile.load(out)
    for field in ("model", "family", "moe_layers", "num_experts", "top_k", "scorers", "params", "data", "timing",
                  "architecture"):
        assert getattr(loaded, field) == getattr(both, field), field
    assert loaded.domains.keys() == both.domains.keys()
    for domain in both.domains:
        assert_same_stats(loaded.domains[domain], both.domains[domain])
    assert torch.equal(loaded.utility("code", "peu"), both.utility("code", "peu"))
    with pytest.raises(OutputExistsError, match="--force"):
        both.save(out)
    both.save(out, force=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_load_errors(both, tmp_path):
    with pytest.raises(MissingFileError, match="premoe profile"):
        Profile.load(tmp_path / "nothing")
    out = both.save(tmp_path / "prof")
    manifest = json.loads((out / "profile.json").read_text())
    (out / "profile.json").write_text(json.dumps({**manifest, "format": "premoe-profile/99"}))
    with pytest.raises(CheckpointError, match="premoe-profile/99"):
        Profile.load(out)


def test_merge_of_two_profiles_equals_profiling_the_union(both, tiny_qwen3):
    merged = profile_model(tiny_qwen3, [A], SCORERS, PARAMS, progress=False).merge(
        profile_model(tiny_qwen3, [B], SCORERS, PARAMS, progress=False))
    assert list(merged.domains) == ["code", "bible"]
    for domain in both.domains:
        assert_same_stats(merged.domains[domain], both.domains[domain])
    assert merged.data == both.data
    twice = both.merge(both)  # the same domain in both: sums and tokens add
    assert twice.domains["code"].tokens == 2 * both.domains["code"].tokens
    assert torch.allclose(twice.utility("code", "peu"), both.utility("code", "peu"))


def test_merge_refuses_other_models_and_scorers(both):
    other_model = Profile({**both.model, "config_hash": "other", "name": "other"}, both.family, both.moe_layers,
                          both.num_experts, both.top_k, both.scorers, both.domains)
    with pytest.raises(InputError, match="different models"):
        both.merge(other_model)
    fewer = Profile(both.model, both.family, both.moe_layers, both.num_experts, both.top_k,
                    {"peu": both.scorers["peu"]}, both.domains)
    with pytest.raises(InputError, match="different scorers"):
        both.merge(fewer)


@pytest.mark.parametrize("key, flag", [("seq_len", "--seq-len"), ("generate", "--generate")])
def test_merge_refuses_profiles_of_other_windows(both, key, flag):
    other = Profile(both.model, both.family, both.moe_layers, both.num_experts, both.top_k, both.scorers,
                    both.domains, {**both.params, key: both.params[key] + 7})
    with pytest.raises(InputError, match=f"different {flag} "):
        both.merge(other)
    with pytest.raises(InputError, match=f"different {flag} "):
        other.merge(both)
    bigger = Profile(both.model, both.family, both.moe_layers, both.num_experts, both.top_k, both.scorers,
                     both.domains, {**both.params, "max_tokens": both.params["max_tokens"] + 1, "batch_size": 1})
    assert both.merge(bigger).params == both.params  # a cap and a batch size do not change a token's statistics


def toy() -> Profile:
    """Two domains, one layer, two experts: a puts everything on expert 0 (10 tokens), b on expert 1 (30 tokens)."""
    stats = {
        "a": DomainStats(10, {"router_mass": torch.tensor([[10.0, 0.0]], dtype=torch.float64),
                              "reap": torch.tensor([[6.0, 0.0]], dtype=torch.float64)},
                         torch.tensor([[10.0, 0.0]], dtype=torch.float64)),
        "b": DomainStats(30, {"router_mass": torch.tensor([[0.0, 30.0]], dtype=torch.float64),
                              "reap": torch.tensor([[2.0, 9.0]], dtype=torch.float64)},
                         torch.tensor([[2.0, 30.0]], dtype=torch.float64)),
    }
    scorers = {"router_mass": {"kind": "router_mass", "params": {}, "per_routed_token": False},
               "reap": {"kind": "reap", "params": {}, "per_routed_token": True}}
    return Profile({"name": "toy", "path": "-", "model_type": None, "config_hash": "h"}, "Toy", [0], 2, 1, scorers, stats)


def test_generalist_token_weighted_vs_balanced():
    profile = toy()
    tokens = profile.generalist_utility("router_mass")  # (10 + 0, 0 + 30) / 40
    assert torch.allclose(tokens, torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    balanced = profile.generalist_utility("router_mass", weighting="balanced")  # mean of (1, 0) and (0, 1)
    assert torch.allclose(balanced, torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    # per-routed-token scorers divide by the tokens routed to each expert: (6 + 2) / 12, 9 / 30
    assert torch.allclose(profile.generalist_utility("reap"), torch.tensor([[8 / 12, 9 / 30]], dtype=torch.float64))
    assert torch.allclose(profile.utility("b", "reap"), torch.tensor([[1.0, 0.3]], dtype=torch.float64))
    assert torch.allclose(profile.generalist_utility("router_mass", ["a"]), profile.utility("a", "router_mass"))
    with pytest.raises(InputError, match="'tokens' or 'balanced'"):
        profile.generalist_utility("router_mass", weighting="median")
    with pytest.raises(InputError, match="not in this profile"):
        profile.utility("c", "router_mass")
    with pytest.raises(InputError, match="--scorers peu"):
        profile.utility("a", "peu")


def test_coverage_counts_experts_up_to_the_mass():
    stats = DomainStats(1, {"router_mass": torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]],
                                                          dtype=torch.float64)}, torch.zeros(2, 4))
    profile = Profile({"name": "t", "path": "-", "model_type": None, "config_hash": "h"}, "T", [0, 1], 4, 1,
                      {"router_mass": {"kind": "router_mass", "params": {}, "per_routed_token": False}}, {"d": stats})
    assert profile.coverage("d", mass=0.9) == [3, 4]  # 0.5 + 0.3 + 0.15 = 0.95; uniform needs 3.6 -> 4
    assert profile.coverage("d", mass=0.8) == [2, 4]  # exactly 0.8 with two experts counts as covered
    assert profile.coverage("d", mass=0.5) == [1, 2]


def test_empty_data_is_refused_before_loading(tmp_path):
    missing_model = tmp_path / "not-a-model"
    with pytest.raises(InputError, match="no calibration data"):
        profile_model(missing_model, [], SCORERS, PARAMS, progress=False)
    with pytest.raises(InputError, match="contains no text"):
        profile_model(missing_model, [Source("blank", ["  \n"], "blank.txt")], SCORERS, PARAMS, progress=False)
    with pytest.raises(InputError, match="names repeat"):
        profile_model(missing_model, [A, A], SCORERS, PARAMS, progress=False)


def test_a_model_without_experts_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in tiny.COMMON.items()}, intermediate_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    tiny.tiny_tokenizer().save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedModelError):
        profile_model(tmp_path / "llama", [A], SCORERS, PARAMS, progress=False)


def test_a_corrupt_checkpoint_is_refused(tiny_qwen3, tmp_path):
    broken = shutil.copytree(tiny_qwen3, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    with pytest.raises(CheckpointError):
        profile_model(broken, [A], SCORERS, PARAMS, progress=False)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        profile_model(broken, [A], SCORERS, PARAMS, progress=False)


def test_the_architecture_plan_needs_is_recorded(both, tiny_qwen3):
    arch = both.architecture
    assert {k: arch[k] for k in ("top_k", "n_group", "topk_group", "renormalises", "scoring")} == \
        {"top_k": 2, "n_group": 1, "topk_group": 1, "renormalises": True, "scoring": "softmax"}
    from premoe.adapters import get_adapter
    from premoe.checkpoint import size_breakdown
    from premoe.modeling import read_config

    assert both.sizes() == size_breakdown(tiny_qwen3, get_adapter(read_config(tiny_qwen3)), 8)


def test_an_old_profile_without_architecture_still_loads(both, tmp_path):
    out = both.save(tmp_path / "prof")
    manifest = json.loads((out / "profile.json").read_text())
    del manifest["architecture"]
    manifest["scorers"]["reap"]["params"] = {}  # how profiles recorded REAP before it was renormalised
    (out / "profile.json").write_text(json.dumps(manifest))
    old = Profile.load(out)
    assert old.architecture == {}
    assert old.groups == (1, 1)  # read once from the model directory, which still exists
    assert old.architecture["sizes"] == both.architecture["sizes"]
    assert both.scorers["reap"]["params"] == {"renormalise": "model"}
    assert old.scorers["reap"]["params"] == {"renormalise": False}  # told apart from today's reap


def test_generated_tokens_are_scored(tiny_qwen3):
    """--generate profiles the text plus the model's own greedy continuation, not the text alone."""
    from premoe.adapters import get_adapter
    from premoe.capture import RouterCapture
    from premoe.data import token_windows
    from premoe.modeling import load_model, load_tokenizer
    from premoe.profile import resolve_scorers

    params = ProfileParams(max_tokens=96, seq_len=24, batch_size=2, generate=8)
    generated = profile_model(tiny_qwen3, [A], ["frequency", "router_mass"], params, progress=False)
    model, tokenizer = load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)
    windows = token_windows(A.texts, tokenizer, 16, 96)  # (6, 16): the text part of each window
    with RouterCapture(model, get_adapter(model.config), resolve_scorers(["frequency", "router_mass"])) as capture:
        for start in range(0, windows.shape[0], 2):
            batch = windows[start : start + 2]
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=8,
                                 min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            assert out.shape == (batch.shape[0], 24)
            capture.run(out)
    stats = generated.domains["code"]
    assert stats.tokens == windows.shape[0] * 24  # 16 text + 8 generated tokens per window
    assert_same_stats(stats, capture.stats)


def _profile_files(both, tmp_path):
    out = both.save(tmp_path / "prof", force=True)
    return out, json.loads((out / "profile.json").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda m: {**m, "num_experts": "8"}, "num_experts must be an integer"),
    (lambda m: {**m, "moe_layers": []}, "moe_layers must be a non-empty list"),
    (lambda m: {**m, "moe_layers": [0, 0]}, "moe_layers must be a non-empty list"),
    (lambda m: {**m, "top_k": 99}, "top_k must be an integer in 1..num_experts"),
    (lambda m: {**m, "domains": {"code": {"tokens": -1}}}, r"domains\['code'\]"),
    (lambda m: {**m, "scorers": {"peu": {"kind": "nonsense", "params": {}, "per_routed_token": False}}},
     r"scorers\['peu'\]"),
    (lambda m: {**m, "model": "x"}, "model must be a JSON dict"),
    (lambda m: [1, 2], "not a JSON object"),
    (lambda m: {**m, "num_experts": 4}, r"expected float \(2, 4\)"),
    (lambda m: {**m, "domains": {**m["domains"], "extra": {"tokens": 3}}}, "no tensor 'extra/"),
])
def test_load_refuses_a_malformed_manifest(both, tmp_path, edit, message):
    out, manifest = _profile_files(both, tmp_path)
    (out / "profile.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(CheckpointError, match=message):
        Profile.load(out)


def test_load_refuses_nan_and_misshapen_tensors(both, tmp_path):
    from safetensors.torch import load_file, save_file

    out, _ = _profile_files(both, tmp_path)
    original = load_file(str(out / "scores.safetensors"))
    for key, value, message in [("code/peu", float("nan"), "NaN, infinite"),
                                ("code/reap", float("inf"), "NaN, infinite"),
                                ("bible/routed", -1.0, "NaN, infinite or negative")]:
        tensors = dict(original)
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
        save_file(tensors, str(out / "scores.safetensors"))
        with pytest.raises(CheckpointError, match=message):
            Profile.load(out)
    save_file({**original, "code/peu": original["code/peu"][:, :4].contiguous()}, str(out / "scores.safetensors"))
    with pytest.raises(CheckpointError, match=r"code/peu is float64 \(2, 4\), expected float \(2, 8\)"):
        Profile.load(out)
    (out / "scores.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(CheckpointError, match="not a readable premoe profile|corrupt or truncated"):
        Profile.load(out)
    (out / "profile.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable premoe profile|corrupt or truncated"):
        Profile.load(out)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.floats() | st.text(max_size=3),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                max_size=3), max_leaves=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["model", "family", "moe_layers", "num_experts", "top_k", "scorers", "domains",
                            "params", "architecture", "format"]), value=_JSON,
       tensor=st.sampled_from(["code/peu", "bible/routed", "code/reap", None]),
       shape=st.sampled_from([(2, 8), (8, 2), (2, 7), (16,), (2, 8, 1)]),
       fill=st.sampled_from([0.0, 1.5, -2.0, float("nan"), float("-inf")]))
def test_mutated_profiles_load_cleanly_or_fail_cleanly(both, tmp_path, key, value, tensor, shape, fill):
    from safetensors.torch import load_file, save_file

    out, manifest = _profile_files(both, tmp_path)
    manifest[key] = value
    (out / "profile.json").write_text(json.dumps(manifest))
    if tensor is not None:
        tensors = load_file(str(out / "scores.safetensors"))
        tensors[tensor] = torch.full(shape, fill, dtype=torch.float64)
        save_file(tensors, str(out / "scores.safetensors"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    try:
        loaded = Profile.load(out)
    except PremoeError as e:
        assert "\n" not in str(e)
    else:
        for domain in loaded.domains:  # whatever loads has finite (layers, experts) tensors
            for t in [*loaded.domains[domain].sums.values(), loaded.domains[domain].routed]:
                assert t.shape == (len(loaded.moe_layers), loaded.num_experts) and torch.isfinite(t).all()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
