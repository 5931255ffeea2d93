"""How well task-adaptive expert retrieval works: which matcher, accuracy, fallback, and what it serves.

Run (from the repository root; ~5 min on 1 CPU thread)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_retrieval.py --store runs/store \\
        --json docs/results/retrieval.json --roc docs/results/retrieval_roc.png | tee docs/results/retrieval.txt
    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_retrieval.py --quick        # tiny random model, seconds
    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_retrieval.py --store runs/store --skip selection perplexity mixed

Splits: the store's matcher is fit on the **calib** split, thresholds and
every choice below are made on the **val** split, and every number reported
as a result is on the **test** split (never used to build or choose) and on
unseen domains (c_headers, es and the texts in tests/data/unseen).

1. **selection** (val; test beside it): every matcher method x pattern
   feature, fit on the same calib windows; accuracy per domain at
   T = 16, 64, 256 request tokens; the cost of each feature as a fraction of
   a full forward. The rule: highest minimum-over-domains accuracy at T = 64
   on val, then the highest val mean at 64. The store's default should be
   the winner; the script says so if it is not.
2. **accuracy** of the default store on test: per domain and T, with the
   fallback rate (fallbacks count as misses); the misses' text is listed.
3. **unseen**: (3a, val only) which fallback score: the matcher's nearest
   score, k-NN distance, unigram log-likelihood, n-gram novelty, the token
   models' NLL (``kn``, ``joint``), with and without the byte n-gram models
   (premoe.bytelm) and at several weights, each judged
   by the fallback of foreign val requests (each domain left out in turn +
   the unseen domains' val splits) at the val threshold; then on test, the
   store's fallback rate per unseen source and T, and the ROC curve of its
   fallback score, in-domain test vs unseen, with the operating point the
   val-calibrated thresholds give.
4. **perplexity** of what retrieval serves (M experts per layer, the store's
   ranking scorer): each test window (256 tokens) is scored by the full
   model, its own domain's specialist and the experts retrieved from its
   first ``--prompt-tokens`` tokens, split by whether retrieval was right.
   Specialists are applied by forced routing (``adapter.restrict_routing``),
   which tests/test_bank.py shows equals the swapped bank and the compiled
   checkpoint.
5. **mixed** requests (half python code, half prose): the served perplexity
   of each rule (whole-request match, halves rule) against both specialists
   and the generalist; and what the halves rule costs on in-domain requests.
6. **conversation**: how often consecutive same-topic requests retrieve a
   different domain (each such turn pays a swap).

Perplexity is exp(mean over windows of the window's mean token NLL) ± the
window standard error of the mean NLL.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import time
from collections import Counter

import torch

import taer_setup

METHOD_GRID = [("centroid", {}), ("knn", {}), ("diagonal", {}), ("lda", {"shrinkage": 0.1}),
               ("lda", {"shrinkage": 0.01}), ("logistic", {})]
OOD_GRID = [("nearest", {}), ("knn", {"k": 10}), ("unigram", {"alpha": 0.1}), ("ngram", {"unigram_weight": 0.0}),
            ("ngram", {"unigram_weight": 0.5}), ("ngram", {"unigram_weight": 1.0}),
            *[("kn", {"margin_weight": m, "byte_weight": 0.0}) for m in (0.0, 0.5, 1.0)],
            *[("joint", {"pattern_weight": b, "margin_weight": m, "byte_weight": 0.0}) for b in (0.5, 1.0, 2.0)
              for m in (0.0, 0.5)],
            ("kn_domain_z", {}), ("kn_domain_threshold", {}), ("kn+pattern_z", {"weight": 0.5}),
            ("kn+pattern_z", {"weight": 1.0}),  # joint: premoe.novelty; these four are tried here only
            ("bytes", {"order": 5}), ("bytes", {"order": 4}),  # the byte models' lowest NLL alone (premoe.bytelm)
            ("kn", {"margin_weight": 0.5, "byte_weight": 2.0}),
            *[("joint", {"pattern_weight": 0.5, "margin_weight": 0.0, "byte_weight": w}) for w in (1.0, 2.0, 4.0)],
            ("joint", {"pattern_weight": 0.5, "margin_weight": 0.0, "byte_weight": 2.0, "byte_order": 4})]
SECTIONS = ("selection", "perplexity", "mixed")  # the slow ones --skip can leave out
FEATURE_GRID = [("router_input", 1), ("router_logits", 1), ("router_mass", 1), ("tcess", 1), ("router_logits", 2)]
COMBINED = ("lda", {"shrinkage": 0.01})  # the matcher rows also tried with the token models (premoe.ngram.combine)
COMBINED_FEATURES = ("router_input", "router_logits")
BETA_GRID = [0.0, 0.5, 1.0, 2.0, 4.0]  # pattern weights; 0 = the token models alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    taer_setup.add_arguments(parser)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256], help="request lengths T")
    parser.add_argument("--windows", type=int, default=64, help="val/test windows per domain")
    parser.add_argument("--seq-len", type=int, default=256, help="window length")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens retrieval sees before serving")
    parser.add_argument("--json", type=str, help="write the results here")
    parser.add_argument("--roc", type=str, help="write the ROC plot (png) here")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="leave these slow sections out")
    args = parser.parse_args()
    taer_setup.quick_defaults(args, parser, {"tokens": [8, 16, 32], "windows": 12, "seq_len": 32, "prompt_tokens": 16})
    if args.prompt_tokens not in args.tokens:  # the matcher is chosen at T = --prompt-tokens (a KeyError later)
        parser.error(f"--prompt-tokens {args.prompt_tokens} must be one of --tokens {args.tokens}")

    started = time.time()
    torch.manual_seed(0)
    s = taer_setup.setup(args)
    from premoe.adapters import get_adapter
    from premoe.modeling import load_model, load_tokenizer
    from premoe.retrieval import Retriever

    model, tokenizer = load_model(s.model), load_tokenizer(s.model)
    adapter = get_adapter(model.config)
    store = s.store
    retriever = Retriever(model, adapter, store, tokenizer)
    own = {u.name for u in s.unseen if not u.origin.startswith("testbed:")}
    windows = {split: {src.name: _windows(src, tokenizer, args.seq_len, args.windows)
                       for src in sources} for split, sources in (("val", s.val), ("test", [*s.test, *s.unseen]))}
    results = {"model": str(s.model), "domains": store.domains, "unseen": [u.name for u in s.unseen],
               "experts": s.experts, "store": {"matcher": store.matcher.manifest(), "ranking_scorer": store.scorer,
                                               "fallback": store.fallback_method,
                                               "novelty": store.detector.manifest() if store.detector else None,
                                               "ngram": store.lms.manifest() if store.lms else None,
                                               "calibration": store.calibration},
               "splits": {"fit": "calib", "choose + thresholds": "val", "report": "test + unseen"}}
    results["selection"] = selection(model, adapter, tokenizer, s, windows, args) if "selection" not in args.skip else None
    tokens = {split: {n: retriever.reader.tokens(w) for n, w in ws.items()} for split, ws in windows.items()}
    results["fallback_selection"] = fallback_selection(retriever, s, tokenizer, windows["val"], args)
    results["accuracy"] = accuracy(retriever, tokens["test"], s, args.tokens, tokenizer, windows["test"], own)
    results["unseen_fallback"] = unseen(retriever, s, tokenizer, args, own)
    results["roc"] = roc(retriever, tokens["test"], windows["test"], s, args, results["unseen_fallback"], own)
    results["perplexity"] = perplexity(retriever, windows["test"], s, args) if "perplexity" not in args.skip else None
    results["mixed"] = mixed(retriever, tokens["test"], windows["test"], s, args) if "mixed" not in args.skip else None
    results["conversation"] = conversation(retriever, tokens["test"], windows["test"], s, args.prompt_tokens)
    results["seconds"] = round(time.time() - started, 1)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print_results(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _windows(source, tokenizer, seq_len: int, count: int) -> torch.Tensor:
    from premoe.data import token_windows

    return token_windows(source.texts, tokenizer, seq_len, seq_len * count)  # (n, seq)


# --------------------------------------------------------------------------- 1. selection


def selection(model, adapter, tokenizer, s, windows: dict, args) -> dict:
    """Every method x feature fit on the calib split, and the LDA rows combined with the token models at each
    pattern weight of BETA_GRID; accuracy on val (every val window) and test prefixes; feature cost."""
    from premoe.data import token_windows
    from premoe.matchers import MatchParams, fit_matcher
    from premoe.ngram import NgramParams, combine, fit_lms
    from premoe.patterns import PatternReader, chunk_means, prefix_means
    from premoe.store import PatternData, _vocab, calibration_ids

    params = s.store.matcher.params
    lengths = params.lengths
    rows, costs = [], {}
    amounts = PatternData(**s.store.calibration.get("amounts", {}))
    lms = fit_lms(NgramParams(), calibration_ids(tokenizer, s.calib, NgramParams().max_tokens), _vocab(model, tokenizer))
    windows = {"val": {src.name: token_windows(src.texts, tokenizer, args.seq_len, None) for src in s.val},
               "test": windows["test"]}
    for feature, layers in FEATURE_GRID if not args.quick else [("router_input", 1), ("router_mass", 1)]:
        reader = PatternReader(model, adapter, feature, layers)
        calib = {src.name: reader.tokens(_windows(src, tokenizer, max(lengths), amounts.tokens // max(lengths)))
                 for src in s.calib}
        bank = {d: {t: chunk_means(x, t) for t in lengths if t <= x.shape[1]} for d, x in calib.items()}
        held = {split: {d: (prefix_means(reader.tokens(w), args.tokens), w) for d, w in ws.items() if d in bank}
                for split, ws in windows.items()}
        costs[f"{feature}@{layers}"] = _cost(model, reader, windows["test"][s.store.domains[0]][:1])
        for method, extra in METHOD_GRID:
            matcher = fit_matcher(MatchParams(method=method, feature=feature, layers=layers, lengths=lengths, **extra),
                                  bank)
            combos = [None, *BETA_GRID] if (method, extra) == COMBINED and feature in COMBINED_FEATURES else [None]
            for beta in combos:
                score = (lambda p, w, t, m=matcher: m.scores(p, t)) if beta is None else (
                    lambda p, w, t, m=matcher, b=beta: combine(lms.nll(w[:, :t]), m.scores(p, t), t, p.shape[1], b))
                row = {"method": method, **extra, "feature": feature, "layers": layers, "pattern_weight": beta}
                for split, by_domain in held.items():
                    row[split] = {t: {d: round(float((score(p[t], w, t).argmin(1) == matcher.domains.index(d))
                                                     .double().mean()), 4) for d, (p, w) in by_domain.items() if t in p}
                                  for t in args.tokens}
                rows.append(row)
    key = lambda r: (min(r["val"][args.prompt_tokens].values()),  # noqa: E731
                     statistics.mean(r["val"][args.prompt_tokens].values()))
    best = max(rows, key=key)
    default = {"method": params.method, "feature": params.feature, "layers": params.layers,
               "pattern_weight": s.store.lms.params.pattern_weight if s.store.lms is not None else None}
    is_default = all(best[k] == v for k, v in default.items()) and (
        params.method != "lda" or best.get("shrinkage") == params.shrinkage)
    return {"rule": f"max over methods of (min over domains, then mean) val accuracy at T = {args.prompt_tokens}",
            "rows": rows, "best": {k: v for k, v in best.items() if k not in ("val", "test")},
            "default_is_best": is_default, "cost_vs_forward": costs,
            "val_windows": {d: len(w) for d, w in windows["val"].items()}}


@torch.no_grad()
def _cost(model, reader, ids: torch.Tensor, rounds: int = 9) -> float:
    """Median over alternating rounds of (pattern read time / full forward time) on the same tokens."""
    ratios = []
    for round_ in range(rounds + 1):
        times = {}
        for side in (("read", "forward") if round_ % 2 else ("forward", "read")):
            start = time.perf_counter()
            reader.tokens(ids) if side == "read" else model(input_ids=ids, use_cache=False)
            times[side] = time.perf_counter() - start
        if round_:
            ratios.append(times["read"] / times["forward"])
    return round(statistics.median(ratios), 4)


# --------------------------------------------------------------------------- 3a. which fallback score (val)


def fallback_selection(retriever, s, tokenizer, windows: dict, args) -> dict:
    """Candidate fallback scores, chosen on val only: fallback of foreign val requests at the val-set threshold.

    Each candidate is fit on the calib split of the stored domains; its
    threshold per T is the store's quantile of in-domain val requests'
    scores, over all of the val split (as the store calibrates novelty), not
    only the ``--windows`` windows. Foreign requests: each stored domain in turn, left out of the fit
    and the threshold (leave-one-domain-out), and the val splits of the
    unseen testbed domains. Rule: the highest mean fallback over those
    foreign sets at T = ``--prompt-tokens``.
    """
    from premoe.bytelm import fit_byte_lms, token_bytes
    from premoe.data import parse_sources
    from premoe.novelty import NoveltyParams
    from premoe.store import _vocab, calibration_ids

    store, q = s.store, s.store.matcher.params.quantile
    ids = calibration_ids(tokenizer, s.calib, NoveltyParams().max_tokens)
    vocab = _vocab(retriever.model, tokenizer)
    foreign_val = [u.origin.removeprefix("testbed:").replace(":test", ":val") for u in s.unseen
                   if u.origin.startswith("testbed:") and u.origin.endswith(":test")]
    val = {}
    for src in [*s.val, *(parse_sources(foreign_val, tokenizer) if foreign_val else [])]:
        w = _windows(src, tokenizer, args.seq_len, NoveltyParams().max_tokens // args.seq_len)  # (n, seq)
        val[src.name] = (w, torch.cat([retriever.reader.tokens(w[i: i + 16]) for i in range(0, len(w), 16)]))
    table = token_bytes(tokenizer, vocab)
    byte_lms = {order: fit_byte_lms(ids, table, order) for order in (4, 5)}  # every stored domain, one column each
    byte_nll = {(order, d, length): lms.nll(w[:, :length]) for order, lms in byte_lms.items()
                for d, (w, x) in val.items() for length in args.tokens if w.shape[1] >= length}  # (n, D) each
    rows = []
    for method, extra in OOD_GRID:
        row = {"method": method, **extra, "val": {}}
        order = extra.get("byte_order", extra.get("order", 5))
        for length in args.tokens:
            req = {d: (w[:, :length], x[:, :length].mean(1), byte_nll[order, d, length])
                   for d, (w, x) in val.items() if w.shape[1] >= length}
            cell = {}
            for left_out in [None, *store.domains]:
                fitted = [d for d in store.domains if d != left_out]
                columns = [store.domains.index(d) for d in fitted]  # byte_lms were fit in store.domains order
                score = _with_bytes(_candidate(method, extra, store, {d: ids[d] for d in fitted}, vocab,
                                               {d: req[d][:2] for d in fitted}, length),
                                   1.0 if method == "bytes" else extra.get("byte_weight", 0.0), columns)
                threshold = torch.cat([score(*req[d], length) for d in fitted]).quantile(q)
                targets = [left_out] if left_out else [d for d in req if d not in store.domains]
                for d in targets:
                    key = f"left out {d}" if left_out else d
                    cell[key] = round(float((score(*req[d], length) > threshold).double().mean()), 4)
                if left_out is None:
                    cell["in-domain"] = round(float(torch.cat([score(*req[d], length) > threshold
                                                                for d in fitted]).double().mean()), 4)
            cell["foreign mean"] = round(statistics.mean(v for k, v in cell.items() if k != "in-domain"), 4)
            row["val"][length] = cell
        rows.append(row)
    best = max(rows, key=lambda r: r["val"][args.prompt_tokens]["foreign mean"])
    params = store.detector.params if store.detector is not None else None
    chosen = {"method": store.fallback_method, **({"unigram_weight": params.unigram_weight}
                                                  if store.fallback_method == "ngram" else {}),
              **({"margin_weight": params.margin_weight} if store.fallback_method in ("kn", "joint") else {}),
              **({"pattern_weight": params.pattern_weight} if store.fallback_method == "joint" else {}),
              **({"byte_weight": params.byte_weight} if store.fallback_method in ("kn", "joint") else {}),
              **({"byte_order": params.byte_order} if params is not None and params.byte_order != 5 else {})}
    return {"rule": f"max mean fallback of foreign val requests (leave-one-domain-out + unseen val) at T = "
                    f"{args.prompt_tokens}, threshold = {q} quantile of in-domain val", "rows": rows,
            "best": {k: v for k, v in best.items() if k != "val"},
            "store_is_best": {k: v for k, v in best.items() if k != "val"} == chosen,
            "cost_vs_forward": _novelty_cost(retriever, windows[store.domains[0]][:1, :args.prompt_tokens]),
            "cost_tokens": args.prompt_tokens}


def _with_bytes(score, weight: float, columns: list[int]):
    """score(ids, patterns, byte NLL (n, all stored domains), T): ``score`` plus ``weight`` times the lowest
    byte NLL over the fitted domains' ``columns`` (as premoe.novelty adds it); the ``bytes`` rows are that alone."""
    return lambda w, p, b, t: score(w, p, t) + (weight * b[:, columns].min(1).values if weight else 0.0)


