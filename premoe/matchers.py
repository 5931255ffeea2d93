"""Which stored domain a request pattern belongs to, and whether it belongs to any: pure tensor maths.

Every method turns a request pattern (the mean of its token features,
:mod:`premoe.patterns`) into one score per stored domain, lower = nearer.
The nearest domain serves the request unless its score is beyond the
fallback threshold of the request's length bucket, then the generalist does.

Methods (all fit on *calibration* patterns: chunk means of calibration
windows at each request length of ``lengths``):

* ``centroid``: L2 distance to the domain's mean pattern — the paper's TAER
  rule (v1 eq. 10) when the feature is the first layer's TCESS scores;
* ``knn``: distance to the k-th nearest calibration pattern of each domain
  (standardised features, cosine), several patterns per domain;
* ``diagonal``: per-domain Gaussian with diagonal covariance (mean negative
  log-likelihood per feature);
* ``lda``: Mahalanobis distance with one covariance shared by the domains,
  shrunk toward its mean variance (Lee et al. 2018's OOD score);
* ``logistic``: multinomial logistic regression over all lengths,
  score = −log p(domain | pattern).

Per-length fits matter: the spread of a 16-token mean is much larger than
that of a 256-token mean, so one threshold for all lengths would either
reject short requests or accept anything long.

Example::

    matcher = fit_matcher(MatchParams(method="lda"), bank)    # bank: {domain: {T: (n, F)}}
    calibrate(matcher, held_out)                              # held_out: {domain: {T: (n, F)}}
    matcher.decide(pattern, tokens=64)                        # (nearest index, score, scores (D,), fallback)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from premoe.errors import InputError

METHODS = ("centroid", "knn", "diagonal", "lda", "logistic")


@dataclass
class MatchParams:
    """How requests are matched to domains. Defaults chosen on the testbed's val split (docs/results/retrieval.md)."""

    method: str = "lda"  # one of METHODS
    feature: str = "router_input"  # premoe.patterns feature (or a scorer preset)
    layers: int = 1  # MoE layers the feature is read from (2 costs a second layer and no bank can give it)
    lengths: tuple[int, ...] = (16, 32, 64, 128, 256)  # request-length buckets, each fit and thresholded alone
    k: int = 5  # knn: the k-th nearest calibration pattern of a domain
    shrinkage: float = 0.01  # lda: covariance = (1 - s) C + s * mean variance * I
    weight_decay: float = 1e-3  # logistic: L2 penalty on the standardised weights
    quantile: float = 0.96  # fallback threshold = this quantile of held-out in-domain scores (per length); val: 0.96
    # puts 4% of in-domain val requests on the generalist, so test stays near the 5% goal

    def check(self) -> "MatchParams":
        if self.method not in METHODS:
            raise InputError(f"retrieval method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.lengths or any(type(t) is not int or t < 1 for t in self.lengths):
            raise InputError(f"request-length buckets must be positive, got {self.lengths}")
        if not 0 < self.quantile <= 1:
            raise InputError(f"fallback quantile must be in (0, 1], got {self.quantile}")
        self.lengths = tuple(sorted(int(t) for t in self.lengths))
        return self


@dataclass
class Matcher:
    params: MatchParams
    domains: list[str]
    bank: dict[str, dict[int, torch.Tensor]]  # domain -> length -> (patterns, features) calibration patterns
    fitted: dict[str, torch.Tensor] = field(default_factory=dict)  # "<length>/<name>" -> tensor
    thresholds: dict[int, float] = field(default_factory=dict)  # length bucket -> fallback score

    def bucket(self, tokens: int) -> int:
        """The length bucket of a request of ``tokens`` tokens: the longest fitted length not above it."""
        return bucket(self.params.lengths, tokens)

    def scores(self, patterns: torch.Tensor, tokens: int) -> torch.Tensor:
        """(n, domains) scores of patterns (n, features) from ``tokens``-token requests; lower = nearer."""
        length = self.bucket(tokens)
        x = patterns.double()
        f = lambda name: self.fitted[f"{length}/{name}"]  # noqa: E731
        method = self.params.method
        if method == "centroid":
            return torch.cdist(x, f("mean"))
        if method == "knn":
            z = _unit((x - f("shift")) / f("scale"))  # (n, F)
            labels, items = f("labels"), f("items")
            out = torch.full((len(x), len(self.domains)), float("inf"), dtype=torch.float64)
            for d in range(len(self.domains)):
                dist = 1 - z @ items[labels == d].T  # (n, items of d)
                k = min(self.params.k, dist.shape[1])
                out[:, d] = dist.topk(k, dim=1, largest=False).values[:, -1]
            return out
        if method == "diagonal":
            diff = x[:, None] - f("mean")[None]  # (n, D, F)
            return 0.5 * (diff**2 / f("var")[None] + f("var").log()[None]).mean(-1)
        if method == "lda":
            diff = x[:, None] - f("mean")[None]  # (n, D, F)
            return torch.einsum("ndf,fg,ndg->nd", diff, f("precision"), diff) / x.shape[1]
        z = (x - self.fitted["all/shift"]) / self.fitted["all/scale"]  # logistic
        return -(z @ self.fitted["all/weight"] + self.fitted["all/bias"]).log_softmax(-1)

    def decide(self, pattern: torch.Tensor, tokens: int) -> tuple[int, float, torch.Tensor, bool]:
        """(nearest domain index, its score, all scores (domains,), fallback) for one pattern (features,)."""
        scores = self.scores(pattern.reshape(1, -1), tokens)[0]  # (domains,)
        best = int(scores.argmin())
        threshold = self.threshold(tokens)
        return best, float(scores[best]), scores, threshold is not None and float(scores[best]) > threshold

    def threshold(self, tokens: int) -> float | None:
        """The fallback threshold of a ``tokens``-token request (None: not calibrated, never falls back)."""
        return self.thresholds.get(self.bucket(tokens))

    # ------------------------------------------------------------------ files

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"matcher/fit/{k}": v.contiguous() for k, v in self.fitted.items()}
        for domain, by_length in self.bank.items():
            out.update({f"matcher/bank/{domain}/{t}": v.contiguous() for t, v in by_length.items()})
        return out

    def manifest(self) -> dict:
        return {"params": asdict(self.params), "domains": self.domains,
                "thresholds": {str(t): v for t, v in self.thresholds.items()}}

    @classmethod
    def load(cls, manifest: dict, tensors: dict[str, torch.Tensor]) -> "Matcher":
        params = MatchParams(**{**manifest["params"], "lengths": tuple(manifest["params"]["lengths"])}).check()
        fitted = {k[len("matcher/fit/"):]: v for k, v in tensors.items() if k.startswith("matcher/fit/")}
        bank = {d: {t: tensors[f"matcher/bank/{d}/{t}"] for t in params.lengths if f"matcher/bank/{d}/{t}" in tensors}
                for d in manifest["domains"]}
        return cls(params, list(manifest["domains"]), bank, fitted,
                   {int(t): float(v) for t, v in manifest["thresholds"].items()})


