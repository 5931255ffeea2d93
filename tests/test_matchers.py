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