def _candidate(method: str, extra: dict, store, ids: dict, vocab: int, held: dict, length: int):
    """score(ids (n, T), patterns (n, F), T) -> (n,) of one candidate fallback score fit on ``ids``' domains;
    the per-domain candidates also read ``held``, the fitted domains' in-domain val requests at ``length``
    tokens ({domain: (ids (n, T), patterns (n, F))}), never the foreign ones."""
    from premoe.matchers import fit_matcher
    from premoe.ngram import NgramParams, fit_lms
    from premoe.novelty import NoveltyParams, fit_detector

    domains = list(ids)
    lengths = store.matcher.params.lengths
    extra = {k: v for k, v in extra.items() if k not in ("byte_weight", "byte_order")}  # added by _with_bytes
    if method == "bytes":
        return lambda w, p, t: 0.0
    if method == "ngram":
        detector = fit_detector(NoveltyParams(method="ngram", **extra), ids, vocab, lengths)
        return lambda w, p, t: detector.score(w)
    if method == "kn":  # lowest per-token NLL under the domains' Kneser-Ney bigrams, less a weighted margin
        detector = fit_detector(NoveltyParams(method="kn", byte_weight=0.0, **extra), {}, vocab, lengths,
                                fit_lms(NgramParams(), ids, vocab))
        return lambda w, p, t: detector.score(w)
    if method in ("joint", "kn_domain_z", "kn_domain_threshold", "kn+pattern_z"):
        lms = fit_lms(NgramParams(), ids, vocab)
        matcher = fit_matcher(store.matcher.params, {d: store.matcher.bank[d] for d in domains})
        if method == "joint":  # kn's rule on the classifier's joint score (premoe.novelty)
            detector = fit_detector(NoveltyParams(method="joint", byte_weight=0.0, **extra), {}, vocab, lengths, lms)
            return lambda w, p, t: detector.score(w, matcher.scores(p, t), p.shape[1])
        return _per_domain_candidate(method, extra, lms, matcher, held, length)
    if method == "unigram":  # per-domain add-alpha unigram; score = -max over domains of mean log-prob per token
        counts = torch.stack([torch.bincount(ids[d], minlength=vocab).double() + extra["alpha"] for d in domains])
        logp = (counts / counts.sum(1, keepdim=True)).log()  # (D, vocab)
        return lambda w, p, t: -logp[:, w].mean(-1).max(0).values
    matcher = fit_matcher(store.matcher.params, {d: store.matcher.bank[d] for d in domains})
    if method == "nearest":
        return lambda w, p, t: matcher.scores(p, t).min(1).values
    bank = {t: torch.cat([store.matcher.bank[d][t] for d in domains]).double() for t in store.matcher.params.lengths}

    def knn(w, p, t):  # k-th nearest calibration pattern of any domain, standardised features, cosine distance
        x = bank[matcher.bucket(t)]  # (N, F)
        shift, scale = x.mean(0), x.std(0) + 1e-6
        unit = lambda v: torch.nn.functional.normalize((v.double() - shift) / scale, dim=-1)  # noqa: E731
        return (1 - unit(p) @ unit(x).T).topk(extra["k"], dim=1, largest=False).values[:, -1]
    return knn


