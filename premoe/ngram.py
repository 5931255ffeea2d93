"""Per-domain token language models: interpolated Kneser-Ney bigrams of the calibration text's token ids.

Retrieval reads a request's layer-1 routing pattern (:mod:`premoe.matchers`);
this module adds what its *tokens* say, at no model cost: for every stored
domain d, the mean negative log-likelihood per token of the request under
d's bigram model (language identification, naive-Bayes style). Two users:

* the domain classifier (:func:`combine`): nearest domain =
  argmin over d of ``nll_d + pattern_weight * F / (2 T) * lda_d``, i.e. the
  per-token n-gram log-likelihood plus the per-token Gaussian log-likelihood
  of the request's mean pattern (an LDA score is Mahalanobis / F, a
  T-token mean pattern's log-likelihood is −Mahalanobis / 2), the pattern's
  evidence weighted by ``pattern_weight`` because both read the same tokens;
* the fallback scores ``kn`` and ``joint`` (:mod:`premoe.novelty`): the
  lowest ``nll_d`` (``joint``: of :func:`combine`) over domains (a request
  unlikely under every domain is foreign).

The model (Chen & Goodman 1998, interpolated Kneser-Ney, one discount D)::

    p(v | u) = max(c(u v) − D, 0) / c(u) + D · N1+(u •) / c(u) · p_cont(v)     if c(u) > 0, else p_cont(v)
    p_cont(v) = (N1+(• v) + delta) / (N1+(• •) + delta · vocab)

Stored per domain: the sorted distinct bigram codes ``u * vocab + v`` and
their counts; everything else is derived on load.

Example::

    lms = fit_lms(NgramParams(), {"python": ids_py, "de": ids_de}, vocab=8192)
    lms.nll(request_ids)            # (n, 2) mean NLL per token under each domain; lower = more likely
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from premoe.errors import InputError


@dataclass
class NgramParams:
    """The token models. Defaults chosen on the testbed's val split (docs/results/retrieval.md)."""

    use: bool = True  # combine the token models with the matcher; False: the matcher alone decides (the old rule)
    discount: float = 0.75  # Kneser-Ney absolute discount D (val: 0.75 and 0.9 within 0.01)
    delta: float = 0.5  # add-delta on the continuation unigram, so an unseen token has a probability
    pattern_weight: float = 2.0  # beta: weight of the pattern's per-token log-likelihood (val grid 0, .5, 1, 2, 4)
    max_tokens: int = 1 << 18  # calibration tokens per domain read (tokenised only, no model run)

    def check(self) -> "NgramParams":
        if not 0 < self.discount < 1:
            raise InputError(f"Kneser-Ney discount must be in (0, 1), got {self.discount}")
        if not self.delta > 0:
            raise InputError(f"n-gram delta must be > 0, got {self.delta}")
        if not self.pattern_weight >= 0:
            raise InputError(f"pattern weight must be >= 0, got {self.pattern_weight}")
        if self.max_tokens < 2:
            raise InputError(f"n-gram calibration tokens must be >= 2, got {self.max_tokens}")
        return self


@dataclass
class _Bigram:
    """One domain's derived tables (float64): counts of its bigram codes, c(u), N1+(u •), p_cont."""

    codes: torch.Tensor  # (B,) int64 sorted distinct bigram codes
    counts: torch.Tensor  # (B,) their counts
    history: torch.Tensor  # (vocab,) c(u)
    followers: torch.Tensor  # (vocab,) N1+(u •)
    cont: torch.Tensor  # (vocab,) p_cont(v)


def _derive(codes: torch.Tensor, counts: torch.Tensor, vocab: int, delta: float) -> _Bigram:
    counts = counts.double()
    prev, nxt = codes // vocab, codes % vocab
    ones = torch.ones_like(counts)
    history = torch.zeros(vocab, dtype=torch.float64).index_add_(0, prev, counts)
    followers = torch.zeros(vocab, dtype=torch.float64).index_add_(0, prev, ones)
    preceded = torch.zeros(vocab, dtype=torch.float64).index_add_(0, nxt, ones)  # N1+(• v)
    cont = (preceded + delta) / (preceded.sum() + delta * vocab)
    return _Bigram(codes, counts, history, followers, cont)


