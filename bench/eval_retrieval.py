"""How well task-adaptive expert retrieval works: accuracy, fallback, and the perplexity of what it serves.

Run (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_retrieval.py --store stores/testbed --json bench/results/taer.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_retrieval.py --quick        # tiny random model, seconds

Measures, on the test split of every stored domain (never used for the
patterns or the threshold) and on unseen domains:

1. **accuracy vs request length**: each test window's first T tokens
   (T = 16, 64, 256) retrieve a domain; accuracy = the window's own domain
   (fallbacks count as misses), with the fallback rate beside it;
2. **fallback rate on unseen domains** at the same T (high is right: the
   store has no pattern for them);
3. **perplexity of what retrieval serves**: each window is scored by the full
   model, by its own domain's specialist (M experts per layer) and by the
   experts retrieval picks from the window's first ``--prompt-tokens``
   tokens (the generalist on fallback); unseen domains also by the
   generalist. Specialists are applied by forced routing
   (``adapter.restrict_routing``), which tests/test_bank.py shows equals the
   swapped bank and the compiled checkpoint.

Perplexity is exp(mean over windows of the window's mean token NLL), with the
window standard error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import time
from collections import Counter

import torch

import taer_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    taer_setup.add_arguments(parser)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256], help="request lengths T")
    parser.add_argument("--windows", type=int, default=64, help="test windows per domain")
    parser.add_argument("--seq-len", type=int, default=256, help="window length for perplexity")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens retrieval sees before serving")
    parser.add_argument("--metric", choices=["l2", "cosine"], default="l2")
    parser.add_argument("--json", type=str, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.windows, args.seq_len, args.prompt_tokens = [8, 16, 32], 12, 48, 16

    started = time.time()
    s = taer_setup.setup(args)
    from premoe.adapters import get_adapter
    from premoe.data import token_windows
    from premoe.modeling import load_model, load_tokenizer
    from premoe.retrieval import Retriever

    model, tokenizer = load_model(s.model), load_tokenizer(s.model)
    retriever = Retriever(model, get_adapter(model.config), s.store, tokenizer, metric=args.metric)
    longest = max(max(args.tokens), args.seq_len)
    windows = {src.name: token_windows(src.texts, tokenizer, longest, longest * args.windows)
               for src in [*s.test, *s.unseen]}
    results = {"model": str(s.model), "domains": s.store.domains, "unseen": [u.name for u in s.unseen],
               "experts": s.experts, "metric": args.metric, "threshold": s.store.threshold,
               "accuracy": accuracy(retriever, windows, s, args.tokens),
               "perplexity": perplexity(retriever, windows, s, args)}
    results["seconds"] = round(time.time() - started, 1)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print_results(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def accuracy(retriever, windows: dict, s, lengths: list[int]) -> dict:
    """{T: {domain: {accuracy, fallback, confusion}}} for stored and unseen domains."""
    out = {}
    for length in lengths:
        rows = {}
        for domain, batch in windows.items():
            if batch.shape[1] < length:
                continue
            hits = [retriever.retrieve(w[:length]) for w in batch]
            rows[domain] = {"windows": len(hits), "fallback": round(sum(h.fallback for h in hits) / len(hits), 4),
                            "chosen": dict(Counter(h.domain for h in hits).most_common())}
            if domain in s.store.domains:
                rows[domain]["accuracy"] = round(sum(h.domain == domain for h in hits) / len(hits), 4)
        out[length] = rows
    return out


@torch.no_grad()
def perplexity(retriever, windows: dict, s, args) -> dict:
    """{domain: {full, specialist, retrieval, generalist}: ppl ± se} on ``seq_len`` windows."""
    from premoe.metrics import mean_and_se, token_nll
    from premoe.store import GENERALIST

    model, adapter, store = retriever.model, retriever.adapter, s.store
    kept = {t: store.kept(t, s.experts) for t in [*store.domains, GENERALIST]}

    def nll(window: torch.Tensor, target: str | None) -> float:
        ids = window[: args.seq_len].unsqueeze(0)  # (1, seq)
        with adapter.restrict_routing(model, kept[target]) if target else contextlib.nullcontext():
            logits = model(input_ids=ids).logits[:, :-1]  # (1, seq-1, vocab)
        return float(token_nll(logits, ids[:, 1:]).mean())

    out = {}
    for domain, batch in windows.items():
        seen = domain in store.domains
        scores: dict[str, list[float]] = {"full": [], "retrieval": [], ("specialist" if seen else GENERALIST): []}
        served = Counter()
        for window in batch:
            hit = retriever.retrieve(window[: args.prompt_tokens])
            served[hit.domain] += 1
            scores["full"].append(nll(window, None))
            scores["retrieval"].append(nll(window, hit.domain))
            scores["specialist" if seen else GENERALIST].append(nll(window, domain if seen else GENERALIST))
        row = {}
        for name, values in scores.items():
            mean, se = mean_and_se(values)
            row[name] = {"ppl": round(math.exp(mean), 4), "nll": round(mean, 5), "se": round(se, 5)}
        row["served"] = dict(served.most_common())
        out[domain] = row
    return out


def print_results(r: dict) -> None:
    print(f"model {r['model']}, M = {r['experts']}, metric {r['metric']}, threshold {r['threshold']}")
    print("retrieval accuracy (fallback rate) by request tokens:")
    lengths = list(r["accuracy"])
    print(f"  {'domain':<12}" + "".join(f"{'T=' + str(t):>18}" for t in lengths))
    for domain in [*r["domains"], *r["unseen"]]:
        cells = []
        for t in lengths:
            row = r["accuracy"][t].get(domain)
            cells.append("-" if row is None else f"{row.get('accuracy', float('nan')):.2f} ({row['fallback']:.2f})")
        print(f"  {domain:<12}" + "".join(f"{c:>18}" for c in cells) + ("   [unseen]" if domain in r["unseen"] else ""))
    print("perplexity: full model | own specialist (or generalist for unseen) | retrieval-served")
    for domain, row in r["perplexity"].items():
        other = "specialist" if "specialist" in row else "generalist"
        print(f"  {domain:<12} full {row['full']['ppl']:>9.3f}  {other} {row[other]['ppl']:>9.3f}  "
              f"retrieval {row['retrieval']['ppl']:>9.3f}  (served by {row['served']})")
    print(f"{r['seconds']} s, peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
