"""Retrieval: nearest stored pattern (L2 / cosine), fallback, and layer-1 patterns from a real forward."""
import math

import pytest
import torch

import domains
from premoe.adapters import get_adapter
from premoe.capture import DomainStats, RouterCapture
from premoe.data import token_windows
from premoe.errors import InputError
from premoe.modeling import load_model, load_tokenizer
from premoe.profile import Profile
from premoe.retrieval import Retriever, choose, distances
from premoe.scores import PRESETS
from premoe.store import GENERALIST, Store

PEU = {"kind": "peu", "params": dict(PRESETS["peu"].params), "per_routed_token": False}


def synthetic_store(threshold: dict) -> Store:
    """Three domains whose layer-1 patterns are known: a = e0, b = e1, c = 3 * e0 (a's direction, farther)."""
    rows = {"a": [1.0, 0, 0, 0], "b": [0, 1.0, 0, 0], "c": [3.0, 0, 0, 0]}
    stats = {d: DomainStats(1, {"peu": torch.tensor([row, row], dtype=torch.float64)}, torch.ones(2, 4))
             for d, row in rows.items()}
    identity = {"name": "synthetic", "path": "/nonexistent", "model_type": "qwen3_moe", "config_hash": "0" * 16}
    profile = Profile(identity, "Qwen3-MoE", [0, 1], 4, 2, {"peu": PEU}, stats)
    return Store(profile, "peu", threshold)


def test_distances():
    stored = torch.tensor([[1.0, 0], [0, 2.0]], dtype=torch.float64)
    pattern = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(distances(pattern, stored, "l2"), torch.tensor([1.0, math.sqrt(2)], dtype=torch.float64))
    assert torch.allclose(distances(pattern, stored, "cosine"), torch.full((2,), 1 - 1 / math.sqrt(2),
                                                                          dtype=torch.float64))
    with pytest.raises(InputError, match="metric must be one of"):
        distances(pattern, stored, "manhattan")


@pytest.mark.parametrize("pattern, metric, domain, nearest, fallback", [
    ([0.9, 0.1, 0, 0], "l2", "a", "a", False),
    ([0.1, 0.8, 0, 0], "l2", "b", "b", False),
    ([2.6, 0, 0, 0], "l2", "c", "c", False),  # L2 sees the scale: c, not a
    ([2.6, 0, 0, 0], "cosine", "a", "a", False),  # cosine is blind to it: a and c tie at 0, the first wins
    ([0, 0, 0, 5.0], "l2", GENERALIST, "a", True),  # far from everything: the generalist
    ([0, 0, 1.0, 0.2], "cosine", GENERALIST, "a", True),
])
def test_choose_known_answers(pattern, metric, domain, nearest, fallback):
    store = synthetic_store({"l2": 1.0, "cosine": 0.5})
    chosen, near, distance, all_distances, fell_back = choose(torch.tensor(pattern, dtype=torch.float64), store,
                                                              metric)
    assert (chosen, near, fell_back) == (domain, nearest, fallback)
    assert set(all_distances) == {"a", "b", "c"}
    assert distance == pytest.approx(min(all_distances.values()), abs=1e-6)


def test_no_threshold_never_falls_back():
    store = synthetic_store({})
    chosen, nearest, *_, fallback = choose(torch.tensor([0, 0, 0, 50.0], dtype=torch.float64), store)
    assert (chosen, nearest, fallback) == ("a", "a", False)


@pytest.fixture(scope="module")
def retriever(tiny_qwen3):
    model, tokenizer = load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)
    _, store = domains.make_store(tiny_qwen3, (model, tokenizer))
    return Retriever(model, get_adapter(model.config), store, tokenizer)


def test_pattern_is_the_first_layers_scorer_mean(retriever):
    ids = retriever.tokenize(domains.texts("code", 2000, 1)[0], tokens=40)
    with RouterCapture(retriever.model, retriever.adapter, [PRESETS["router_mass"]]) as capture:
        capture.run(ids)
    expected = capture.stats.sums["router_mass"][0] / capture.stats.tokens  # full forward, all layers
    assert torch.allclose(retriever.pattern(ids), expected, rtol=0, atol=1e-12)


def test_held_out_windows_retrieve_their_own_domain(retriever):
    for domain in domains.DOMAINS:
        windows = token_windows(domains.texts(domain, 3000, 6), retriever.tokenizer, 64, None)
        hits = [retriever.retrieve(w) for w in windows]
        accuracy = sum(h.domain == domain for h in hits) / len(hits)
        assert accuracy >= 0.8, (domain, accuracy)
        assert not any(h.fallback for h in hits)


def test_truncation_metric_and_fallback(retriever):
    text = domains.texts("de", 3000, 1)[0]
    hit = retriever.retrieve(text, tokens=8)
    assert hit.tokens == 8 and hit.metric == "l2"
    assert set(hit.distances) == set(domains.DOMAINS)
    assert retriever.retrieve(text, tokens=8, metric="cosine").metric == "cosine"
    saved = retriever.store.threshold
    retriever.store.threshold = {"l2": 0.0}
    try:
        hit = retriever.retrieve(text)
        assert hit.fallback and hit.domain == GENERALIST and hit.nearest in domains.DOMAINS
    finally:
        retriever.store.threshold = saved
    with pytest.raises(InputError, match="no tokens"):
        retriever.retrieve("")


def test_pruned_model_retrieves_through_the_full_router(tiny_qwen3, retriever):
    from premoe.bank import ExpertBank

    store = retriever.store
    bank = ExpertBank(tiny_qwen3, store.kept("bible", 4))
    with pytest.raises(InputError, match="pass the unpruned router"):
        Retriever(bank.model, bank.adapter, store, retriever.tokenizer)
    pruned = Retriever(bank.model, bank.adapter, store, retriever.tokenizer, router=bank.full_router)
    ids = retriever.tokenize(domains.texts("code", 2000, 1)[0], tokens=64)
    assert torch.allclose(pruned.pattern(ids), retriever.pattern(ids), rtol=0, atol=1e-6)
    assert pruned.retrieve(ids).domain == retriever.retrieve(ids).domain
    assert bank.layers[store.moe_layers[0]].router is bank.model.get_submodule(
        bank.layers[store.moe_layers[0]].router_name)  # the resident router is back in place
