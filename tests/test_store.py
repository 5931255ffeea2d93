"""Pattern store: what it holds, round trip, adding domains, and the `premoe store` verbs."""
import json

import pytest
import torch
from click.testing import CliRunner

import domains
from premoe.errors import CheckpointError, InputError, MissingFileError, OutputExistsError
from premoe.modeling import load_model, load_tokenizer
from premoe.plan import PlanRequest, make_plan
from premoe.profile import Profile
from premoe.store import FORMAT, GENERALIST, Store, build_store


@pytest.fixture(scope="module")
def built(tiny_qwen3):
    loaded = load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)
    profile, store = domains.make_store(tiny_qwen3, loaded)
    return profile, store


def test_patterns_and_rankings_come_from_the_profile(built):
    profile, store = built
    assert store.domains == list(domains.DOMAINS)
    for domain in domains.DOMAINS:
        utility = profile.utility(domain, "router_mass")  # (layers, experts)
        assert torch.equal(store.pattern(domain), utility[0])
        ranking = store.ranking(domain)
        assert sorted(ranking[1].tolist()) == list(range(profile.num_experts))  # a permutation
        assert torch.all(utility.gather(1, ranking).diff(dim=1) <= 0)  # best first
    assert torch.equal(store.pattern(GENERALIST), profile.generalist_utility("router_mass")[0])


def test_kept_is_the_plans_choice(built):
    profile, store = built
    for domain in domains.DOMAINS:
        assert store.kept(domain, 4) == make_plan(profile, PlanRequest(experts=4, domain=domain, scorer="router_mass")).kept
    assert store.kept(GENERALIST, 4) == make_plan(profile, PlanRequest(experts=4, scorer="router_mass")).kept


def test_threshold_is_calibrated_above_own_domain_distances(built):
    _, store = built
    assert set(store.threshold) == {"l2", "cosine"}
    for metric, per_domain in store.calibration["quantile_per_domain"].items():
        assert store.threshold[metric] >= max(per_domain.values())
        assert store.threshold[metric] > 0


def test_round_trip(built, tmp_path):
    _, store = built
    store.save(tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "store.json").read_text())
    assert manifest["format"] == FORMAT and manifest["scorer"] == "router_mass"
    assert manifest["model"]["config_hash"] == store.model["config_hash"]
    again = Store.load(tmp_path / "store")
    assert again.domains == store.domains and again.threshold == store.threshold
    assert again.moe_layers == store.moe_layers
    for target in [*store.domains, GENERALIST]:
        assert torch.equal(again.pattern(target), store.pattern(target))
        assert torch.equal(again.ranking(target), store.ranking(target))
        assert again.kept(target, 4) == store.kept(target, 4)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "store" / "patterns.safetensors"))
    assert torch.equal(saved["code/pattern"], store.pattern("code"))
    assert torch.equal(saved[f"{GENERALIST}/ranking"], store.ranking(GENERALIST))
    with pytest.raises(OutputExistsError):
        store.save(tmp_path / "store")
    store.save(tmp_path / "store", force=True)


def test_add_domain_recomputes_the_generalist(built, tiny_qwen3):
    profile, store = built
    first = Profile(profile.model, profile.family, profile.moe_layers, profile.num_experts, profile.top_k,
                    profile.scorers, {d: profile.domains[d] for d in ("code", "bible")}, profile.params)
    third = Profile(profile.model, profile.family, profile.moe_layers, profile.num_experts, profile.top_k,
                    profile.scorers, {"de": profile.domains["de"]}, profile.params)
    grown = build_store(tiny_qwen3, first).add_domain(third)
    assert grown.domains == ["code", "bible", "de"]
    assert torch.allclose(grown.pattern(GENERALIST), store.pattern(GENERALIST), rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="already in the store"):
        grown.add_domain(third)
    other = Profile({**profile.model, "config_hash": "0" * 16}, profile.family, profile.moe_layers,
                    profile.num_experts, profile.top_k, profile.scorers, {"x": profile.domains["de"]})
    with pytest.raises(InputError, match="profile the store's model"):
        grown.add_domain(other)


def test_bad_inputs(built, tiny_qwen3, tmp_path):
    profile, _ = built
    with pytest.raises(InputError, match="scorer 'reap' was not collected"):
        build_store(tiny_qwen3, profile, "reap")
    with pytest.raises(InputError, match="no held-out data names a stored domain"):
        build_store(tiny_qwen3, profile, held_out=[domains.Source("klingon", ["qapla"], "x")])
    with pytest.raises(MissingFileError, match="premoe store build"):
        Store.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "store.json").write_text(json.dumps({"format": "premoe-store/0"}))
    with pytest.raises(CheckpointError, match="premoe-store/1"):
        Store.load(tmp_path / "bad")


def test_cli_build_add_query(built, tiny_qwen3, tmp_path):
    from premoe.cli import cli

    profile, _ = built
    two = Profile(profile.model, profile.family, profile.moe_layers, profile.num_experts, profile.top_k,
                  profile.scorers, {d: profile.domains[d] for d in ("code", "bible")}, profile.params)
    two.save(tmp_path / "prof2")
    Profile(profile.model, profile.family, profile.moe_layers, profile.num_experts, profile.top_k, profile.scorers,
            {"de": profile.domains["de"]}, profile.params).save(tmp_path / "prof-de")
    held = []
    for domain in ("code", "bible"):
        (tmp_path / f"{domain}.txt").write_text("".join(domains.texts(domain, 1000, 2)))
        held += ["--held-out", f"{domain}={tmp_path / f'{domain}.txt'}"]
    runner = CliRunner()
    out = tmp_path / "store"
    result = runner.invoke(cli, ["store", "build", str(tiny_qwen3), "--profile", str(tmp_path / "prof2"),
                                 "--out", str(out), "--calib-tokens", "32", *held], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "domains code, bible" in result.output and "l2" in result.output
    result = runner.invoke(cli, ["store", "add", str(out), "--profile", str(tmp_path / "prof-de")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert Store.load(out).domains == ["code", "bible", "de"]
    text = domains.texts("code", 4000, 1)[0]
    result = runner.invoke(cli, ["store", "query", str(out), text, "--tokens", "16", "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    hit = json.loads(result.stdout)
    assert hit["tokens"] == 16 and set(hit["distances"]) == {"code", "bible", "de"}
    result = runner.invoke(cli, ["store", "query", str(out), text, "--metric", "cosine"], catch_exceptions=False)
    assert result.exit_code == 0 and "cosine" in result.output and "bible" in result.output
