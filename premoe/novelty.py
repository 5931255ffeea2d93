"""Whether a request belongs to *any* stored domain: a score of its token ids and pattern (the fallback score).

The classifier (:mod:`premoe.matchers`, :mod:`premoe.ngram`) answers *which*
stored domain is nearest; this module answers whether the nearest is near
enough, so that a request from a domain the store has never seen falls back
to the generalist. The scores need only token ids and (``joint``) the
matcher's scores of the pattern retrieval has already read, no further
model run:

* ``kn``: under each domain's Kneser-Ney bigram model
  (:mod:`premoe.ngram`, the store's token models), the lowest mean NLL per
  token, less ``margin_weight`` times its margin to the second lowest
  (text that one domain explains much better than the others is familiar
  even when it is hard: new identifiers in Python code);
* ``ngram``: for every stored domain d,

      novelty_d(request) = share of the request's bigrams never seen in d's calibration text
                           + unigram_weight * share of its tokens never seen there

  and the request's score is the minimum over domains; the per-domain
  tables are the sorted distinct bigram codes (``prev * vocab + next``) and
  token ids of the calibration text;
* ``joint`` (default): the ``kn`` rule applied to the classifier's
  per-domain score, the n-gram NLL plus ``pattern_weight`` times the layer-1
  pattern's per-token Gaussian NLL (:func:`premoe.ngram.combine` of the matcher's
  scores): a request is familiar when one domain explains both its tokens
  and its routing pattern. The pattern costs nothing more: retrieval has
  already read it.

``kn`` and ``joint`` then add ``byte_weight`` times the request's lowest mean
NLL per byte under each domain's byte 5-gram model (:mod:`premoe.bytelm`):
spelling separates what token bigrams share (Spanish with French, C with
Python). Weight 1 won section 3a on val (C headers' fallback 0.31 -> 0.65 at
64 tokens); on test it took unseen fallback from 72% to 77% and in-domain
fallback from 3.9% to 1.8%; 0 leaves the byte models out.

``joint`` (pattern weight 0.5, margin weight 0) is the default: chosen on
the testbed's val split (bench/eval_retrieval.py, section 3a; foreign =
each stored domain left out in turn + the unseen domains' val splits) over
``kn``, ``ngram``, the matcher's nearest-domain score, k-NN distance to
calibration patterns, per-domain unigram log-likelihood, per-domain
z-scored NLL, one threshold per predicted domain and z-score sums of the
NLL and the LDA score. Its gain on val is on left-out *trained* domains
(python against en_docs); on test, text of domains the model never saw
(C headers, Spanish) falls back less often than with ``kn``:
docs/results/retrieval.md says by how much.

As with the matcher, each request-length bucket has its own threshold: the
``quantile`` of held-out in-domain requests' scores. Held-out text costs
only tokenising (``joint``: and a read of the first MoE layer) here, so the
store calibrates on all of it (up to ``max_tokens``), not only the windows
the matcher reads: on the testbed the first 64 val windows per domain put
the 64-token threshold where 14–18% of the rest of the val split of python,
en_docs, de and fr fell back.

Example::

    detector = fit_detector(NoveltyParams(method="ngram"), {"python": ids_py, "de": ids_de}, vocab=8192, lengths=(16, 64))
    calibrate_detector(detector, {"python": val_windows_py, "de": val_windows_de}, quantile=0.96)
    detector.score(request_ids)             # (n,) lower = more familiar
    detector.foreign(request_ids, 64)       # (n,) bool: beyond the 64-token bucket's threshold
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from premoe.bytelm import ByteLMs, fit_byte_lms
from premoe.errors import InputError
from premoe.matchers import bucket
from premoe.ngram import TokenLMs, bigram_codes, calibration_ids, combine

METHODS = ("nearest", "ngram", "kn", "joint")  # nearest: the matcher's nearest-domain score (the old rule); ngram:
# unseen bigram share (this module's tables); kn: the lowest per-token NLL under the domains' Kneser-Ney bigrams
# (premoe.ngram); joint: kn's rule on that NLL plus the weighted pattern NLL (the classifier's own score)
TOKEN_MODEL_METHODS = ("kn", "joint")  # scores read from the store's token models (no tables of their own)
PATTERN_METHODS = ("joint",)  # scores that read the matcher's per-domain pattern scores beside the token ids
MARGIN_WEIGHTS = {"kn": 0.5, "joint": 0.0}  # each method's margin weight chosen on val (docs/results/fallback.txt, 3a)


@dataclass
class NoveltyParams:
    """What decides a fallback. Defaults chosen on the testbed's val split (docs/results/retrieval.md)."""

    method: str = "joint"  # one of METHODS; "nearest" stores no detector and thresholds the matcher's score
    unigram_weight: float = 0.0  # ngram: weight of never-seen tokens beside never-seen bigrams (val: 0, .5, 1 within 0.01)
    margin_weight: float | None = None  # kn, joint: weight of the margin between the two lowest scores; None: the
    # method's val choice, MARGIN_WEIGHTS (kn: .5 of 0, .5, 1; joint: 0 of 0, .5)
    pattern_weight: float = 0.5  # joint: beta of premoe.ngram.combine for the pattern's NLL (val grid .5, 1, 2)
    byte_weight: float = 1.0  # kn, joint: weight of the lowest mean NLL per byte under the domains' byte n-gram
    # models (premoe.bytelm) added to the score; 0: no byte models (val grid 0, 1, 2, 4: 1 wins section 3a)
    byte_order: int = 5  # bytes per n-gram of those models (val: order 4 ties 5 at weight 2)
    max_tokens: int = 1 << 18  # ngram: calibration (and held-out) tokens per domain read (tokenised only)

    def check(self) -> "NoveltyParams":
        if self.method not in METHODS:
            raise InputError(f"fallback score must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.margin_weight is None:
            self.margin_weight = MARGIN_WEIGHTS.get(self.method, 0.0)
        if not self.unigram_weight >= 0:
            raise InputError(f"novelty unigram weight must be >= 0, got {self.unigram_weight}")
        if not 0 <= self.margin_weight < math.inf:
            raise InputError(f"novelty margin weight must be a finite number >= 0, got {self.margin_weight}")
        if not 0 <= self.pattern_weight < math.inf:
            raise InputError(f"novelty pattern weight must be a finite number >= 0, got {self.pattern_weight}")
        if not 0 <= self.byte_weight < math.inf:
            raise InputError(f"novelty byte weight must be a finite number >= 0, got {self.byte_weight}")
        if isinstance(self.byte_order, bool) or not isinstance(self.byte_order, int) or not 1 <= self.byte_order <= 6:
            raise InputError(f"novelty byte order must be an integer in 1..6, got {self.byte_order!r}")
        if self.max_tokens < 2:
            raise InputError(f"novelty calibration tokens must be >= 2, got {self.max_tokens}")
        return self

    @property
    def uses_bytes(self) -> bool:
        """Whether the score adds the byte models' NLL (``kn`` and ``joint`` with a positive byte weight)."""
        return self.method in TOKEN_MODEL_METHODS and self.byte_weight > 0


def _unseen(table: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(same shape as values) float64: 1 where a value is not in the sorted 1-D ``table``, else 0."""
    if len(table) == 0:
        return torch.ones(values.shape, dtype=torch.float64)
    pos = torch.searchsorted(table, values.contiguous()).clamp(max=len(table) - 1)
    return (table[pos] != values).double()


@dataclass
class Detector:
    params: NoveltyParams
    vocab: int  # bigram codes are prev * vocab + next
    lengths: tuple[int, ...]  # request-length buckets (the matcher's)
    bigrams: dict[str, torch.Tensor]  # domain -> sorted distinct bigram codes (int64) of its calibration text
    unigrams: dict[str, torch.Tensor]  # domain -> sorted distinct token ids (int64) of its calibration text
    thresholds: dict[int, float] = field(default_factory=dict)  # length bucket -> fallback score
    lms: TokenLMs | None = None  # kn, joint: the store's token models (saved by the store, not here)
    byte_lms: ByteLMs | None = None  # kn, joint with byte_weight > 0: the domains' byte n-gram models

    @property
    def uses_bytes(self) -> bool:
        return self.params.uses_bytes

    @property
    def domains(self) -> list[str]:
        return self.lms.domains if self.params.method in TOKEN_MODEL_METHODS else list(self.bigrams)

    @property
    def reads_patterns(self) -> bool:
        """Whether scores need the matcher's pattern scores of the requests (``joint``)."""
        return self.params.method in PATTERN_METHODS

    def scores(self, ids: torch.Tensor, pattern_scores: torch.Tensor | None = None, features: int = 0) -> torch.Tensor:
        """(n, domains) novelty of requests ``ids`` (n, T) to each domain; lower = more familiar.

        ``joint`` also reads ``pattern_scores`` (n, domains), the matcher's
        scores of the requests' patterns in this detector's domain order, and
        ``features``, the patterns' length (:func:`premoe.ngram.combine`)."""
        ids = ids.long().reshape(len(ids), -1)  # (n, T)
        if self.params.method == "kn":
            return self.lms.nll(ids)  # (n, D)
        if self.params.method == "joint":
            if pattern_scores is None or features < 1:
                raise InputError("the 'joint' fallback score needs the request's pattern scores and feature count")
            return combine(self.lms.nll(ids), pattern_scores.reshape(len(ids), -1), ids.shape[1], features,
                           self.params.pattern_weight)  # (n, D)
        codes = bigram_codes(ids, self.vocab)  # (n, T-1)
        out = []
        for domain in self.domains:
            uni = _unseen(self.unigrams[domain], ids).mean(1)  # (n,)
            bi = _unseen(self.bigrams[domain], codes).mean(1) if codes.shape[1] else uni  # (n,): 1 token = its unigram
            out.append(bi + self.params.unigram_weight * uni)
        return torch.stack(out, dim=1)  # (n, D)

    def score(self, ids: torch.Tensor, pattern_scores: torch.Tensor | None = None, features: int = 0) -> torch.Tensor:
        """(n,) novelty to the most familiar domain of requests ``ids`` (n, T); ``kn`` and ``joint``: the lowest
        score less ``margin_weight`` times its margin to the second lowest (text one domain explains much better
        than the rest is familiar even when hard). ``pattern_scores``, ``features``: as :meth:`scores`."""
        scores = self.scores(ids, pattern_scores, features)  # (n, D)
        if self.params.method not in TOKEN_MODEL_METHODS:
            return scores.min(1).values
        if scores.shape[1] < 2:
            score = scores[:, 0]
        else:
            two = scores.topk(2, dim=1, largest=False).values  # (n, 2) ascending
            score = two[:, 0] - self.params.margin_weight * (two[:, 1] - two[:, 0])
        if self.uses_bytes:  # text whose spelling no domain knows: a language or code the store never saw
            score = score + self.params.byte_weight * self.byte_lms.nll(ids.long().reshape(len(ids), -1)).min(1).values
        return score

    def threshold(self, tokens: int) -> float | None:
        """The fallback threshold of a ``tokens``-token request (None: not calibrated, never falls back)."""
        return self.thresholds.get(bucket(self.lengths, tokens))

    def foreign(self, ids: torch.Tensor, tokens: int | None = None, pattern_scores: torch.Tensor | None = None,
                features: int = 0) -> torch.Tensor:
        """(n,) bool: requests ``ids`` (n, T) whose novelty is beyond the threshold of their length bucket."""
        threshold = self.threshold(tokens or ids.shape[-1])
        if threshold is None:
            return torch.zeros(len(ids), dtype=torch.bool)
        return self.score(ids, pattern_scores, features) > threshold

    def add(self, ids: dict[str, torch.Tensor]) -> "Detector":
        """Add domains from their calibration ids ``{domain: (tokens,)}``; thresholds are kept (recalibrate).

        A ``kn`` or ``joint`` detector reads the store's token models (the store adds the domains there) and
        adds the domains' byte models here."""
        if self.params.method in TOKEN_MODEL_METHODS:
            if self.uses_bytes:
                self.byte_lms.add(ids)
            return self
        clashes = sorted(set(ids) & set(self.bigrams))
        if clashes:
            raise InputError(f"domain {', '.join(clashes)} already has a novelty table; rename the new domain")
        for domain, tokens in ids.items():
            self.bigrams[domain], self.unigrams[domain] = _tables(tokens, self.vocab, domain)
        return self

    # ------------------------------------------------------------------ files

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"novelty/bigrams/{d}": t.contiguous() for d, t in self.bigrams.items()}
        out.update({f"novelty/unigrams/{d}": t.contiguous() for d, t in self.unigrams.items()})
        out.update({f"novelty/{k}": t for k, t in self.byte_lms.tensors().items()} if self.uses_bytes else {})
        return out

    def manifest(self) -> dict:
        return {"params": asdict(self.params), "vocab": self.vocab, "lengths": list(self.lengths),
                "domains": self.domains, "thresholds": {str(t): v for t, v in self.thresholds.items()},
                **({"bytes": self.byte_lms.manifest()} if self.uses_bytes else {})}

    @classmethod
    def load(cls, manifest: dict, tensors: dict[str, torch.Tensor], lms: TokenLMs | None = None) -> "Detector":
        domains = manifest["domains"]
        params = NoveltyParams(**{"byte_weight": 0.0, **manifest["params"]}).check()  # saved before byte models
        if params.method in TOKEN_MODEL_METHODS:
            if lms is None:
                raise InputError(f"the store's fallback score is {params.method!r} but it has no token models; "
                                 "rebuild the store")
            detector = cls(params, int(manifest["vocab"]), tuple(int(t) for t in manifest["lengths"]), {}, {},
                           {int(t): float(v) for t, v in manifest["thresholds"].items()}, lms)
            if detector.uses_bytes:
                if "bytes" not in manifest:
                    raise InputError(f"the store's fallback score weighs byte models ({params.byte_weight}) but it "
                                     "has none; rebuild the store")
                detector.byte_lms = ByteLMs.load(manifest["bytes"], {k.removeprefix("novelty/"): t
                                                                  for k, t in tensors.items()
                                                                  if k.startswith("novelty/bytes/")})
                if detector.byte_lms.domains != lms.domains:
                    raise InputError("the store's byte models and token models name different domains; "
                                     "rebuild the store")
            return detector
        missing = [d for d in domains if f"novelty/bigrams/{d}" not in tensors or f"novelty/unigrams/{d}" not in tensors]
        if missing:
            raise InputError(f"the store's novelty tables lack domain {', '.join(missing)}; rebuild the store")
        return cls(params, int(manifest["vocab"]),
                   tuple(int(t) for t in manifest["lengths"]),
                   {d: tensors[f"novelty/bigrams/{d}"].long() for d in domains},
                   {d: tensors[f"novelty/unigrams/{d}"].long() for d in domains},
                   {int(t): float(v) for t, v in manifest["thresholds"].items()})


def _tables(ids: torch.Tensor, vocab: int, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct bigram codes, sorted distinct token ids) of one domain's calibration ids (tokens,)."""
    ids = calibration_ids(ids, vocab, domain, "novelty tables")
    return bigram_codes(ids, vocab).unique(), ids.unique()  # unique() sorts


def fit_detector(params: NoveltyParams, ids: dict[str, torch.Tensor], vocab: int,
                 lengths: tuple[int, ...], lms: TokenLMs | None = None,
                 token_bytes: list[bytes] | None = None) -> Detector:
    """Novelty tables of every domain from its calibration ids ``{domain: (tokens,)}`` (documents EOS-joined);
    a ``kn`` or ``joint`` detector scores with ``lms`` (the store's token models) instead, plus (byte weight
    > 0) byte models fit on the same ids read through ``token_bytes`` (:func:`premoe.bytelm.token_bytes`)."""
    params.check()
    if params.method == "nearest":
        raise InputError("fit_detector builds the 'ngram', 'kn' or 'joint' fallback score, not 'nearest'")
    if params.method in TOKEN_MODEL_METHODS:
        if lms is None:
            raise InputError(f"the {params.method!r} fallback score needs the store's token models "
                             "(NgramParams(use=True))")
        if not lengths or any(t < 1 for t in lengths):
            raise InputError(f"request-length buckets must be positive, got {lengths}")
        detector = Detector(params, int(vocab), tuple(sorted(lengths)), {}, {}, lms=lms)
        if detector.uses_bytes:
            if token_bytes is None or set(ids) != set(lms.domains):
                raise InputError(f"the byte models need every domain's calibration ids and the tokens' bytes "
                                 f"(domains {', '.join(lms.domains)}); or set the byte weight to 0")
            detector.byte_lms = fit_byte_lms({d: ids[d] for d in lms.domains}, token_bytes, params.byte_order)
        return detector
    if not ids:
        raise InputError("no domains to build novelty tables for; give calibration text for at least one domain")
    if not lengths or any(t < 1 for t in lengths):
        raise InputError(f"request-length buckets must be positive, got {lengths}")
    return Detector(params, int(vocab), tuple(sorted(lengths)), {}, {}).add(ids)


def calibrate_detector(detector: Detector, held_out: dict[str, torch.Tensor], quantile: float,
                       pattern_scores: dict[str, dict[int, torch.Tensor]] | None = None, features: int = 0) -> dict:
    """Set every length bucket's threshold from held-out in-domain windows ``{domain: (n, seq)}``; returns counts.

    A request of T tokens is a window's first T tokens (as in
    :func:`premoe.matchers.calibrate`); the threshold is the ``quantile`` of
    their scores, so about 1 − quantile of in-domain requests fall back.
    A ``joint`` detector also needs ``pattern_scores``
    ``{domain: {T: (n, domains)}}``, the matcher's scores of the same
    windows' first T tokens (detector's domain order), and ``features``.
    """
    usable = {d: w for d, w in held_out.items() if d in detector.domains}
    if not usable:
        raise InputError(f"no held-out data names a stored domain ({', '.join(detector.domains)}); "
                         "name held-out data after the domains, e.g. --held-out python=val.jsonl")
    if detector.reads_patterns:
        short = [d for d, w in usable.items() if d not in (pattern_scores or {})
                 or any(len(pattern_scores[d].get(t, w[:0])) != len(w) for t in detector.lengths if w.shape[1] >= t)]
        if short:
            raise InputError(f"the {detector.params.method!r} fallback score needs pattern scores of every held-out "
                             f"window; domain {', '.join(short)} has none or a different count")
    seen = {}
    for length in detector.lengths:
        names = [d for d, w in usable.items() if w.shape[1] >= length]
        if not names:
            continue
        patterns = torch.cat([pattern_scores[d][length] for d in names]) if detector.reads_patterns else None
        scores = detector.score(torch.cat([usable[d][:, :length] for d in names]), patterns, features)  # (n,)
        detector.thresholds[length] = float(scores.quantile(quantile))
        seen[str(length)] = len(scores)
    return seen
