"""Pattern store: what it keeps, round trip, adding domains, and the `premoe store` verbs."""
import json

import pytest
import torch
from click.testing import CliRunner

import domains
from premoe.capture import DomainStats
from premoe.errors import CheckpointError, InputError, MissingFileError, OutputExistsError
from premoe.matchers import MatchParams, fit_matcher
from premoe.modeling import load_model, load_tokenizer
from premoe.profile import Profile
from premoe.scores import PRESETS
from premoe.novelty import NoveltyParams
from premoe.store import FORMAT, GENERALIST, PatternData, Store, build_store, calibration_ids

PEU = {"kind": "peu", "params": dict(PRESETS["peu"].params), "per_routed_token": False}


@pytest.fixture(scope="module")
def built(tiny_qwen3):
    loaded = load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)
    profile, store = domains.make_store(tiny_qwen3, loaded)
    return profile, store, loaded


def known_store(path) -> Store:
    """Two domains with hand-made ranking sums: a (1 token) and b (3 tokens), 4 experts, 2 MoE layers."""
    sums = {"a": [[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]],  # a's means = sums / 1
            "b": [[0.9, 0.05, 0.6, 0.2], [0.0, 0.3, 0.6, 0.9]]}  # b's means = sums / 3
    tokens = {"a": 1, "b": 3}
    stats = {d: DomainStats(tokens[d], {"peu": torch.tensor(s, dtype=torch.float64)}, torch.ones(2, 4)) for d, s in
             sums.items()}
    identity = {"name": "known", "path": str(path), "model_type": "qwen3_moe", "config_hash": "0" * 16}
    arch = {"top_k": 2, "n_group": 1, "topk_group": 1, "renormalises": True, "scoring": "softmax",
            "gate_changes_when_pruned": False, "sizes": None}  # what a profile records (profile.architecture_of)
    profile = Profile(identity, "Qwen3-MoE", [0, 1], 4, 2, {"peu": PEU}, stats, architecture=arch)
    bank = {d: {8: torch.randn(4, 3, generator=torch.Generator().manual_seed(i))} for i, d in enumerate(sums)}
    return Store(profile, "peu", fit_matcher(MatchParams(method="centroid", lengths=(8,)), bank))


def test_classify_adds_the_tokens_evidence_to_the_pattern(tmp_path):
    """A pattern at a's centroid but tokens that only b's text has: the weight decides, by premoe.ngram.combine."""
    from premoe.ngram import NgramParams, combine, fit_lms

    store = known_store(tmp_path / "nowhere")
    pattern = store.matcher.bank["a"][8].double().mean(0)  # (3,): exactly a's centroid
    ids = torch.tensor([2, 3, 2, 3, 2, 3, 2, 3])
    scores, matcher = store.classify(pattern, 8, None)  # no token models: the matcher alone, ids not needed
    assert torch.equal(scores, matcher) and int(scores.argmin()) == 0
    for weight, nearest in ((0.0, 1), (1e4, 0)):
        store.lms = fit_lms(NgramParams(pattern_weight=weight),
                            {"a": torch.tensor([0, 1] * 20), "b": torch.tensor([2, 3] * 20)}, vocab=4)
        scores, matcher = store.classify(pattern, 8, ids)
        assert int(scores.argmin()) == nearest
        assert torch.equal(scores, combine(store.lms.nll(ids[None]), matcher[None], 8, 3, weight)[0])
    with pytest.raises(InputError, match="pass their ids"):
        store.classify(pattern, 8, None)


def test_kept_sets_are_the_top_experts_by_the_ranking_scorer(tmp_path):
    store = known_store(tmp_path / "nowhere")
    assert store.kept("a", 2) == {0: [1, 3], 1: [0, 1]}
    assert store.kept("b", 2) == {0: [0, 2], 1: [2, 3]}
    # token-weighted generalist (eq. 11): (sums_a + sums_b) / 4 = [[1.0, .95, 1.1, .9], [.4, .6, .8, 1.0]] / 4;
    # the plain mean of the two domains' means ([.2, .46, .35, .38] in layer 0) would keep [1, 3] instead
    assert store.kept(GENERALIST, 2) == {0: [0, 2], 1: [2, 3]}
    assert store.kept(GENERALIST, 3) == {0: [0, 1, 2], 1: [1, 2, 3]}
    assert store.ranking("a").tolist() == [[1, 3, 2, 0], [0, 1, 2, 3]]