def _per_domain_candidate(method: str, extra: dict, lms, matcher, held: dict, length: int):
    """The per-domain ideas, calibrated on the in-domain val requests ``held`` at ``length`` tokens:
    ``kn_domain_z``: each domain's NLL z-scored by its own requests' NLL under its model, then the lowest;
    ``kn_domain_threshold``: kn (margin 0.5) less the 0.96 quantile of kn over the val requests the classifier
    sends to the same domain (one threshold per predicted domain); ``kn+pattern_z``: kn plus ``weight`` times the
    nearest LDA score, each z-scored over all in-domain val requests."""
    from premoe.ngram import combine

    margin = lambda s, w: s.min(1).values - w * (s.topk(2, dim=1, largest=False).values.diff(dim=1)[:, 0])  # noqa: E731
    nll = {d: lms.nll(w) for d, (w, p) in held.items()}  # {d: (n, D)}
    near = {d: matcher.scores(p, length) for d, (w, p) in held.items()}  # {d: (n, D)}
    if method == "kn_domain_z":
        own = [nll[d][:, i] for i, d in enumerate(held)]
        mean, std = torch.stack([v.mean() for v in own]), torch.stack([v.std() for v in own])  # (D,)
        return lambda w, p, t: ((lms.nll(w) - mean) / std).min(1).values
    if method == "kn_domain_threshold":
        sent = lambda s, x, f: combine(s, x, length, f, lms.params.pattern_weight).argmin(1)  # noqa: E731
        kn = torch.cat([margin(nll[d], 0.5) for d in held])
        to = torch.cat([sent(nll[d], near[d], held[d][1].shape[1]) for d in held])
        cut = torch.stack([kn[to == i].quantile(0.96) if (to == i).sum() > 5 else kn.quantile(0.96)
                           for i in range(len(held))])  # (D,)

        def shifted(w, p, t):
            s = lms.nll(w)  # (n, D)
            return margin(s, 0.5) - cut[sent(s, matcher.scores(p, t), p.shape[1])]
        return shifted
    kn = torch.cat([margin(nll[d], 0.5) for d in held])
    lda = torch.cat([near[d].min(1).values for d in held])
    return lambda w, p, t: ((margin(lms.nll(w), 0.5) - kn.mean()) / kn.std()
                            + extra["weight"] * (matcher.scores(p, t).min(1).values - lda.mean()) / lda.std())


