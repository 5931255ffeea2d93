"""Token models (premoe.ngram): Kneser-Ney values by hand, normalisation, files, and the combined classifier."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from premoe.errors import InputError
from premoe.ngram import NgramParams, TokenLMs, combine, fit_lms


def test_kneser_ney_values_by_hand():
    """ids 0 1 0 1 2: c(0 1) = 2, c(1 0) = c(1 2) = 1; every token is preceded once, so p_cont = 1/3 each."""
    lms = fit_lms(NgramParams(discount=0.75, delta=0.5), {"a": torch.tensor([0, 1, 0, 1, 2])}, vocab=3)
    logp = lms.logprob("a", torch.tensor([[0, 1, 2, 0, 0]]))[0].exp()
    # p(1|0) = (2 - .75)/2 + .75 * 1/2 * 1/3; p(2|1) = (1 - .75)/2 + .75 * 2/2 * 1/3; p(0|2) = p_cont(0) (c(2) = 0);
    # p(0|0) = .75 * 1/2 * 1/3
    assert logp.tolist() == pytest.approx([0.75, 0.375, 1 / 3, 0.125], abs=1e-12)
    assert lms.nll(torch.tensor([[0, 1, 2]]))[0, 0].item() == pytest.approx(-(math.log(0.75) + math.log(0.375)) / 2)
    assert lms.nll(torch.tensor([[2]]))[0, 0].item() == pytest.approx(math.log(3))  # one token: its p_cont


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(0, 7), min_size=2, max_size=60), discount=st.floats(0.05, 0.95),
       prev=st.integers(0, 7))
def test_every_history_is_a_distribution(ids, discount, prev):
    lms = fit_lms(NgramParams(discount=discount), {"a": torch.tensor(ids)}, vocab=8)
    pairs = torch.tensor([[prev, v] for v in range(8)])  # (8, 2): every next token after prev
    total = lms.logprob("a", pairs)[:, 0].exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=20, deadline=None)
@given(a=st.lists(st.integers(0, 11), min_size=2, max_size=40), b=st.lists(st.integers(0, 11), min_size=2, max_size=40),
       request=st.lists(st.integers(0, 11), min_size=1, max_size=12))
def test_files_round_trip_and_growing_equals_fitting_at_once(a, b, request):
    ids = {"a": torch.tensor(a), "b": torch.tensor(b)}
    lms = fit_lms(NgramParams(discount=0.6), ids, vocab=12)
    again = TokenLMs.load(lms.manifest(), lms.tensors())
    grown = fit_lms(NgramParams(discount=0.6), {"a": ids["a"]}, 12).add({"b": ids["b"]})
    x = torch.tensor([request])
    assert torch.equal(again.nll(x), lms.nll(x)) and torch.equal(grown.nll(x), lms.nll(x))
    assert again.manifest() == lms.manifest() and again.domains == ["a", "b"]


def test_the_domain_whose_text_it_is_scores_lowest():
    lms = fit_lms(NgramParams(), {"ab": torch.tensor([0, 1] * 50), "cd": torch.tensor([2, 3] * 50)}, vocab=4)
    nll = lms.nll(torch.tensor([[0, 1, 0, 1], [3, 2, 3, 2]]))  # (2, 2)
    assert nll.argmin(1).tolist() == [0, 1] and (nll[0, 1] - nll[0, 0]).item() > 2


def test_combine_adds_the_weighted_per_token_pattern_score():
    nll, pattern = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    # pattern weight 2, 256 features, 64 tokens: 2 * 256 / 128 = 4 per unit of pattern score
    assert combine(nll, pattern, 64, 256, 2.0).tolist() == [[3.0, 2.4]]
    assert combine(nll, pattern, 64, 256, 0.0).tolist() == [[1.0, 2.0]]
    with pytest.raises(InputError, match="one shape"):
        combine(nll, pattern[:, :1], 64, 256, 1.0)


def test_bad_input_names_the_fix():
    with pytest.raises(InputError, match="outside \\[0, 4\\)"):
        fit_lms(NgramParams(), {"a": torch.tensor([1, 5])}, 4)
    with pytest.raises(InputError, match="at least 2"):
        fit_lms(NgramParams(), {"a": torch.tensor([1])}, 4)
    with pytest.raises(InputError, match="discount"):
        NgramParams(discount=1.0).check()
    lms = fit_lms(NgramParams(), {"a": torch.tensor([1, 2])}, 4)
    with pytest.raises(InputError, match="already has a token model"):
        lms.add({"a": torch.tensor([1, 2])})
    with pytest.raises(InputError, match="tokenizer the store's"):
        lms.nll(torch.tensor([[1, 9]]))
    with pytest.raises(InputError, match="lack domain b"):
        TokenLMs.load({**lms.manifest(), "domains": ["a", "b"]}, lms.tensors())


# --- gaps mutmut found (bench/mutmut_run.py): each test below fails under a mutant that survived the suite before


def test_a_history_seen_once_and_a_two_token_request():
    """ids 0 1 2: history 0 is seen once, followed by one type: p(1|0) = (1 - .75)/1 + .75 * 1/1 * p_cont(1)."""
    lms = fit_lms(NgramParams(discount=0.75, delta=0.5), {"a": torch.tensor([0, 1, 2])}, vocab=3)
    cont = lms._tables["a"].cont.tolist()
    p = lms.logprob("a", torch.tensor([[0, 1]]))[0].exp().item()
    assert p == pytest.approx(0.25 + 0.75 * cont[1], abs=1e-12)
    # a 2-token request is one bigram, not its first token's continuation probability
    assert lms.nll(torch.tensor([[0, 1]]))[0, 0].item() == pytest.approx(-math.log(p), abs=1e-12)


@pytest.mark.parametrize("field, ok, bad", [("discount", (0.01, 0.99), (0.0, 1.0)), ("delta", (1e-9,), (0.0,)),
                                            ("pattern_weight", (0.0, 0.5), (-0.1,)), ("max_tokens", (2,), (1,))])
def test_ngram_params_bounds(field, ok, bad):
    for value in ok:
        NgramParams(**{field: value}).check()
    for value in bad:
        with pytest.raises(InputError):
            NgramParams(**{field: value}).check()


def test_token_ids_equal_to_the_vocabulary_size_are_refused():
    with pytest.raises(InputError):
        fit_lms(NgramParams(), {"a": torch.tensor([0, 1, 3])}, vocab=3)
    lms = fit_lms(NgramParams(), {"a": torch.tensor([0, 1, 2])}, vocab=3)
    with pytest.raises(InputError):
        lms.nll(torch.tensor([[0, 3]]))
    with pytest.raises(InputError):
        TokenLMs.load(lms.manifest(), {k: v for k, v in lms.tensors().items() if "counts" not in k})


def test_combine_with_one_token():
    nll, patterns = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[4.0, 8.0]])
    assert combine(nll, patterns, tokens=1, features=3, pattern_weight=0.5).tolist() == [[1.0 + 3.0, 2.0 + 6.0]]
    assert combine(nll, patterns, tokens=0, features=3, pattern_weight=0.5).tolist() == [[4.0, 8.0]]