def test_ranking_uses_its_own_scorer_not_the_pattern_feature(built):
    profile, store, _ = built
    assert store.scorer == "peu_norm" and store.matcher.params.feature == "router_input"
    for domain in domains.DOMAINS:
        assert torch.equal(store.utility(domain), profile.utility(domain, "peu_norm"))
    assert torch.equal(store.utility(GENERALIST), profile.generalist_utility("peu_norm"))
    assert store.profile.scorers == {"peu_norm": profile.scorers["peu_norm"]}  # only the ranking scorer is kept


def test_thresholds_are_the_held_out_quantile(built, tiny_qwen3):
    _, store, loaded = built
    from premoe.adapters import get_adapter
    from premoe.patterns import PatternReader
    from premoe.store import read_patterns

    reader = PatternReader(loaded[0], get_adapter(loaded[0].config), "router_input")
    held = read_patterns(reader, loaded[1], domains.sources(1000, 4), (8, 16, 32), 1024, prefixes=True)
    for length, threshold in store.matcher.thresholds.items():
        best = store.matcher.scores(torch.cat([held[d][length] for d in held]), length).min(1).values
        assert threshold == pytest.approx(float(best.quantile(store.matcher.params.quantile)), rel=1e-12)
        assert (best > threshold).double().mean().item() <= 0.05 + 1 / len(best)
    from premoe.data import token_windows

    windows = [token_windows(src.texts, loaded[1], 32, 1 << 18) for src in domains.sources(1000, 4)]  # all held-out text
    assert sorted(store.detector.thresholds) == [8, 16, 32] and store.fallback_method == "joint"
    prefixes = read_patterns(reader, loaded[1], domains.sources(1000, 4), (8, 16, 32), 1 << 18, prefixes=True)
    for length, threshold in store.detector.thresholds.items():
        patterns = torch.cat([p[length] for p in prefixes.values()])  # (n, F): the same windows' prefixes
        novelty = store.detector.score(torch.cat([w[:, :length] for w in windows]),
                                       store.novelty_order(store.matcher.scores(patterns, length)), patterns.shape[1])
        assert threshold == pytest.approx(float(novelty.quantile(0.96)), rel=1e-12)
        assert store.fallback_threshold(length) == threshold


def test_round_trip(built, tmp_path):
    _, store, _ = built
    store.save(tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "store.json").read_text())
    assert manifest["format"] == FORMAT == "premoe-store/5" and manifest["scorer"] == "peu_norm"
    assert manifest["matcher"]["params"]["method"] == "lda"
    again = Store.load(tmp_path / "store")
    assert again.domains == store.domains and again.matcher.thresholds == store.matcher.thresholds
    assert again.matcher.params == store.matcher.params and again.moe_layers == store.moe_layers
    assert again.detector.manifest() == store.detector.manifest() == manifest["novelty"]
    assert all(torch.equal(again.detector.tensors()[k], v) for k, v in store.detector.tensors().items())
    assert again.lms.manifest() == store.lms.manifest() == manifest["ngram"] and again.detector.lms is again.lms
    assert manifest["ngram"]["params"] == {"use": True, "discount": 0.75, "delta": 0.5, "pattern_weight": 2.0,
                                           "max_tokens": 1 << 18}  # every parameter recorded
    assert set(again.lms.tensors()) == set(store.lms.tensors()) and all(
        torch.equal(again.lms.tensors()[k], v) for k, v in store.lms.tensors().items())
    patterns = torch.randn(5, store.matcher.bank["code"][8].shape[1], generator=torch.Generator().manual_seed(0))
    for length in (8, 16, 32):
        assert torch.allclose(again.matcher.scores(patterns, length), store.matcher.scores(patterns, length),
                              rtol=1e-12, atol=0)
    for target in [*store.domains, GENERALIST]:
        assert torch.equal(again.ranking(target), store.ranking(target))
    with pytest.raises(OutputExistsError):
        store.save(tmp_path / "store")
    store.save(tmp_path / "store", force=True)