@torch.no_grad()
def _novelty_cost(retriever, ids: torch.Tensor, rounds: int = 9) -> float | None:
    """Median over alternating rounds of (fallback score time / full forward time) on the same request (1, T);
    a ``joint`` score's time includes the matcher scoring the (already read) pattern."""
    store, detector = retriever.store, retriever.store.detector
    if detector is None:
        return None
    pattern = retriever.reader.tokens(ids).mean(1)  # (1, F): retrieval reads it anyway
    score = (lambda: detector.score(ids, store.novelty_order(store.matcher.scores(pattern, ids.shape[1])),
                                    pattern.shape[1])) if detector.reads_patterns else (lambda: detector.score(ids))
    ratios = []
    for round_ in range(rounds + 1):
        times = {}
        for side in (("score", "forward") if round_ % 2 else ("forward", "score")):
            start = time.perf_counter()
            score() if side == "score" else retriever.model(input_ids=ids, use_cache=False)
            times[side] = time.perf_counter() - start
        if round_:
            ratios.append(times["score"] / times["forward"])
    return round(statistics.median(ratios), 4)


# --------------------------------------------------------------------------- 2. accuracy


def accuracy(retriever, tokens: dict, s, lengths, tokenizer, windows: dict, own: set) -> dict:
    """{T: {domain: accuracy, fallback, chosen, misses}} of the default store on test prefixes."""
    out = {}
    for length in lengths:
        rows = {}
        for domain, x in tokens.items():
            if domain not in s.store.domains or x.shape[1] < length:
                continue
            hits = [retriever.decide(w[:length].mean(0), length, ids[:length]) for w, ids in zip(x, windows[domain])]
            wrong = [i for i, h in enumerate(hits) if h.domain != domain]
            rows[domain] = {"windows": len(hits), "accuracy": round(1 - len(wrong) / len(hits), 4),
                            "nearest_accuracy": round(sum(h.nearest == domain for h in hits) / len(hits), 4),
                            "fallback": round(sum(h.fallback for h in hits) / len(hits), 4),
                            "chosen": dict(Counter(h.domain for h in hits).most_common()),
                            "misses": [f"#{i} -> {hits[i].domain}: {tokenizer.decode(windows[domain][i][:length])[:70]!r}"
                                       for i in wrong]}
        out[length] = rows
    return out


