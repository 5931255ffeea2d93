"""Byte n-gram models (premoe.bytelm): exact Witten-Bell against a plain reference, normalised, saved, and what
they add to the fallback score."""
from __future__ import annotations

import collections
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from premoe.bytelm import ByteLMs, fit_byte_lms, token_bytes
from premoe.errors import InputError

RAW = [bytes([i]) for i in range(256)]  # token id = byte: requests are their bytes


def _ids(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.long)


def _reference_nll(train: bytes, request: bytes, order: int) -> float:
    """Witten-Bell written out with dictionaries, as the module docstring states it."""
    counts = [collections.defaultdict(collections.Counter) for _ in range(order)]
    for i in range(len(train)):
        for k in range(min(order, i + 1)):
            counts[k][train[i - k:i]][train[i]] += 1
    total = 0.0
    for i in range(len(request)):
        p = 1 / 256
        for k in range(min(order, i + 1)):
            seen = counts[k].get(request[i - k:i])
            if not seen:
                break
            types, n = len(seen), sum(seen.values())
            p = (seen.get(request[i], 0) + types * p) / (n + types)
        total -= math.log(p)
    return total / len(request)


@settings(max_examples=40, deadline=None)
@given(train=st.binary(min_size=2, max_size=80), request=st.binary(min_size=1, max_size=30),
       order=st.integers(1, 5), alphabet=st.sampled_from([b"ab", b"abc d", bytes(range(256))]))
def test_nll_is_witten_bell_exactly(train, request, order, alphabet):
    train = bytes(alphabet[b % len(alphabet)] for b in train)  # small alphabets: long contexts recur
    request = bytes(alphabet[b % len(alphabet)] for b in request)
    lms = fit_byte_lms({"d": _ids(train)}, RAW, order)
    assert lms.nll(_ids(request).reshape(1, -1))[0, 0].item() == pytest.approx(_reference_nll(train, request, order),
                                                                                 rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(train=st.binary(min_size=2, max_size=60), context=st.binary(min_size=0, max_size=6))
def test_next_byte_probabilities_sum_to_one(train, context):
    lms = fit_byte_lms({"d": _ids(train)}, RAW, 4)
    base = lms.nll(_ids(context).reshape(1, -1))[0, 0].item() * len(context) if context else 0.0
    nexts = torch.stack([_ids(context + bytes([b])) for b in range(256)])  # (256, L + 1)
    logp = base - lms.nll(nexts)[:, 0].double() * (len(context) + 1)  # log P(b | context) per next byte b
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_the_domain_that_spells_like_the_request_scores_lowest():
    lms = fit_byte_lms({"es": _ids("la configuración de la aplicación y la descripción ".encode() * 20),
                        "c": _ids(b"extern int foo (void) __THROW;\n#define BAR 1\n" * 20)}, RAW, 5)
    scores = lms.nll(torch.stack([_ids("la aplicación".encode()), _ids(b"int bar (v) __")]))
    assert lms.domains == ["es", "c"]
    assert scores[0, 0] < scores[0, 1] and scores[1, 1] < scores[1, 0]


def test_tokens_are_read_as_their_bytes():
    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    table = token_bytes(tokenizer, len(tokenizer) + 3)  # a model vocabulary past the tokenizer's: empty rows
    assert table[-3:] == [b"", b"", b""]
    text = "def f(x):\n    return x * 2  # ünïcode\n"
    lms = fit_byte_lms({"d": torch.tensor(tokenizer(text)["input_ids"])}, table, 3)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    assert bytes(lms.bytes_of(ids).tolist()) == tokenizer.decode(ids).encode()
    with pytest.raises(InputError, match="token ids must lie in"):
        lms.bytes_of(torch.tensor([len(table)]))


def test_saved_models_score_the_same():
    lms = fit_byte_lms({"a": _ids(b"hello world " * 10), "b": _ids(b"12 + 34 = 46\n" * 10)}, RAW, 4)
    again = ByteLMs.load(lms.manifest(), lms.tensors())
    requests = torch.stack([_ids(b"hello 12 +"), _ids(b"zzzzzzzzzz")])
    assert torch.equal(again.nll(requests), lms.nll(requests)) and again.domains == ["a", "b"]
    with pytest.raises(InputError, match="byte models are incomplete"):
        ByteLMs.load(lms.manifest(), {k: v for k, v in lms.tensors().items() if not k.startswith("bytes/b/3/")})


def test_refuses_what_it_cannot_model():
    with pytest.raises(InputError, match="order must be in 1..6"):
        fit_byte_lms({"a": _ids(b"abc")}, RAW, 7)
    with pytest.raises(InputError, match="no calibration text"):
        fit_byte_lms({"a": _ids(b"a")}, RAW, 2)
    lms = fit_byte_lms({"a": _ids(b"abc")}, RAW, 2)
    with pytest.raises(InputError, match="already has a byte model"):
        lms.add({"a": _ids(b"abc")})


def test_the_fallback_score_adds_the_weighted_lowest_byte_nll():
    from premoe.ngram import NgramParams, fit_lms
    from premoe.novelty import NoveltyParams, fit_detector

    ids = {"en": _ids(b"the cat sat on the mat and the dog sat too. " * 8),
           "num": _ids(b"1 + 2 = 3, 4 + 5 = 9, 10 - 3 = 7. " * 8)}
    lms = fit_lms(NgramParams(), ids, 256)
    plain = fit_detector(NoveltyParams(method="kn", byte_weight=0.0), {}, 256, (4,), lms)
    spelled = fit_detector(NoveltyParams(method="kn", byte_weight=1.5), ids, 256, (4,), lms, RAW)
    requests = torch.stack([_ids(b"the dog sat"), _ids(b"qwxz jkvq p")])
    bytes_nll = spelled.byte_lms.nll(requests).min(1).values
    assert torch.allclose(spelled.score(requests), plain.score(requests) + 1.5 * bytes_nll)
    assert bytes_nll[1] > bytes_nll[0] + 1  # letters neither domain spells
    with pytest.raises(InputError, match="byte models need every domain's calibration ids"):
        fit_detector(NoveltyParams(method="kn"), {}, 256, (4,), lms)


def test_a_tokenizer_that_is_not_byte_level_is_read_by_decoding():
    class Pieces:  # sentencepiece-like: pieces spell "▁" for a space
        def __len__(self):
            return 3

        def convert_ids_to_tokens(self, ids):
            return ["▁the", "▁cat", "s"]

        def batch_decode(self, ids, clean_up_tokenization_spaces=False):
            return [" the", " cat", "s"]

    assert token_bytes(Pieces(), 4) == [b" the", b" cat", b"s", b""]


def test_requests_scored_together_score_as_alone():
    lms = fit_byte_lms({"a": _ids(b"abcabcabd " * 6), "b": _ids(b"xyzxyz " * 6)}, RAW, 4)
    requests = [_ids(b"abcxyz a"), _ids(b"xyzabc b"), _ids(b"        ")]
    together = lms.nll(torch.stack(requests))
    alone = torch.cat([lms.nll(r.reshape(1, -1)) for r in requests])
    assert torch.allclose(together, alone, rtol=1e-12) and not torch.equal(together[0], together[1])


@settings(max_examples=25, deadline=None)
@given(corpora=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.binary(min_size=2, max_size=40), min_size=1),
       requests=st.lists(st.binary(min_size=0, max_size=12), min_size=1, max_size=4), order=st.integers(1, 6))