def test_add_domain_refits_on_every_domain(built, tiny_qwen3):
    profile, store, loaded = built
    sub = lambda names: Profile(profile.model, profile.family, profile.moe_layers, profile.num_experts,  # noqa: E731
                                profile.top_k, profile.scorers, {d: profile.domains[d] for d in names}, profile.params)
    amounts = PatternData(tokens=2048, held_out_tokens=1024)
    first = build_store(tiny_qwen3, sub(["code", "bible"]), domains.sources(0)[:2], match=MatchParams(lengths=(8, 16, 32)),
                        amounts=amounts, loaded=loaded)
    de_ids = calibration_ids(loaded[1], domains.sources(0)[2:], 1 << 18)
    with pytest.raises(InputError, match="novelty tables; give the new domains' calibration token ids"):
        first.add_domain(sub(["de"]), {"de": store.matcher.bank["de"]})
    grown = first.add_domain(sub(["de"]), {"de": store.matcher.bank["de"]}, de_ids)
    assert grown.domains == ["code", "bible", "de"] == grown.detector.domains
    for name, tensor in store.detector.tensors().items():  # the same tables as built with all three at once
        assert torch.equal(grown.detector.tensors()[name], tensor), name
    assert torch.allclose(grown.utility(GENERALIST), store.utility(GENERALIST), rtol=0, atol=1e-12)
    for name, tensor in store.matcher.fitted.items():  # the same matcher as one fit on all three at once
        assert torch.allclose(grown.matcher.fitted[name], tensor, rtol=1e-9, atol=1e-9), name
    with pytest.raises(InputError, match="already in the store"):
        grown.add_domain(sub(["de"]), {"de": store.matcher.bank["de"]})
    other = Profile({**profile.model, "config_hash": "0" * 16}, profile.family, profile.moe_layers,
                    profile.num_experts, profile.top_k, profile.scorers, {"x": profile.domains["de"]})
    with pytest.raises(InputError, match="profile the store's model"):
        grown.add_domain(other, {"x": store.matcher.bank["de"]})


def test_bad_inputs(built, tiny_qwen3, tmp_path):
    profile, _, loaded = built
    with pytest.raises(InputError, match="scorer 'reap' was not collected"):
        build_store(tiny_qwen3, profile, domains.sources(0), scorer="reap", loaded=loaded)
    with pytest.raises(InputError, match="give text .* for exactly the profiled domains"):
        build_store(tiny_qwen3, profile, domains.sources(0)[:2], loaded=loaded)
    with pytest.raises(InputError, match="no held-out data names a stored domain"):
        build_store(tiny_qwen3, profile, domains.sources(0), [domains.Source("klingon", ["qapla"], "x")],
                    match=MatchParams(lengths=(8, 16)), loaded=loaded)
    with pytest.raises(InputError, match="retrieval method must be one of"):
        build_store(tiny_qwen3, profile, domains.sources(0), match=MatchParams(method="vibes"), loaded=loaded)
    with pytest.raises(MissingFileError, match="premoe store build"):
        Store.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "store.json").write_text(json.dumps({"format": "premoe-store/1"}))
    with pytest.raises(InputError, match="fallback score must be one of"):
        build_store(tiny_qwen3, profile, domains.sources(0), novelty=NoveltyParams(method="vibes"), loaded=loaded)
    with pytest.raises(CheckpointError, match="premoe-store/5"):
        Store.load(tmp_path / "bad")
    (tmp_path / "bad" / "store.json").write_text(json.dumps({"format": "premoe-store/3"}))  # before token models
    with pytest.raises(CheckpointError, match="'premoe-store/3'; this premoe reads premoe-store/5"):
        Store.load(tmp_path / "bad")
    from premoe.ngram import NgramParams

    with pytest.raises(InputError, match="'joint' fallback score needs the token models"):
        build_store(tiny_qwen3, profile, domains.sources(0), ngram=NgramParams(use=False), loaded=loaded)