# --------------------------------------------------------------------------- 3. unseen + ROC


def _unseen_patterns(retriever, source, tokenizer, length: int, seq_len: int, count: int,
                     own: set) -> tuple[torch.Tensor, torch.Tensor]:
    """((n, F) request patterns, (n, length) their ids) of ``length``-token requests from an unseen source.

    Testbed splits: the first ``length`` tokens of each ``seq_len`` window,
    as for stored domains; the short texts written for this project: every
    consecutive ``length``-token piece (they hold too few full windows).
    """
    from premoe.data import token_windows

    if source.name in own:
        pieces = token_windows(source.texts, tokenizer, length, None)
        pieces = pieces if pieces.shape[1] == length else pieces[:0]
        return (retriever.reader.tokens(pieces).mean(1), pieces) if len(pieces) else (torch.zeros(0, 1), pieces)
    windows = _windows(source, tokenizer, seq_len, count)
    x = retriever.reader.tokens(windows)
    return (x[:, :length].mean(1), windows[:, :length]) if x.shape[1] >= length else (torch.zeros(0, 1), windows[:0])


def unseen(retriever, s, tokenizer, args, own: set) -> dict:
    """{T: {source: fallback rate, requests, chosen, scores}} for every unseen source."""
    out = {}
    for length in args.tokens:
        rows = {}
        for source in s.unseen:
            patterns, ids = _unseen_patterns(retriever, source, tokenizer, length, args.seq_len, args.windows, own)
            if not len(patterns):
                continue
            hits = [retriever.decide(p, length, i) for p, i in zip(patterns, ids)]
            rows[source.name] = {"requests": len(hits), "fallback": round(sum(h.fallback for h in hits) / len(hits), 4),
                                 "chosen": dict(Counter(h.domain for h in hits).most_common()),
                                 "scores": [h.fallback_score for h in hits]}
        if rows:
            rows["all unseen"] = {"requests": sum(r["requests"] for r in rows.values()),
                                  "fallback": round(sum(r["fallback"] * r["requests"] for r in rows.values())
                                                    / sum(r["requests"] for r in rows.values()), 4)}
        out[length] = rows
    return out