def test_saved_byte_models_load_to_the_same_scores(corpora, requests, order):
    from safetensors.torch import load, save

    lms = fit_byte_lms({d: _ids(text) for d, text in corpora.items()}, RAW, order)
    again = ByteLMs.load(lms.manifest(), load(save(lms.tensors())))  # through the safetensors bytes a store writes
    width = max(len(r) for r in requests)
    ids = torch.tensor([list(r) + [0] * (width - len(r)) for r in requests], dtype=torch.long)  # byte 0 pads
    assert again.domains == lms.domains
    assert torch.equal(again.nll(ids), lms.nll(ids))


# --- gaps mutmut found (bench/mutmut_run.py): each test below fails under a mutant that survived the suite before


@settings(max_examples=25, deadline=None)
@given(first=st.binary(min_size=2, max_size=60), second=st.binary(min_size=2, max_size=60),
       request=st.binary(min_size=1, max_size=20), order=st.integers(2, 5))
def test_every_domain_of_the_merged_tables_is_its_own_witten_bell_model(first, second, request, order):
    """The domains share one merged table (codes shifted per domain): each column must still be that domain's
    own model, not another domain's counts under a wrong shift."""
    squash = lambda data: bytes(b"abc d"[b % 5] for b in data)  # noqa: E731  small alphabet: contexts recur
    first, second, request = squash(first), squash(second), squash(request)
    lms = fit_byte_lms({"d": _ids(first), "e": _ids(second)}, RAW, order)
    got = lms.nll(_ids(request).reshape(1, -1))[0]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([_reference_nll(first, request, order),
                                          _reference_nll(second, request, order)], rel=1e-12)


def test_default_order_is_five_and_loading_needs_both_tables():
    lms = fit_byte_lms({"d": _ids(b"abcabc")}, RAW)
    assert lms.manifest()["order"] == 5
    tensors = lms.tensors()
    for gone in [k for k in tensors if k in ("bytes/table", "bytes/offsets")]:
        with pytest.raises(InputError):
            ByteLMs.load(lms.manifest(), {k: v for k, v in tensors.items() if k != gone})


@pytest.mark.parametrize("order", [3, 5])
def test_orders_no_domain_has_seen_back_off_to_the_lower_ones(order):
    """Calibration text shorter than the order leaves the merged table of the higher orders empty (mutmut: that
    lookup branch was never reached); the score must still be each domain's Witten-Bell reference."""
    first, second, request = b"ab", b"ba", b"abba ab"
    lms = fit_byte_lms({"d": _ids(first), "e": _ids(second)}, RAW, order)
    got = lms.nll(_ids(request).reshape(1, -1))[0]
    assert got.tolist() == pytest.approx([_reference_nll(first, request, order),
                                          _reference_nll(second, request, order)], rel=1e-12)
