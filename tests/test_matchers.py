"""Matchers: the distance each method computes, against the formula written out by hand."""
import pytest
import torch

from premoe.matchers import MatchParams, fit_matcher

GEN = torch.Generator().manual_seed(0)
BANK = {d: {16: torch.randn(12, 3, generator=GEN, dtype=torch.float64) + shift}
        for d, shift in (("a", 0.0), ("b", 2.0))}  # two domains, 12 calibration patterns of 3 features each
QUERY = torch.tensor([[0.5, -1.0, 3.0], [2.0, 2.0, 1.0]], dtype=torch.float64)


def test_centroid_is_the_euclidean_distance_to_each_domain_mean():
    matcher = fit_matcher(MatchParams(method="centroid", lengths=(16,)), BANK)
    means = torch.stack([BANK["a"][16].mean(0), BANK["b"][16].mean(0)])  # (2, 3)
    want = ((QUERY[:, None] - means[None]) ** 2).sum(-1).sqrt()  # (2 queries, 2 domains)
    assert torch.allclose(matcher.scores(QUERY, 16), want, rtol=1e-12)


@pytest.mark.parametrize("shrinkage", [0.01, 0.5])
def test_lda_is_the_mahalanobis_distance_under_the_shrunk_shared_covariance(shrinkage):
    matcher = fit_matcher(MatchParams(method="lda", lengths=(16,), shrinkage=shrinkage), BANK)
    means = torch.stack([BANK["a"][16].mean(0), BANK["b"][16].mean(0)])
    resid = torch.cat([BANK["a"][16] - means[0], BANK["b"][16] - means[1]])  # (24, 3)
    cov = resid.T @ resid / (24 - 2)  # pooled within-domain covariance
    shrunk = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    diff = QUERY[:, None] - means[None]  # (2, 2, 3)
    want = torch.einsum("ndf,fg,ndg->nd", diff, torch.linalg.inv(shrunk), diff) / 3
    assert torch.allclose(matcher.scores(QUERY, 16), want, rtol=1e-10)


# --- gaps mutmut found (bench/mutmut_run.py): knn, diagonal and logistic were not pinned to their formulas


def _standardise(x, all_x):
    return (x - all_x.mean(0)) / (all_x.std(0) + 1e-6)


@pytest.mark.parametrize("k", [1, 3, 50])  # 50: more than a domain's 12 patterns, so its farthest one
def test_knn_is_the_kth_nearest_cosine_distance_among_each_domains_standardised_patterns(k):
    matcher = fit_matcher(MatchParams(method="knn", lengths=(16,), k=k), BANK)
    every = torch.cat([BANK["a"][16], BANK["b"][16]])  # (24, 3)
    unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
    q = unit(_standardise(QUERY, every))
    want = torch.stack([(1 - q @ unit(_standardise(BANK[d][16], every)).T).sort(1).values[:, min(k, 12) - 1]
                        for d in ("a", "b")], dim=1)  # (2 queries, 2 domains)
    assert torch.allclose(matcher.scores(QUERY, 16), want, rtol=1e-10, atol=1e-12)


def test_diagonal_is_the_per_feature_gaussian_nll_with_a_floored_variance():
    matcher = fit_matcher(MatchParams(method="diagonal", lengths=(16,)), BANK)
    means = torch.stack([BANK[d][16].mean(0) for d in ("a", "b")])  # (2, 3)
    var = torch.stack([BANK[d][16].var(0, unbiased=False) for d in ("a", "b")])
    var = var + 1e-3 * var.mean() + 1e-12
    diff = QUERY[:, None] - means[None]
    want = 0.5 * (diff**2 / var[None] + var.log()[None]).mean(-1)
    assert torch.allclose(matcher.scores(QUERY, 16), want, rtol=1e-10)


def test_logistic_scores_are_the_negative_log_posterior_of_standardised_patterns():
    matcher = fit_matcher(MatchParams(method="logistic", lengths=(16,)), BANK)
    every = torch.cat([BANK["a"][16], BANK["b"][16]])
    fitted = matcher.fitted
    assert torch.allclose(fitted["all/shift"], every.mean(0)) and torch.allclose(fitted["all/scale"], every.std(0) + 1e-6)
    logits = _standardise(QUERY, every) @ fitted["all/weight"] + fitted["all/bias"]
    got = matcher.scores(QUERY, 16)
    assert torch.allclose(got, -logits.log_softmax(-1), rtol=1e-10)
    assert torch.allclose(got.neg().exp().sum(1), torch.ones(2, dtype=torch.float64))  # a posterior per query
    assert got.argmin(1).tolist() == [0, 1]  # (0.5, -1, 3) sits with a (mean 0), (2, 2, 1) with b (mean 2)


def test_length_buckets_pick_the_longest_not_above_the_request():
    matcher = fit_matcher(MatchParams(method="centroid", lengths=(16, 64)),
                          {d: {16: BANK[d][16], 64: BANK[d][16] + 10} for d in ("a", "b")})
    assert [matcher.bucket(t) for t in (1, 15, 16, 63, 64, 1000)] == [16, 16, 16, 16, 64, 64]
    assert not torch.equal(matcher.scores(QUERY, 16), matcher.scores(QUERY, 64))


@pytest.mark.parametrize("bad", [dict(method="cosine"), dict(lengths=()), dict(lengths=(0, 16)), dict(lengths=(16.0,)),
                                 dict(quantile=0.0), dict(quantile=1.01)])