def roc(retriever, tokens: dict, windows: dict, s, args, unseen_rows: dict, own: set) -> dict:
    """ROC of the fallback score (in-domain test = negatives, unseen = positives) per T; plot if --roc."""
    out = {}
    curves = {}
    for length in args.tokens:
        neg = [retriever.decide(w[:length].mean(0), length, ids[:length]).fallback_score
               for d, x in tokens.items() if d in s.store.domains and x.shape[1] >= length
               for w, ids in zip(x, windows[d])]
        pos = [v for name, row in unseen_rows[length].items() if name != "all unseen" for v in row["scores"]]
        if not neg or not pos:
            continue
        neg_t, pos_t = torch.tensor(neg), torch.tensor(pos)
        cuts = torch.cat([torch.tensor([float("inf")]), torch.cat([neg_t, pos_t]).sort(descending=True).values])
        fpr = [(neg_t > c).double().mean().item() for c in cuts] + [1.0]
        tpr = [(pos_t > c).double().mean().item() for c in cuts] + [1.0]
        auc = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
        threshold = s.store.fallback_threshold(length)
        point = None if threshold is None else {"threshold": round(threshold, 4),
                                                "in_domain_fallback": round((neg_t > threshold).double().mean().item(), 4),
                                                "unseen_fallback": round((pos_t > threshold).double().mean().item(), 4)}
        tpr_at_5 = max(t for f, t in zip(fpr, tpr) if f <= 0.05)
        out[length] = {"auroc": round(auc, 4), "tpr_at_fpr_0.05": round(tpr_at_5, 4), "operating_point": point,
                       "negatives": len(neg), "positives": len(pos)}
        curves[length] = (fpr, tpr, point)
    if args.roc and curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5))
        for length, (fpr, tpr, point) in curves.items():
            line, = ax.plot(fpr, tpr, label=f"T = {length} (AUROC {out[length]['auroc']:.3f})")
            if point:
                ax.plot([point["in_domain_fallback"]], [point["unseen_fallback"]], "o", color=line.get_color())
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.axvline(0.05, color="grey", lw=0.5)
        ax.axhline(0.9, color="grey", lw=0.5)
        ax.set_xlabel("in-domain test requests falling back (FPR)")
        ax.set_ylabel("unseen-domain requests falling back (TPR)")
        score = (f"nearest-domain {s.store.matcher.params.method} score on {s.store.matcher.params.feature}"
                 if s.store.fallback_method == "nearest" else "lowest per-token Kneser-Ney NLL - w x margin"
                 if s.store.fallback_method == "kn" else "lowest joint (Kneser-Ney + pattern) NLL - w x margin"
                 if s.store.fallback_method == "joint"
                 else f"{s.store.fallback_method} novelty of the request's tokens")
        ax.set_title(f"fallback score ROC: {score}\n"
                     "dots: thresholds calibrated on val; goal region top-left of the grey lines", fontsize=8)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(args.roc, dpi=120)
    return out


# --------------------------------------------------------------------------- 4. perplexity


class _Scorer:
    """Window NLL under the full model or a target's kept experts (forced routing), cached per (window, target)."""

    def __init__(self, retriever, store, experts: int, seq_len: int):
        from premoe.store import GENERALIST

        self.model, self.adapter, self.seq_len = retriever.model, retriever.adapter, seq_len
        self.kept = {t: store.kept(t, experts) for t in [*store.domains, GENERALIST]}
        self.cache: dict = {}

    @torch.no_grad()
    def __call__(self, key, window: torch.Tensor, target: str | None) -> float:
        from premoe.metrics import token_nll

        if (key, target) not in self.cache:
            ids = window[: self.seq_len].unsqueeze(0)  # (1, seq)
            ctx = self.adapter.restrict_routing(self.model, self.kept[target]) if target else contextlib.nullcontext()
            with ctx:
                logits = self.model(input_ids=ids).logits[:, :-1]  # (1, seq-1, vocab)
            self.cache[(key, target)] = float(token_nll(logits, ids[:, 1:]).mean())
        return self.cache[(key, target)]


def _summary(values: list[float]) -> dict:
    from premoe.metrics import mean_and_se

    if not values:
        return {"windows": 0}
    mean, se = mean_and_se(values)
    return {"ppl": round(math.exp(mean), 4), "nll": round(mean, 5), "se": round(se, 5), "windows": len(values)}