def test_cli_build_add_query(built, tiny_qwen3, tmp_path):
    from premoe.cli import cli
    from premoe.cli.store import _METHODS
    from premoe.matchers import METHODS

    assert _METHODS == METHODS  # the CLI's copy (kept to answer --help without torch)

    profile, _, _ = built
    two = Profile(profile.model, profile.family, profile.moe_layers, profile.num_experts, profile.top_k,
                  profile.scorers, {d: profile.domains[d] for d in ("code", "bible")}, profile.params)
    two.save(tmp_path / "prof2")
    Profile(profile.model, profile.family, profile.moe_layers, profile.num_experts, profile.top_k, profile.scorers,
            {"de": profile.domains["de"]}, profile.params).save(tmp_path / "prof-de")
    data, held = [], []
    for domain in domains.DOMAINS:
        (tmp_path / f"{domain}.txt").write_text("".join(domains.texts(domain, 0, 6)))
        (tmp_path / f"{domain}-val.txt").write_text("".join(domains.texts(domain, 1000, 4)))
    for domain in ("code", "bible"):
        data += ["--data", f"{domain}={tmp_path / f'{domain}.txt'}"]
        held += ["--held-out", f"{domain}={tmp_path / f'{domain}-val.txt'}"]
    runner = CliRunner()
    out = tmp_path / "store"
    result = runner.invoke(cli, ["store", "build", str(tiny_qwen3), "--profile", str(tmp_path / "prof2"), *data,
                                 "--out", str(out), "--method", "knn", "--calib-tokens", "2048", *held],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "domains code, bible" in result.output and "matcher knn on router_input" in result.output
    assert "fallback score joint + 1 x byte 5-gram NLL, thresholds by request tokens: 16:" in result.output
    result = runner.invoke(cli, ["store", "add", str(out), "--profile", str(tmp_path / "prof-de"),
                                 "--data", f"de={tmp_path / 'de.txt'}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert Store.load(out).domains == ["code", "bible", "de"]
    text = domains.texts("code", 4000, 1)[0]
    result = runner.invoke(cli, ["store", "query", str(out), text, "--tokens", "16", "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    hit = json.loads(result.stdout)
    assert hit["tokens"] == 16 and hit["method"] == "knn+kn" and set(hit["distances"]) == {"code", "bible", "de"}
    assert hit["nearest"] == "code"
    assert hit["threshold"] == Store.load(out).detector.thresholds[16]
    assert hit["fallback_score"] <= hit["threshold"] and not hit["fallback"]  # code text of the code domain
    result = runner.invoke(cli, ["store", "query", str(out), text], catch_exceptions=False)
    assert result.exit_code == 0 and "knn+kn over" in result.output and "bible" in result.output
    assert "(joint NLL + byte NLL " in result.output and "ms]" in result.output
    result = runner.invoke(cli, ["store", "query", str(out), "日本語のテキストです。" * 8, "--tokens", "16"], catch_exceptions=False)
    assert "fallback to generalist (joint NLL + byte NLL " in result.output  # every bigram and token new
    nearest = tmp_path / "nearest"
    result = runner.invoke(cli, ["store", "build", str(tiny_qwen3), "--profile", str(tmp_path / "prof2"), *data,
                                 "--out", str(nearest), "--fallback-score", "nearest", "--no-token-models",
                                 "--calib-tokens", "2048", *held], catch_exceptions=False)
    assert result.exit_code == 0 and "fallback score nearest" in result.output and "token models" not in result.output
    assert Store.load(nearest).detector is None and Store.load(nearest).fallback_threshold(16) is not None
    assert Store.load(nearest).lms is None


def test_build_defaults_to_the_text_the_profile_was_made_from(tmp_path):
    from premoe.cli.store import _profiled

    profile = known_store(tmp_path).profile
    profile.data = {"a": "testbed:python:calib", "b": "/data/b.jsonl"}
    assert _profiled(profile) == ["python:calib", "b=/data/b.jsonl"]
    profile.data = {"a": ""}
    with pytest.raises(InputError, match="pass --data"):
        _profiled(profile)


def test_a_nearest_store_thresholds_the_matchers_score(tmp_path):
    store = known_store(tmp_path / "nowhere")  # built without novelty tables
    store.matcher.thresholds = {8: 1.5}
    store.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "store.json").read_text())["novelty"] == {"params": {"method": "nearest"}}
    again = Store.load(tmp_path / "s")
    assert again.detector is None and again.fallback_method == "nearest" and again.fallback_threshold(8) == 1.5
    assert again.fallback_score(None, torch.tensor([3.0, 2.0])) == 2.0 and again.fallback_threshold(100) == 1.5