def test_match_params_refuse(bad):
    from premoe.errors import InputError

    with pytest.raises(InputError):
        MatchParams(**bad).check()
    assert MatchParams(lengths=(64, 1), quantile=1.0).check().lengths == (1, 64)


def test_logistic_weights_minimise_the_penalised_cross_entropy_on_standardised_patterns():
    """The fit itself, not only the scoring: at the fitted weights and bias the gradient of the L2-penalised
    cross-entropy over the standardised calibration patterns is zero (both are trained)."""
    params = MatchParams(method="logistic", lengths=(16,))
    matcher = fit_matcher(params, BANK)
    every = torch.cat([BANK["a"][16], BANK["b"][16]])
    labels = torch.tensor([0] * 12 + [1] * 12)
    weight = matcher.fitted["all/weight"].clone().requires_grad_(True)
    bias = matcher.fitted["all/bias"].clone().requires_grad_(True)
    z = _standardise(every, every)
    loss = torch.nn.functional.cross_entropy(z @ weight + bias, labels) + params.weight_decay * weight.square().sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-6 and bias.grad.abs().max() < 1e-6
    assert weight.abs().max() > 0.1  # and it learnt something


TWO = {d: {16: BANK[d][16], 64: BANK[d][16] * 0.5} for d in BANK}  # two length buckets


def test_calibrate_sets_each_buckets_threshold_to_the_quantile_of_held_out_nearest_scores():
    from premoe.matchers import calibrate

    matcher = fit_matcher(MatchParams(method="centroid", lengths=(16, 64), quantile=0.75), TWO)
    held_out = {"a": {16: QUERY, 64: QUERY + 1}, "b": {16: QUERY * 2}, "unknown": {16: QUERY * 100}}
    seen = calibrate(matcher, held_out)
    best16 = matcher.scores(torch.cat([QUERY, QUERY * 2]), 16).min(1).values
    assert matcher.thresholds[16] == pytest.approx(float(best16.quantile(0.75)), rel=1e-12)
    best64 = matcher.scores(QUERY + 1, 64).min(1).values
    assert matcher.thresholds[64] == pytest.approx(float(best64.quantile(0.75)), rel=1e-12)
    assert seen == {"quantile": 0.75, "domains": ["a", "b"], "patterns_per_length": {"16": 4, "64": 2}}
    only16 = fit_matcher(MatchParams(method="centroid", lengths=(16, 64)), TWO)
    assert calibrate(only16, {"a": {16: QUERY}})["patterns_per_length"] == {"16": 2}
    assert only16.thresholds.keys() == {16} and only16.threshold(100) is None  # 64-token requests never fall back
    from premoe.errors import InputError

    with pytest.raises(InputError, match=r"no held-out data names a stored domain \(a, b\)"):
        calibrate(matcher, {"zz": {16: QUERY}})


def test_decide_picks_the_nearest_domain_and_falls_back_only_above_the_threshold():
    matcher = fit_matcher(MatchParams(method="centroid", lengths=(16, 64)), TWO)
    near_b = BANK["b"][16].mean(0)
    best, score, scores, fallback = matcher.decide(near_b, 20)  # 20 tokens: the 16-token bucket
    assert best == 1 and score == pytest.approx(0.0, abs=1e-12) and scores.shape == (2,) and fallback is False
    assert torch.equal(scores, matcher.scores(near_b.reshape(1, -1), 16)[0])
    matcher.thresholds = {16: 0.5, 64: 10.0}
    far = near_b + 3.0  # distance sqrt(27) from b's mean
    assert matcher.decide(far, 16)[3] is True and matcher.decide(far, 64)[3] is False
    edge = near_b.clone()
    edge[0] += 0.5  # score exactly the threshold: kept, not fallen back
    assert matcher.decide(edge, 16)[1] == pytest.approx(0.5) and matcher.decide(edge, 16)[3] is False
    assert matcher.threshold(63) == 0.5 and matcher.threshold(64) == 10.0 and matcher.threshold(3) == 0.5


@pytest.mark.parametrize("method", ["centroid", "knn", "diagonal", "lda", "logistic"])
def test_a_matcher_saved_and_loaded_scores_and_decides_the_same(method):
    import json

    from premoe.matchers import Matcher, calibrate

    matcher = fit_matcher(MatchParams(method=method, lengths=(64, 16), k=3), TWO)
    calibrate(matcher, {"a": {16: QUERY, 64: QUERY}})
    manifest = json.loads(json.dumps(matcher.manifest()))  # through JSON, as a store saves it
    loaded = Matcher.load(manifest, {k: v.clone() for k, v in matcher.tensors().items()})
    assert loaded.params == matcher.params and loaded.params.lengths == (16, 64)
    assert loaded.domains == ["a", "b"] and loaded.thresholds == matcher.thresholds
    assert loaded.bank.keys() == matcher.bank.keys()
    for domain in matcher.bank:
        assert all(torch.equal(loaded.bank[domain][t], matcher.bank[domain][t]) for t in (16, 64))
    for tokens in (16, 64, 500):
        assert torch.equal(loaded.scores(QUERY, tokens), matcher.scores(QUERY, tokens))
    assert all(k.startswith(("matcher/fit/", "matcher/bank/")) for k in matcher.tensors())
    assert {f"matcher/bank/{d}/{t}" for d in "ab" for t in (16, 64)} <= matcher.tensors().keys()