@dataclass
class TokenLMs:
    params: NgramParams
    vocab: int  # bigram codes are prev * vocab + next
    codes: dict[str, torch.Tensor]  # domain -> (B,) int64 sorted distinct bigram codes of its calibration ids
    counts: dict[str, torch.Tensor]  # domain -> (B,) int64 their counts

    def __post_init__(self) -> None:
        self._tables = {d: _derive(self.codes[d], self.counts[d], self.vocab, self.params.delta) for d in self.codes}

    @property
    def domains(self) -> list[str]:
        return list(self.codes)

    def logprob(self, domain: str, ids: torch.Tensor) -> torch.Tensor:
        """(n, T - 1) float64 log p(ids[:, t] | ids[:, t - 1]) under ``domain``'s model, ids (n, T)."""
        t = self._tables[domain]
        ids = ids.long()
        prev, nxt = ids[:, :-1], ids[:, 1:]  # (n, T-1)
        code = bigram_codes(ids, self.vocab)  # (n, T-1)
        if len(t.codes):
            pos = torch.searchsorted(t.codes, code.contiguous()).clamp(max=len(t.codes) - 1)
            seen = torch.where(t.codes[pos] == code, t.counts[pos], torch.zeros((), dtype=torch.float64))
        else:
            seen = torch.zeros(code.shape, dtype=torch.float64)
        hist, fol, cont = t.history[prev], t.followers[prev], t.cont[nxt]
        d = self.params.discount
        p = torch.where(hist > 0, ((seen - d).clamp(min=0) + d * fol * cont) / hist.clamp(min=1), cont)
        return p.log()

    def nll(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, domains) mean negative log-likelihood per token of requests ``ids`` (n, T); a 1-token request
        scores its token's continuation probability."""
        ids = ids.long().reshape(len(ids), -1)  # (n, T)
        self._check_ids(ids)
        out = []
        for domain in self.domains:
            if ids.shape[1] >= 2:
                out.append(-self.logprob(domain, ids).mean(1))
            else:
                out.append(-self._tables[domain].cont[ids[:, 0]].log())
        return torch.stack(out, dim=1)  # (n, D)

    def add(self, ids: dict[str, torch.Tensor]) -> "TokenLMs":
        """Add domains from their calibration ids ``{domain: (tokens,)}``."""
        clashes = sorted(set(ids) & set(self.codes))
        if clashes:
            raise InputError(f"domain {', '.join(clashes)} already has a token model; rename the new domain")
        for domain, tokens in ids.items():
            self.codes[domain], self.counts[domain] = _count(tokens, self.vocab, domain)
            self._tables[domain] = _derive(self.codes[domain], self.counts[domain], self.vocab, self.params.delta)
        return self

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise InputError(f"request token ids must be in [0, {self.vocab}), got {int(ids.min())}..{int(ids.max())}; "
                             "is the tokenizer the store's?")

    # ------------------------------------------------------------------ files

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"ngram/codes/{d}": t.contiguous() for d, t in self.codes.items()}
        out.update({f"ngram/counts/{d}": t.contiguous() for d, t in self.counts.items()})
        return out

    def manifest(self) -> dict:
        return {"params": asdict(self.params), "vocab": self.vocab, "domains": self.domains,
                "kind": "interpolated Kneser-Ney bigram"}

    @classmethod
    def load(cls, manifest: dict, tensors: dict[str, torch.Tensor]) -> "TokenLMs":
        domains = manifest["domains"]
        missing = [d for d in domains if f"ngram/codes/{d}" not in tensors or f"ngram/counts/{d}" not in tensors]
        if missing:
            raise InputError(f"the store's token models lack domain {', '.join(missing)}; rebuild the store")
        return cls(NgramParams(**manifest["params"]).check(), int(manifest["vocab"]),
                   {d: tensors[f"ngram/codes/{d}"].long() for d in domains},
                   {d: tensors[f"ngram/counts/{d}"].long() for d in domains})


def bigram_codes(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., seq - 1) int64 codes ``prev * vocab + next`` of consecutive tokens of ``ids`` (..., seq)."""
    ids = ids.long()
    return ids[..., :-1] * vocab + ids[..., 1:]


def calibration_ids(ids: torch.Tensor, vocab: int, domain: str, what: str) -> torch.Tensor:
    """One domain's calibration ids as (tokens,) int64, checked: at least 2, every id inside the vocabulary."""
    ids = ids.long().reshape(-1)
    if len(ids) < 2:
        raise InputError(f"domain {domain!r} has {len(ids)} calibration tokens; {what} need at least 2")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InputError(f"domain {domain!r} has token ids outside [0, {vocab}); is the vocabulary size right?")
    return ids


def _count(ids: torch.Tensor, vocab: int, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct bigram codes, their counts) of one domain's calibration ids (tokens,)."""
    ids = calibration_ids(ids, vocab, domain, "token models")
    codes, counts = bigram_codes(ids, vocab).unique(return_counts=True)  # unique() sorts
    return codes, counts


def fit_lms(params: NgramParams, ids: dict[str, torch.Tensor], vocab: int) -> TokenLMs:
    """Token models of every domain from its calibration ids ``{domain: (tokens,)}`` (documents EOS-joined)."""
    params.check()
    if not ids:
        raise InputError("no domains to build token models for; give calibration text for at least one domain")
    return TokenLMs(params, int(vocab), {}, {}).add(ids)


def combine(nll: torch.Tensor, pattern_scores: torch.Tensor, tokens: int, features: int,
            pattern_weight: float) -> torch.Tensor:
    """(n, D) classifier scores, lower = nearer: per-token n-gram NLL ``nll`` (n, D) plus the pattern's
    per-token Gaussian NLL, ``pattern_weight * features / (2 tokens) * pattern_scores`` (n, D) (an LDA score is
    Mahalanobis / features)."""
    if nll.shape != pattern_scores.shape:
        raise InputError(f"token and pattern scores must have one shape, got {tuple(nll.shape)} and "
                         f"{tuple(pattern_scores.shape)}")
    return nll + pattern_weight * features / (2 * max(int(tokens), 1)) * pattern_scores.to(nll.dtype)