def fit_matcher(params: MatchParams, bank: dict[str, dict[int, torch.Tensor]]) -> Matcher:
    """Fit ``params.method`` on calibration patterns ``{domain: {length: (n, features)}}``."""
    params.check()
    domains = list(bank)
    if len(domains) < 1:
        raise InputError("no domains to match against; give calibration text for at least one domain")
    fitted: dict[str, torch.Tensor] = {}
    for length in params.lengths:
        rows = [bank[d].get(length) for d in domains]
        if any(r is None or len(r) == 0 for r in rows):
            missing = [d for d, r in zip(domains, rows) if r is None or len(r) == 0]
            raise InputError(f"no calibration patterns of {length} tokens for {', '.join(missing)}; give longer "
                             f"calibration text or drop {length} from the request lengths")
        x = torch.cat(rows).double()  # (N, F)
        labels = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)])  # (N,)
        fitted.update({f"{length}/{k}": v for k, v in _fit_one(params, x, labels, len(domains)).items()})
    if params.method == "logistic":
        fitted = _fit_logistic(params, bank, domains)
    return Matcher(params, domains, bank, fitted)


def _fit_one(params: MatchParams, x: torch.Tensor, labels: torch.Tensor, count: int) -> dict[str, torch.Tensor]:
    """One length bucket's fitted tensors for the distance methods."""
    mean = torch.stack([x[labels == d].mean(0) for d in range(count)])  # (D, F)
    if params.method == "centroid":
        return {"mean": mean}
    if params.method == "knn":
        shift, scale = x.mean(0), x.std(0) + 1e-6
        return {"shift": shift, "scale": scale, "items": _unit((x - shift) / scale), "labels": labels}
    if params.method == "diagonal":
        var = torch.stack([x[labels == d].var(0, unbiased=False) if (labels == d).sum() > 1 else x.var(0)
                           for d in range(count)])  # (D, F)
        return {"mean": mean, "var": var + 1e-3 * var.mean() + 1e-12}
    if params.method == "lda":
        resid = x - mean[labels]  # (N, F)
        cov = resid.T @ resid / max(len(x) - count, 1)  # (F, F) shared within-domain covariance
        scale = cov.diagonal().mean().clamp(min=1e-12)
        cov = (1 - params.shrinkage) * cov + params.shrinkage * scale * torch.eye(len(cov), dtype=cov.dtype)
        return {"mean": mean, "precision": torch.linalg.inv(cov)}
    return {}


