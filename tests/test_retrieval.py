"""Retrieval: matchers with known answers, per-length thresholds, pattern features from a real forward, fallback."""
import pytest
import torch

import domains
from premoe.adapters import get_adapter
from premoe.capture import RouterCapture
from premoe.data import token_windows
from premoe.errors import InputError
from premoe.matchers import Matcher, MatchParams, calibrate, fit_matcher
from premoe.modeling import load_model, load_tokenizer
from premoe.patterns import PatternReader, chunk_means, prefix_means
from premoe.retrieval import Retriever
from premoe.scores import PRESETS
from premoe.store import GENERALIST


def two_blobs(method: str, **extra) -> Matcher:
    """Domains a (around +e0) and b (around -e0) in 3-d, tight in dims 0-1, loose in dim 2."""
    gen = torch.Generator().manual_seed(0)
    noise = lambda n: torch.randn(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([0.1, 0.1, 2.0])  # noqa
    bank = {"a": {4: noise(200) + torch.tensor([1.0, 0, 0])}, "b": {4: noise(200) - torch.tensor([1.0, 0, 0])}}
    return fit_matcher(MatchParams(method=method, lengths=(4,), k=3, **extra), bank)


@pytest.mark.parametrize("method", ["centroid", "knn", "diagonal", "lda", "logistic"])
def test_every_method_separates_two_blobs(method):
    matcher = two_blobs(method)
    queries = torch.tensor([[0.9, 0.05, 1.5], [-1.1, 0.0, -2.0], [1.2, -0.1, -3.0]], dtype=torch.float64)
    assert matcher.scores(queries, 4).argmin(1).tolist() == [0, 1, 0]


def test_lda_and_diagonal_weigh_the_spread_centroid_does_not():
    # (0.3, 0, 4.0): near a in the tight dim 0, far from both in the loose dim 2 (which L2 over-weighs)
    query = torch.tensor([[0.3, 0.0, 4.0]], dtype=torch.float64)
    for method in ("lda", "diagonal"):
        scores = two_blobs(method).scores(query, 4)[0]
        assert scores[0] < scores[1], method
    assert torch.allclose(two_blobs("centroid").fitted["4/mean"],
                          torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]], dtype=torch.float64), atol=0.3)


def test_thresholds_are_per_length_and_decide_falls_back_beyond_them():
    gen = torch.Generator().manual_seed(1)
    bank = {d: {t: torch.randn(300, 2, generator=gen, dtype=torch.float64) / t ** 0.5 + c for t in (4, 16)}
            for d, c in (("a", torch.tensor([3.0, 0])), ("b", torch.tensor([-3.0, 0])))}
    matcher = fit_matcher(MatchParams(method="centroid", lengths=(16, 4), quantile=0.9), bank)
    assert matcher.params.lengths == (4, 16)
    assert [matcher.bucket(n) for n in (1, 4, 15, 16, 500)] == [4, 4, 4, 16, 16]
    held = {d: {t: torch.randn(100, 2, generator=gen, dtype=torch.float64) / t ** 0.5 + c for t in (4, 16)}
            for d, c in (("a", torch.tensor([3.0, 0])), ("b", torch.tensor([-3.0, 0])))}
    seen = calibrate(matcher, held)
    assert seen["patterns_per_length"] == {"4": 200, "16": 200}
    assert matcher.thresholds[4] > 1.5 * matcher.thresholds[16]  # short requests spread more
    near = torch.tensor([3.0, 0.1], dtype=torch.float64)
    far = torch.tensor([3.0, 0.5 * (matcher.thresholds[4] + matcher.thresholds[16])], dtype=torch.float64)
    assert matcher.decide(near, 16)[0] == 0 and not matcher.decide(near, 16)[3]
    assert matcher.decide(far, 4)[3] is False and matcher.decide(far, 16)[3] is True  # the same pattern, two lengths
    with pytest.raises(InputError, match="no held-out data names a stored domain"):
        calibrate(matcher, {"z": held["a"]})


def test_fit_refuses_missing_lengths_and_bad_params():
    with pytest.raises(InputError, match="no calibration patterns of 16 tokens for b"):
        fit_matcher(MatchParams(lengths=(16,)), {"a": {16: torch.zeros(3, 2)}, "b": {}})
    with pytest.raises(InputError, match="quantile"):
        MatchParams(quantile=1.5).check()


def test_chunk_and_prefix_means():
    tokens = torch.arange(2 * 8 * 1, dtype=torch.float32).reshape(2, 8, 1)  # (windows, seq, features)
    assert chunk_means(tokens, 4).flatten().tolist() == [1.5, 5.5, 9.5, 13.5]
    assert {t: v.flatten().tolist() for t, v in prefix_means(tokens, [2, 8, 16]).items()} == {2: [0.5, 8.5],
                                                                                               8: [3.5, 11.5]}


@pytest.fixture(scope="module")
def retriever(tiny_qwen3):
    model, tokenizer = load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)
    _, store = domains.make_store(tiny_qwen3, (model, tokenizer))
    return Retriever(model, get_adapter(model.config), store, tokenizer)


def test_router_mass_feature_is_the_first_layers_gate_probability(retriever):
    ids = retriever.tokenize(domains.texts("code", 2000, 1)[0], tokens=40)
    reader = PatternReader(retriever.model, retriever.adapter, "router_mass")
    with RouterCapture(retriever.model, retriever.adapter, [PRESETS["router_mass"]]) as capture:
        capture.run(ids)
    expected = capture.stats.sums["router_mass"][0] / capture.stats.tokens  # full forward, all layers
    assert torch.allclose(reader.tokens(ids)[0].mean(0).double(), expected, rtol=0, atol=1e-6)