def perplexity(retriever, windows: dict, s, args) -> dict:
    """{domain: full, specialist/generalist, retrieval, gap split by right/wrong retrieval}."""
    from premoe.store import GENERALIST

    nll = _Scorer(retriever, s.store, s.experts, args.seq_len)
    out = {}
    for domain, batch in windows.items():
        seen = domain in s.store.domains
        own = domain if seen else GENERALIST
        rows = {"full": [], "own": [], "retrieval": []}
        right, wrong = [], []
        served = Counter()
        for i, window in enumerate(batch):
            hit = retriever.retrieve(window[: args.prompt_tokens])
            served[hit.domain] += 1
            full, mine, got = nll((domain, i), window, None), nll((domain, i), window, own), \
                nll((domain, i), window, hit.domain)
            rows["full"].append(full)
            rows["own"].append(mine)
            rows["retrieval"].append(got)
            (right if hit.domain == own else wrong).append(got - mine)
        row = {k: _summary(v) for k, v in rows.items()}
        row["own_is"] = "specialist" if seen else GENERALIST
        row["served"] = dict(served.most_common())
        row["retrieval_vs_own_pct"] = round(100 * (math.exp(row["retrieval"]["nll"] - row["own"]["nll"]) - 1), 3)
        row["gap_from_wrong_retrievals"] = {"windows": len(wrong),
                                            "mean_nll_delta_per_wrong_window": round(statistics.mean(wrong), 5) if wrong else 0.0,
                                            "right_windows_nll_delta": round(sum(right), 9)}
        out[domain] = row
    return out


# --------------------------------------------------------------------------- 5. mixed, 6. conversation