def _fit_logistic(params: MatchParams, bank: dict, domains: list[str]) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression on every length's patterns at once (L-BFGS, deterministic)."""
    x = torch.cat([bank[d][t] for d in domains for t in params.lengths]).double()  # (N, F)
    labels = torch.cat([torch.full((len(bank[d][t]),), i) for i, d in enumerate(domains) for t in params.lengths])
    shift, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - shift) / scale
    weight = torch.zeros(x.shape[1], len(domains), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(domains), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(z @ weight + bias, labels) + params.weight_decay * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return {"all/shift": shift, "all/scale": scale, "all/weight": weight.detach(), "all/bias": bias.detach()}


def bucket(lengths: tuple[int, ...], tokens: int) -> int:
    """The length bucket of a request of ``tokens`` tokens: the longest of ``lengths`` not above it."""
    usable = [t for t in lengths if t <= tokens]
    return usable[-1] if usable else lengths[0]


def calibrate(matcher: Matcher, held_out: dict[str, dict[int, torch.Tensor]]) -> dict:
    """Set the fallback threshold of every length bucket from held-out in-domain patterns; returns what was seen.

    ``held_out`` is ``{domain: {length: (n, features)}}`` of *request-like*
    patterns (prefixes of held-out windows). The threshold is the
    ``params.quantile`` quantile of their nearest-domain scores, so about
    1 − quantile of in-domain requests fall back.
    """
    usable = {d: v for d, v in held_out.items() if d in matcher.domains}
    if not usable:
        raise InputError(f"no held-out data names a stored domain ({', '.join(matcher.domains)}); "
                         "name held-out data after the domains, e.g. --held-out python=val.jsonl")
    seen = {}
    for length in matcher.params.lengths:
        rows = [v[length] for v in usable.values() if length in v]
        if not rows:
            continue
        best = matcher.scores(torch.cat(rows), length).min(1).values  # (n,)
        matcher.thresholds[length] = float(best.quantile(matcher.params.quantile))
        seen[str(length)] = len(best)
    return {"quantile": matcher.params.quantile, "domains": sorted(usable), "patterns_per_length": seen}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)
