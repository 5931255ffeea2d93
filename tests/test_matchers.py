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