def test_router_input_feature_is_what_the_first_router_sees(retriever):
    ids = retriever.tokenize(domains.texts("de", 2000, 1)[0], tokens=24)
    seen = []
    first = retriever.adapter.moe_layers(retriever.model)[0]
    handle = first.router.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        retriever.model(ids)
    handle.remove()
    assert torch.equal(retriever.reader.tokens(ids)[0], seen[0].reshape(24, -1).float())
    two = PatternReader(retriever.model, retriever.adapter, "router_logits", layers=2).tokens(ids)
    assert two.shape == (1, 24, 2 * first.num_experts)


def test_held_out_windows_retrieve_their_own_domain(retriever):
    for domain in domains.DOMAINS:
        windows = token_windows(domains.texts(domain, 3000, 6), retriever.tokenizer, 32, None)
        hits = [retriever.retrieve(w) for w in windows]
        assert sum(h.domain == domain for h in hits) / len(hits) >= 0.8, domain
        assert all(h.method == "lda+kn" and h.tokens == 32 for h in hits)


def test_fallback_and_the_mixed_rule(retriever):
    text = domains.texts("de", 3000, 1)[0]
    hit = retriever.retrieve(text, tokens=8)
    assert hit.tokens == 8 and set(hit.distances) == set(domains.DOMAINS)
    assert hit.distance == min(hit.distances.values())
    assert not hit.fallback and hit.fallback_score < hit.threshold == retriever.store.detector.thresholds[8]
    saved = dict(retriever.store.detector.thresholds)
    retriever.store.detector.thresholds = {t: -1e9 for t in saved}  # kn scores can be negative (margin)
    try:
        hit = retriever.retrieve(text)
        assert hit.fallback and hit.domain == GENERALIST and hit.nearest in domains.DOMAINS and not hit.mixed
        assert hit.threshold == -1e9 and hit.fallback_score > -1e9
    finally:
        retriever.store.detector.thresholds = saved
    code = retriever.tokenize(domains.texts("code", 3000, 1)[0], 32)
    german = retriever.tokenize(domains.texts("de", 3000, 1)[0], 32)
    both = torch.cat([code, german], dim=1)  # (1, 64): half code, half German prose
    assert retriever.retrieve(both).fallback  # half code, half German: novel to each domain alone
    retriever.store.detector.thresholds = {}  # the halves rule alone (a store that never falls back)
    try:
        whole = retriever.retrieve(both)
        halves = Retriever(retriever.model, retriever.adapter, retriever.store, retriever.tokenizer, mixed="halves")
        split = halves.retrieve(both)
    finally:
        retriever.store.detector.thresholds = saved
    assert split.mixed and split.domain == GENERALIST and split.nearest == whole.nearest
    assert not halves.retrieve(torch.cat([code, code], dim=1)).mixed
    tail = Retriever(retriever.model, retriever.adapter, retriever.store, retriever.tokenizer, mixed="tail").retrieve(both)
    assert (tail.nearest, tail.tokens) == ("de", 32)  # the German half, read in the context of the code
    with pytest.raises(InputError, match="no tokens"):
        retriever.retrieve("")
    with pytest.raises(InputError, match="mixed-request rule"):
        Retriever(retriever.model, retriever.adapter, retriever.store, retriever.tokenizer, mixed="both")


def test_pruned_model_retrieves_through_the_full_router(tiny_qwen3, retriever):
    from premoe.bank import ExpertBank

    store = retriever.store
    bank = ExpertBank(tiny_qwen3, store.kept("bible", 4))
    with pytest.raises(InputError, match="pass the unpruned router"):
        Retriever(bank.model, bank.adapter, store, retriever.tokenizer)
    with pytest.raises(InputError, match="second-layer patterns"):
        PatternReader(bank.model, bank.adapter, "router_logits", layers=2, router=bank.full_router)
    for feature in ("router_input", "router_logits"):
        pruned = PatternReader(bank.model, bank.adapter, feature, router=bank.full_router)
        full = PatternReader(retriever.model, retriever.adapter, feature)
        ids = retriever.tokenize(domains.texts("code", 2000, 1)[0], tokens=64)
        assert torch.allclose(pruned.tokens(ids), full.tokens(ids), rtol=0, atol=1e-6)
    swapped = Retriever(bank.model, bank.adapter, store, retriever.tokenizer, router=bank.full_router)
    assert swapped.retrieve(ids).domain == retriever.retrieve(ids).domain
    first = bank.layers[store.moe_layers[0]]
    assert first.router is bank.model.get_submodule(first.router_name)  # the resident router is back in place


def test_a_request_with_a_lone_surrogate_is_refused_in_one_line():
    """`premoe store query STORE $'\\xe9'` hands Python undecodable argv bytes as lone surrogates; the tokenizer
    then failed with a TypeError (an internal error)."""
    from types import SimpleNamespace

    from tiny import tiny_tokenizer

    from premoe.errors import InputError
    from premoe.retrieval import Retriever

    fake = SimpleNamespace(tokenizer=tiny_tokenizer())
    assert Retriever.tokenize(fake, "def f(): pass", 3).shape == (1, 3)
    with pytest.raises(InputError, match="character 2 is a lone surrogate"):
        Retriever.tokenize(fake, "ab\udce9")
