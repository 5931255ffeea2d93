"""Retrieval on text written outside the corpus: does a store trained on manual pages, CPython and the KJV
serve text in the same languages and genres that none of its splits hold?

``bench/outside_texts.jsonl`` holds 48 short texts written for this check (2026-12-02), never used to build,
calibrate or choose anything: six per trained domain in other styles (Python with type hints and asyncio,
README-style English, German and French news and travel prose besides manual-page prose, KJV-style verses,
word problems) and twelve from domains the store never saw (JSON, HTML, SQL, Rust, JavaScript, YAML, LaTeX,
Italian, Dutch, Spanish news, English finance news, a fairy tale). Right = the trained domain for the first
kind, the generalist (a fallback) for the second. Each text goes through the same call as
``premoe store query STORE TEXT --tokens T``.

Run from the repository root::

    OMP_NUM_THREADS=2 python bench/outside_probe.py --store runs/store --json bench/results/outside-probe.json
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

TEXTS = Path(__file__).with_name("outside_texts.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a store directory (premoe store build)")
    parser.add_argument("--model", help="default: the store's model")
    parser.add_argument("--tokens", type=int, default=64, help="request tokens retrieval reads")
    parser.add_argument("--json", help="write the rows and totals here")
    args = parser.parse_args()

    from premoe.adapters import get_adapter
    from premoe.modeling import load_model, load_tokenizer, locate_model
    from premoe.retrieval import Retriever
    from premoe.store import GENERALIST, Store

    store = Store.load(args.store)
    model = args.model or locate_model(store.model)
    net, tokenizer = load_model(model), load_tokenizer(model)
    retriever = Retriever(net, get_adapter(net.config), store, tokenizer)
    rows, right, total = [], Counter(), Counter()
    for line in TEXTS.read_text().splitlines():
        item = json.loads(line)
        hit = retriever.retrieve(item["text"], args.tokens)
        want = GENERALIST if item["domain"] == "unseen" else item["domain"]
        rows.append({"domain": item["domain"], "served": hit.domain, "nearest": hit.nearest,
                     "fallback_score": hit.fallback_score, "threshold": hit.threshold, "tokens": hit.tokens,
                     "right": hit.domain == want, "text": item["text"][:60]})
        right[item["domain"]] += hit.domain == want
        total[item["domain"]] += 1
    for row in rows:
        mark = "ok  " if row["right"] else "MISS"
        print(f"{mark} {row['domain']:8} -> {row['served']:10} (nearest {row['nearest']:8} score "
              f"{row['fallback_score']:.3f} vs {row['threshold']:.3f}, {row['tokens']} tokens) {row['text'][:40]!r}")
    summary = {d: f"{right[d]}/{total[d]}" for d in total}
    print("right:", ", ".join(f"{d} {v}" for d, v in summary.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"store": str(args.store), "tokens": args.tokens, "right": summary,
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
