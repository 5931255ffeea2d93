"""Pattern store for task-adaptive expert retrieval (TAER, DESIGN.md §2).

A store keeps two separate things per domain, so that *what retrieval
matches* and *which experts are kept* can each be chosen on their own:

* **patterns** (:mod:`premoe.patterns`, :mod:`premoe.matchers`): calibration
  patterns of the domain at several request lengths and the matcher fitted
  on them (method, feature and every fitted tensor), plus per-length
  fallback thresholds calibrated on held-out in-domain text;
* **token models** (:mod:`premoe.ngram`): a Kneser-Ney bigram model of
  each domain's calibration token ids; the nearest domain is the argmin of
  the request's per-token n-gram NLL plus its weighted pattern score
  (:func:`premoe.ngram.combine`); a store built with ``use=False`` has none
  and the matcher alone decides;
* the **fallback score** with its own per-length thresholds
  (:mod:`premoe.novelty`): ``kn`` (the lowest per-token NLL under the token
  models), ``joint`` (the same on the NLL plus the weighted pattern score;
  the default), ``ngram`` (the share of the request's bigrams never seen in any domain,
  stored as tables) or ``nearest`` (the matcher's nearest-domain score,
  nothing stored);
* **ranking** sums of one profiled scorer (default ``peu``, the planner's
  default), so kept sets come from :func:`~premoe.plan.make_plan`: a
  retrieved domain gets exactly the experts its compiled specialist keeps.

Plus a ``generalist`` (token-weighted over all domains, eq. 11): the
fallback for requests whose fallback score is beyond its threshold.

A store directory holds::

    store.json             manifest: format, model identity, ranking scorer, matcher params + thresholds,
                           novelty params + thresholds, domains
    patterns.safetensors   "<domain>/sums", "<domain>/routed" (layers, experts) float64 ranking sums;
                           "matcher/bank/<domain>/<T>" (n, features) calibration patterns of T tokens;
                           "matcher/fit/<T>/<name>" the fitted matcher's tensors;
                           "ngram/codes/<domain>", "ngram/counts/<domain>" int64 bigram codes and counts;
                           "novelty/bigrams/<domain>", "novelty/unigrams/<domain>" sorted int64 tables (ngram)

Example::

    profile = Profile.load("profiles/testbed")
    store = build_store("testbed", profile, parse_sources(["testbed"]), held_out=parse_sources(["testbed"], split="val"))
    store.save("stores/testbed")
    store.kept("python", 16)        # {layer: [experts]} of the python specialist at M = 16
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from premoe import __version__
from premoe.bytelm import token_bytes
from premoe.capture import DomainStats
from premoe.data import Source, token_windows
from premoe.errors import InputError, PremoeError
from premoe.fileio import load_artefact, save_artefact
from premoe.matchers import Matcher, MatchParams, calibrate, fit_matcher
from premoe.ngram import NgramParams, TokenLMs, combine, fit_lms
from premoe.novelty import TOKEN_MODEL_METHODS, Detector, NoveltyParams, calibrate_detector, fit_detector
from premoe.patterns import PatternReader, chunk_means, prefix_means
from premoe.profile import Profile
from premoe.scores import DEFAULT_SCORER

FORMAT = "premoe-store/5"  # 3: novelty tables (the fallback score) beside the matcher; 4: token models (premoe.ngram);
# 5: byte n-gram models in the fallback score (premoe.bytelm)
GENERALIST = "generalist"
DEFAULT_RANKING = DEFAULT_SCORER


@dataclass
class PatternData:
    """How much text becomes calibration and held-out patterns."""

    tokens: int = 32768  # calibration tokens per domain (the matcher's training set)
    held_out_tokens: int = 16384  # held-out tokens per domain (threshold calibration)
    batch_size: int = 16  # windows per forward pass


@dataclass
class Store:
    profile: Profile  # the stored domains' sums of the ranking scorer only
    scorer: str  # ranking scorer: which experts a retrieved domain keeps
    matcher: Matcher  # what a request is matched by
    calibration: dict = field(default_factory=dict)  # how thresholds were set
    detector: Detector | None = None  # the fallback score; None: the matcher's nearest-domain score decides
    lms: TokenLMs | None = None  # per-domain token models the classifier adds to the matcher; None: matcher alone

    @property
    def model(self) -> dict:
        return self.profile.model

    @property
    def moe_layers(self) -> list[int]:
        return self.profile.moe_layers

    @property
    def domains(self) -> list[str]:
        return list(self.matcher.domains)

    def utility(self, target: str) -> torch.Tensor:
        """(layers, experts) ranking utility of a domain or of the generalist."""
        if target == GENERALIST:
            return self.profile.generalist_utility(self.scorer)
        return self.profile.utility(target, self.scorer)

    def ranking(self, target: str) -> torch.Tensor:
        """(layers, experts) int64: every layer's experts, best first."""
        return self.utility(target).argsort(dim=1, descending=True, stable=True)

    def kept(self, target: str, experts: int) -> dict[int, list[int]]:
        """Experts a ``target`` specialist (or the generalist) keeps at M = ``experts``: the plan's own choice."""
        from premoe.plan import PlanRequest, make_plan

        request = PlanRequest(experts=experts, scorer=self.scorer,
                              **({} if target == GENERALIST else {"domain": target}))
        return make_plan(self.profile, request).kept

    # ------------------------------------------------------------------ which domain

    @property
    def method(self) -> str:
        """The classifier's name: the matcher's method, ``+kn`` when the token models join it."""
        return self.matcher.params.method + ("+kn" if self.lms is not None else "")

    def classify(self, pattern: torch.Tensor, tokens: int,
                 ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(classifier scores (domains,), matcher scores (domains,)) of one request, lower = nearer.

        The classifier's scores are the matcher's scores of the pattern
        (features,) alone, or (a store with token models) combined with the
        per-token n-gram NLL of the request's ids (T,) by
        :func:`premoe.ngram.combine`; its argmin is the nearest domain.
        """
        scores = self.matcher.scores(pattern.reshape(1, -1), tokens)  # (1, D)
        if self.lms is None:
            return scores[0], scores[0]
        if ids is None:
            raise InputError("this store classifies requests by their tokens too (token models); pass their ids")
        nll = self.lms.nll(ids.reshape(1, -1))  # (1, D)
        return combine(nll, scores, tokens, pattern.numel(), self.lms.params.pattern_weight)[0], scores[0]

    # ------------------------------------------------------------------ fallback

    @property
    def fallback_method(self) -> str:
        return "nearest" if self.detector is None else self.detector.params.method

    @property
    def fallback_scorer(self) -> Matcher | Detector:
        """What fallbacks are thresholded on: the novelty detector, or (a ``nearest`` store) the matcher; both
        hold per-length ``thresholds`` and answer ``threshold(tokens)``."""
        return self.matcher if self.detector is None else self.detector

    def fallback_score(self, ids: torch.Tensor | None, pattern_scores: torch.Tensor, features: int = 0) -> float:
        """The score a request's fallback is decided by: its novelty (ids (T,) needed; ``joint`` also reads the
        matcher's ``pattern_scores`` (domains,) of its pattern of ``features`` values), or (a ``nearest`` store)
        the lowest of ``pattern_scores``."""
        if self.detector is None:
            return float(pattern_scores.min())
        if ids is None:
            raise InputError("this store decides fallbacks by the request's tokens (novelty); pass its ids")
        patterns = self.novelty_order(pattern_scores.reshape(1, -1)) if self.detector.reads_patterns else None
        return float(self.detector.score(ids.reshape(1, -1), patterns, features)[0])

    def novelty_order(self, pattern_scores: torch.Tensor) -> torch.Tensor:
        """(n, domains) matcher scores (matcher's domain order) reordered to the novelty detector's domains."""
        order = [self.matcher.domains.index(d) for d in self.detector.domains]
        return pattern_scores[:, order]

    def fallback_threshold(self, tokens: int) -> float | None:
        """The fallback threshold of a ``tokens``-token request (None: never falls back)."""
        return self.fallback_scorer.threshold(tokens)

    # ------------------------------------------------------------------ growing

    def add_domain(self, profile: Profile, patterns: dict[str, dict[int, torch.Tensor]],
                   ids: dict[str, torch.Tensor] | None = None) -> "Store":
        """Add every domain of ``profile`` with its calibration ``patterns`` ({domain: {T: (n, F)}}).

        ``ids`` ({domain: (tokens,)}, calibration token ids) add the domains'
        novelty tables; a store with novelty tables needs them. The matcher is
        refit on all domains' stored calibration patterns; the thresholds are
        kept (recalibrate with :func:`calibrate_store`).
        """
        if profile.model["config_hash"] != self.model["config_hash"]:
            raise InputError(f"profile is of {profile.model['name']} (config {profile.model['config_hash']}), "
                             f"the store of {self.model['name']} (config {self.model['config_hash']}); "
                             "profile the store's model")
        info = profile.check_scorer(self.scorer)
        if info != self.profile.scorers[self.scorer]:
            raise InputError(f"scorer {self.scorer!r} has parameters {info['params']} in the profile but "
                             f"{self.profile.scorers[self.scorer]['params']} in the store; "
                             "profile with the same scorer")
        clashes = sorted(set(profile.domains) & set(self.profile.domains))
        if clashes:
            raise InputError(f"domain {', '.join(clashes)} is already in the store; rename it in the new profile")
        _check_same_domains(list(profile.domains), list(patterns))
        if self.detector is not None:
            if ids is None:
                raise InputError("this store has novelty tables; give the new domains' calibration token ids")
            _check_same_domains(list(profile.domains), list(ids))
            self.detector.add(ids)
        if self.lms is not None:
            if ids is None:
                raise InputError("this store has token models; give the new domains' calibration token ids")
            _check_same_domains(list(profile.domains), list(ids))
            self.lms.add(ids)
        thresholds = self.matcher.thresholds
        self.profile = self.profile.merge(_one_scorer(profile, self.scorer))
        self.matcher = fit_matcher(self.matcher.params, {**self.matcher.bank, **patterns})
        self.matcher.thresholds = thresholds
        return self

    # ------------------------------------------------------------------ files

    def save(self, out: str | Path, force: bool = False) -> Path:
        tensors = dict(self.matcher.tensors())
        tensors.update(self.detector.tensors() if self.detector is not None else {})
        tensors.update(self.lms.tensors() if self.lms is not None else {})
        for domain, stats in self.profile.domains.items():
            tensors[f"{domain}/sums"] = stats.sums[self.scorer].contiguous()
            tensors[f"{domain}/routed"] = stats.routed.contiguous()
        p = self.profile
        manifest = {
            "format": FORMAT, "premoe_version": __version__, "model": p.model, "family": p.family,
            "scorer": self.scorer, "scorer_info": p.scorers[self.scorer], "moe_layers": p.moe_layers,
            "num_experts": p.num_experts, "top_k": p.top_k,
            "domains": {d: {"tokens": s.tokens, "origin": p.data.get(d, "")} for d, s in p.domains.items()},
            "matcher": self.matcher.manifest(), "calibration": self.calibration,
            "novelty": self.detector.manifest() if self.detector is not None else {"params": {"method": "nearest"}},
            "ngram": self.lms.manifest() if self.lms is not None else {"params": asdict(NgramParams(use=False))},
            "profile_params": p.params,
            "architecture": p.architecture,
        }
        return save_artefact(out, "store.json", manifest, "patterns.safetensors", tensors, force=force)

    @classmethod
    def load(cls, path: str | Path) -> "Store":
        rebuild = f"premoe store build MODEL --profile P --data D --out {path}"
        m, tensors = load_artefact(path, "store.json", FORMAT, "patterns.safetensors", rebuild)
        try:
            return cls._from_manifest(m, tensors)
        except PremoeError as e:
            raise InputError(f"{path}/store.json: {e}; rebuild it with `{rebuild}`") from e
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:  # a hand-edited or damaged manifest
            raise InputError(f"{path}/store.json is damaged ({type(e).__name__}: {str(e)[:120]}); rebuild it with "
                             f"`{rebuild}`") from e

    @classmethod
    def _from_manifest(cls, m: dict, tensors: dict) -> "Store":
        _check_used_later(m)
        scorer = m["scorer"]
        domains = {d: DomainStats(info["tokens"], {scorer: tensors[f"{d}/sums"]}, tensors[f"{d}/routed"])
                   for d, info in m["domains"].items()}
        profile = Profile(m["model"], m["family"], m["moe_layers"], m["num_experts"], m["top_k"],
                          {scorer: m["scorer_info"]}, domains, m["profile_params"],
                          {d: info["origin"] for d, info in m["domains"].items()},
                          architecture=m.get("architecture") or {})
        lms = TokenLMs.load(m["ngram"], tensors) if m["ngram"]["params"]["use"] else None
        novelty = m["novelty"]
        detector = None if novelty["params"]["method"] == "nearest" else Detector.load(novelty, tensors, lms)
        return cls(profile, scorer, Matcher.load(m["matcher"], tensors), m["calibration"], detector, lms)


def _one_scorer(profile: Profile, scorer: str) -> Profile:
    """``profile`` restricted to one scorer (a store needs only the one that ranks)."""
    info = profile.check_scorer(scorer)
    domains = {d: DomainStats(s.tokens, {scorer: s.sums[scorer]}, s.routed) for d, s in profile.domains.items()}
    for name in domains:
        if name == GENERALIST or "/" in name:
            raise InputError(f"domain name {name!r} cannot be stored: '{GENERALIST}' is reserved and '/' is "
                             "not allowed")
    return Profile(profile.model, profile.family, profile.moe_layers, profile.num_experts, profile.top_k,
                   {scorer: info}, domains, profile.params, profile.data, profile.timing, profile.architecture)


def _check_used_later(m: dict) -> None:
    """The manifest fields only later commands read (query: model; add: calibration amounts), checked on load."""
    model, calibration = m["model"], m["calibration"]
    if not (isinstance(model, dict) and all(isinstance(model.get(k), str) for k in ("name", "path", "config_hash"))):
        raise InputError("'model' must hold string name, path and config_hash")
    amounts = calibration.get("amounts", {}) if isinstance(calibration, dict) else None
    fields = PatternData.__dataclass_fields__
    if not (isinstance(amounts, dict) and all(k in fields and type(v) is int and v >= 1 for k, v in amounts.items())):
        raise InputError(f"'calibration' must be an object whose 'amounts' map {', '.join(fields)} to positive "
                         f"integers, got {amounts if isinstance(calibration, dict) else calibration!r:.80}")


def _check_same_domains(ranked: list[str], patterned: list[str]) -> None:
    if sorted(ranked) != sorted(patterned):
        raise InputError(f"the profile has domains {', '.join(ranked)} but the calibration text names "
                         f"{', '.join(patterned)}; give text (--data NAME=PATH) for exactly the profiled domains")


def calibration_ids(tokenizer, sources: Sequence[Source], max_tokens: int) -> dict[str, torch.Tensor]:
    """{domain: (tokens,)} ids of each source's documents joined by EOS, at most ``max_tokens`` (novelty tables)."""
    return {s.name: token_windows(s.texts, tokenizer, max_tokens, max_tokens).reshape(-1) for s in sources}


def read_patterns(reader: PatternReader, tokenizer, sources: Sequence[Source], lengths: Sequence[int],
                  max_tokens: int, batch_size: int = 16, prefixes: bool = False) -> dict[str, dict[int, torch.Tensor]]:
    """{domain: {T: (n, features)}} patterns of each source's windows of max(lengths) tokens.

    Calibration (``prefixes=False``) takes every chunk of T tokens; held-out
    text (``prefixes=True``) only each window's first T tokens, as a request
    of T tokens would be.
    """
    seq = max(lengths)
    out = {}
    for source in sources:
        windows = token_windows(source.texts, tokenizer, seq, max_tokens)  # (n, seq)
        tokens = torch.cat([reader.tokens(windows[i: i + batch_size])
                            for i in range(0, len(windows), batch_size)])  # (n, seq, F)
        out[source.name] = (prefix_means(tokens, lengths) if prefixes
                            else {t: chunk_means(tokens, t) for t in lengths if t <= tokens.shape[1]})
    return out


def build_store(model, profile: Profile, data: Sequence[Source], held_out: Sequence[Source] | None = None,
                scorer: str = DEFAULT_RANKING, match: MatchParams | None = None, amounts: PatternData | None = None,
                loaded=None, novelty: NoveltyParams | None = None, ngram: NgramParams | None = None) -> Store:
    """A store of ``profile``'s domains matched on patterns of ``data``; ``held_out`` text sets the fallback.

    ``model`` is the checkpoint (path or ``testbed``) the profile was made
    from; ``data`` is calibration text per profiled domain (use the split the
    profile used), ``held_out`` other text of the same domains (the val
    split): without it retrieval never falls back. ``scorer`` ranks the
    experts a retrieved domain keeps; ``novelty`` says what decides a
    fallback (default: ``joint``, :mod:`premoe.novelty`); ``ngram`` the token
    models the classifier adds to the matcher (:mod:`premoe.ngram`). ``loaded`` is
    an optional ``(model, tokenizer)`` already in memory.

    >>> store = build_store("testbed", Profile.load("prof"), parse_sources(["testbed"]),
    ...                     parse_sources(["testbed"], split="val"))
    >>> store.matcher.params.method, store.fallback_method, store.fallback_threshold(64)
    ('lda', 'joint', 7.75)
    """
    from premoe.adapters import get_adapter
    from premoe.modeling import load_model, load_tokenizer, model_identity

    match, amounts = (match or MatchParams()).check(), amounts or PatternData()
    novelty, ngram = (novelty or NoveltyParams()).check(), (ngram or NgramParams()).check()
    if novelty.method in TOKEN_MODEL_METHODS and not ngram.use:
        raise InputError(f"the {novelty.method!r} fallback score needs the token models; build with them "
                         "(NgramParams(use=True)) or choose the 'ngram' or 'nearest' fallback score")
    identity = model_identity(model)
    if identity["config_hash"] != profile.model["config_hash"]:
        raise InputError(f"the profile was made from {profile.model['name']}, not {identity['name']} "
                         "(different config); profile this model first")
    ranked = _one_scorer(profile, scorer)
    _check_same_domains(list(profile.domains), [s.name for s in data])
    net, tokenizer = loaded or (load_model(model), load_tokenizer(model))
    reader = PatternReader(net, get_adapter(net.config), match.feature, match.layers)
    bank = read_patterns(reader, tokenizer, data, match.lengths, amounts.tokens, amounts.batch_size)
    vocab = _vocab(net, tokenizer)
    tokenised: dict[int, dict[str, torch.Tensor]] = {}  # max tokens -> calibration ids: each text tokenised once

    def ids(max_tokens: int) -> dict[str, torch.Tensor]:
        if max_tokens not in tokenised:
            tokenised[max_tokens] = calibration_ids(tokenizer, data, max_tokens)
        return tokenised[max_tokens]

    lms = fit_lms(ngram, ids(ngram.max_tokens), vocab) if ngram.use else None
    reads_ids = novelty.method == "ngram" or novelty.uses_bytes
    detector = None if novelty.method == "nearest" else fit_detector(
        novelty, ids(novelty.max_tokens) if reads_ids else {},
        vocab, match.lengths, lms, token_bytes(tokenizer, vocab) if novelty.uses_bytes else None)
    store = Store(ranked, scorer, fit_matcher(match, bank),
                  {"data": {s.name: s.origin for s in data}, "amounts": asdict(amounts)}, detector, lms)
    if held_out:
        calibrate_store(store, reader, tokenizer, held_out, amounts)
    return store


def calibrate_store(store: Store, reader: PatternReader, tokenizer, held_out: Sequence[Source],
                    amounts: PatternData | None = None) -> Store:
    """Set the store's per-length fallback thresholds from held-out text of its domains (request prefixes)."""
    amounts = amounts or PatternData()
    usable = [s for s in held_out if s.name in store.domains]
    if not usable:
        raise InputError(f"no held-out data names a stored domain ({', '.join(store.domains)}); "
                         "name held-out data after the domains, e.g. --held-out python=val.jsonl")
    patterns = read_patterns(reader, tokenizer, usable, store.matcher.params.lengths, amounts.held_out_tokens,
                             amounts.batch_size, prefixes=True)
    seen = calibrate(store.matcher, patterns)
    if store.detector is not None:  # all held-out text up to max_tokens, not held_out_tokens: cheap (ids, layer 1)
        lengths = store.matcher.params.lengths
        windows = {s.name: token_windows(s.texts, tokenizer, max(lengths),
                                         store.detector.params.max_tokens) for s in usable}  # (n, seq) each
        scores, features = None, 0
        if store.detector.reads_patterns:  # the same windows' prefix patterns, scored by the matcher
            prefixes = read_patterns(reader, tokenizer, usable, lengths, store.detector.params.max_tokens,
                                     amounts.batch_size, prefixes=True)  # {domain: {T: (n, F)}}
            scores = {d: {t: store.novelty_order(store.matcher.scores(p, t)) for t, p in by_t.items()}
                      for d, by_t in prefixes.items()}
            features = next(p.shape[1] for by_t in prefixes.values() for p in by_t.values())
        seen["novelty_requests_per_length"] = calibrate_detector(store.detector, windows, store.matcher.params.quantile,
                                                                 scores, features)
    store.calibration = {**store.calibration, "held_out": {s.name: s.origin for s in usable}, **seen}
    return store


def _vocab(model, tokenizer) -> int:
    """Token ids are below this: the larger of the model's embedding rows and the tokenizer's size."""
    return max(int(getattr(model.config, "vocab_size", 0) or 0), len(tokenizer))