def mixed(retriever, tokens: dict, windows: dict, s, args) -> dict:
    """Half python code + half prose requests (both orders): each rule's served perplexity; the rules' in-domain cost."""
    from premoe.store import GENERALIST

    code = "python" if "python" in s.store.domains else s.store.domains[0]
    prose = [d for d in s.store.domains if d != code and d != "math"][:4]
    half = args.seq_len // 2
    per = max(1, args.windows // 8)
    nll = _Scorer(retriever, s.store, s.experts, args.seq_len)
    rules = ("whole rule", "halves rule", "tail rule")
    out = {}
    for order in ("code first", "prose first"):
        table = {k: [] for k in ("code specialist", "prose specialist", GENERALIST, *rules)}
        picks = {r: Counter() for r in rules}
        for p in prose:
            for i in range(min(per, len(windows[code]), len(windows[p]))):
                a, b = windows[code][i][:half], windows[p][i][:half]
                window = torch.cat([a, b] if order == "code first" else [b, a])  # (seq,)
                features = retriever.reader.tokens(window.unsqueeze(0))[0]  # (seq, F)
                whole = retriever.decide(features.mean(0), len(window), window)
                first, second = (retriever.decide(part.mean(0), len(part), ids) for part, ids in
                                 ((features[:half], window[:half]), (features[half:], window[half:])))
                chosen = {"whole rule": whole.domain,
                          "halves rule": GENERALIST if whole.fallback or first.nearest != second.nearest else whole.domain,
                          "tail rule": second.domain}
                key = ("mixed", order, p, i)
                table["code specialist"].append(nll(key, window, code))
                table["prose specialist"].append(nll(key, window, p))
                table[GENERALIST].append(nll(key, window, GENERALIST))
                for rule in rules:
                    table[rule].append(nll(key, window, chosen[rule]))
                    picks[rule][chosen[rule]] += 1
        out[order] = {"requests": len(table["whole rule"]), "ppl": {k: _summary(v) for k, v in table.items()},
                      "picks": {k: dict(v.most_common()) for k, v in picks.items()}}
    cost = {}
    for length in sorted({args.prompt_tokens, args.seq_len}):
        flips = tail_wrong = whole_wrong = total = 0
        for domain, x in tokens.items():
            if domain not in s.store.domains or x.shape[1] < length:
                continue
            for w, ids in zip(x, windows[domain]):
                h = length // 2
                one, two = (retriever.decide(part.mean(0), h, i) for part, i in ((w[:h], ids[:h]), (w[h:length], ids[h:length])))
                flips += one.nearest != two.nearest
                tail_wrong += two.domain != domain
                whole_wrong += retriever.decide(w[:length].mean(0), length, ids[:length]).domain != domain
                total += 1
        cost[length] = {"halves_rule_extra_fallback": round(flips / max(total, 1), 4),
                        "whole_rule_served_wrong": round(whole_wrong / max(total, 1), 4),
                        "tail_rule_served_wrong": round(tail_wrong / max(total, 1), 4)}
    return {"code": code, "prose": prose, "orders": out, "in_domain_cost": cost}


def conversation(retriever, tokens: dict, windows: dict, s, length: int) -> dict:
    """Per domain: share of consecutive same-topic requests (test windows) that retrieve a different domain."""
    out = {}
    for domain, x in tokens.items():
        if domain not in s.store.domains or x.shape[1] < length:
            continue
        picks = [retriever.decide(w[:length].mean(0), length, ids[:length]).domain for w, ids in zip(x, windows[domain])]
        out[domain] = round(sum(a != b for a, b in zip(picks, picks[1:])) / max(len(picks) - 1, 1), 4)
    return {"tokens": length, "swap_rate_between_consecutive_turns": out}


# --------------------------------------------------------------------------- printing


def print_results(r: dict) -> None:
    store = r["store"]["matcher"]
    print(f"model {r['model']}, M = {r['experts']}, ranking scorer {r['store']['ranking_scorer']}; matcher "
          f"{store['params']['method']} on {store['params']['feature']} (layers {store['params']['layers']})"
          + (f" + token models (Kneser-Ney bigrams, pattern weight {r['store']['ngram']['params']['pattern_weight']:g})"
             if r["store"].get("ngram") else "") + ", "
          f"fallback score {r['store']['fallback']}, quantile {store['params']['quantile']}; splits {r['splits']}")
    sel = r["selection"] or {"rows": [], "rule": "skipped (--skip selection)", "best": None, "default_is_best": None,
                             "cost_vs_forward": None}
    print(f"\n1. matcher selection ({sel['rule']}); accuracy min / mean over domains, val | test:")
    lengths = list(r["accuracy"])
    for row in sel["rows"]:
        cells = []
        for split in ("val", "test"):
            cells.append(" ".join(f"{min(row[split][t].values()):.2f}/{statistics.mean(row[split][t].values()):.2f}"
                                  for t in lengths))
        extra = (f" s={row['shrinkage']}" if "shrinkage" in row else "") + (
            f" +kn b={row['pattern_weight']:g}" if row.get("pattern_weight") is not None else "")
        print(f"  {row['method'] + extra:<22} {row['feature'] + '@' + str(row['layers']):<16} val {cells[0]} | "
              f"test {cells[1]}")
    print(f"  T = {lengths}; best on val: {sel['best']}; the store's default is the best: {sel['default_is_best']}")
    print(f"  cost of reading the pattern / a full forward: {sel['cost_vs_forward']}")
    print("\n2. default store, test split: served accuracy (fallback = miss) / nearest-domain accuracy "
          "(fallback rate) by request tokens")
    print(f"  {'domain':<12}" + "".join(f"{'T=' + str(t):>22}" for t in lengths))
    for domain in r["domains"]:
        cells = [f"{a['accuracy']:.3f}/{a['nearest_accuracy']:.3f} ({a['fallback']:.2f})"
                 if (a := r["accuracy"][t].get(domain)) else "-" for t in lengths]
        print(f"  {domain:<12}" + "".join(f"{c:>22}" for c in cells))
    t_mid = 64 if 64 in r["accuracy"] else lengths[len(lengths) // 2]
    print(f"  misses at T={t_mid}:")
    for domain in r["domains"]:
        for miss in r["accuracy"][t_mid].get(domain, {}).get("misses", []):
            print(f"    {domain}: {miss}")
    fs = r["fallback_selection"]
    print(f"\n3a. fallback score selection ({fs['rule']}); fallback rate of val requests per T:")
    for row in fs["rows"]:
        name = row["method"] + "".join(f" {k}={v}" for k, v in row.items() if k not in ("method", "val"))
        for t, cell in row["val"].items():
            print(f"  {name:<24} T={t:<4} " + " ".join(f"{k}: {v:.2f}" for k, v in cell.items()))
    print(f"  best on val: {fs['best']}; the store's fallback score is the best: {fs['store_is_best']}; "
          f"its cost / a full forward of {fs['cost_tokens']} tokens: {fs['cost_vs_forward']}")
    print("\n3. unseen sources: fallback rate to the generalist (requests)")
    for name in [*r["unseen"], "all unseen"]:
        cells = [f"{r['unseen_fallback'][t][name]['fallback']:.2f} ({r['unseen_fallback'][t][name]['requests']})"
                 if name in r["unseen_fallback"][t] else "-" for t in lengths]
        print(f"  {name:<12}" + "".join(f"{c:>16}" for c in cells))
    for t, row in r["roc"].items():
        print(f"  ROC T={t}: AUROC {row['auroc']:.3f}, unseen caught at 5% in-domain fallback {row['tpr_at_fpr_0.05']:.2f};"
              f" val-calibrated threshold gives {row['operating_point']}")
    print("\n4. perplexity (test, 256-token windows; retrieval from the first prompt tokens):")
    for domain, row in (r["perplexity"] or {}).items():
        gap = row["gap_from_wrong_retrievals"]
        print(f"  {domain:<12} full {row['full']['ppl']:>9.3f}  {row['own_is']} {row['own']['ppl']:>9.3f}  retrieval "
              f"{row['retrieval']['ppl']:>9.3f} ({row['retrieval_vs_own_pct']:+.2f}%)  wrong {gap['windows']} "
              f"(mean dNLL {gap['mean_nll_delta_per_wrong_window']:+.4f}), right windows dNLL "
              f"{gap['right_windows_nll_delta']:g}  served {row['served']}")
    m = r["mixed"] or {"code": "-", "prose": ["skipped"], "orders": {}, "in_domain_cost": None}
    print(f"\n5. mixed requests (half {m['code']} + half one of {', '.join(m['prose'])}), served ppl per rule:")
    for order, row in m["orders"].items():
        print(f"  {order} ({row['requests']} requests): " + ", ".join(
            f"{name} {v['ppl']:.2f}" for name, v in row["ppl"].items()))
        print(f"    picks: {row['picks']}")
    print(f"  in-domain test requests, by T: {m['in_domain_cost']}")
    print(f"\n6. conversation: share of consecutive same-topic turns that re-retrieve another domain "
          f"(T={r['conversation']['tokens']}): {r['conversation']['swap_rate_between_consecutive_turns']}")
    print(f"\n{r['seconds']} s, peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
