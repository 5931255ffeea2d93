"""Serving costs of task-adaptive expert retrieval, each against its physical reference.

Run (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_serve.py --store stores/testbed --json bench/results/serve.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_serve.py --quick          # tiny random model, seconds

The resident model is an :class:`~premoe.bank.ExpertBank` holding M experts
per layer; every comparison alternates its two sides within one run, round
by round, and reports the per-round ratios' median:

1. **retrieval vs a forward pass**: the retriever's layer-1 pattern (runs up
   to the first MoE router, through the full router copy) against the
   resident model's full forward on the same T tokens. Goal: ≤ 1/L + a little
   (L decoder layers).
2. **swap vs plain reads**: ``bank.swap`` to the next stored domain's
   experts against plain reads of the same kind of byte ranges
   (``bank.byte_ranges`` of the domains after it: whichever side reads a
   range second finds it in the CPU caches, so every side reads its own
   experts and the comparison is per byte), all from the page cache; the
   references are in bench/plain_reads.py (``pread`` into a recycled,
   cache-hot buffer; ``pread_kept`` into buffers that keep the bytes).
   Goal: ≤ 1.5x. Three banks: the default one, whose slot cache holds fp32
   records read with ``preadv`` straight into the slots (slices of 1 MiB or
   more would be mapped, premoe/pagemap.py; the testbed's are smaller); the
   same with every page-sized slice mapped (``map_from=PAGE``); and
   ``cache=None``, which reads the bf16 checkpoint and converts into the
   fp32 slots (its reference adds the same conversion: ``pread_convert``).
   bench/bench_swap_sizes.py measures mapping against reading by size.
3. **server requests/s**: sequential OpenAI completions against the real
   HTTP server (uvicorn in a thread): prompts cycling through the domains
   (a swap on most requests), prompts from one domain (retrieval, no swap),
   and the same resident model served fixed (no retrieval, no swap).

Prints peak RSS (ru_maxrss) of this process at the end.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

import taer_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    taer_setup.add_arguments(parser)
    parser.add_argument("--tokens", type=int, default=256, help="request tokens for the retrieval comparison")
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds per comparison")
    parser.add_argument("--requests", type=int, default=12, help="requests per server mode per round")
    parser.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request")
    parser.add_argument("--json", type=str, help="write the results here")
    args = parser.parse_args()
    taer_setup.quick_defaults(args, parser, {"tokens": 32, "rounds": 10, "requests": 6, "max_tokens": 4})

    s = taer_setup.setup(args)
    from premoe import pagemap
    from premoe.bank import ExpertBank
    from premoe.modeling import load_tokenizer
    from premoe.retrieval import Retriever

    store = s.store
    start = store.kept(store.domains[0], s.experts)
    bank = ExpertBank(s.model, start)
    tokenizer = load_tokenizer(s.model)
    retriever = Retriever(bank.model, bank.adapter, store, tokenizer, router=bank.full_router)
    results = {"model": str(s.model), "experts": s.experts, "layers": bank.model.config.num_hidden_layers,
               "retrieval": retrieval_cost(bank, retriever, s, args),
               "swap": {"slot_cache": swap_cost({"default": bank, "mapped": ExpertBank(s.model, start,
                                                                                      map_from=pagemap.PAGE)},
                                                store, s.experts, args.rounds),
                        "checkpoint": swap_cost({"checkpoint": ExpertBank(s.model, start, cache=None)}, store,
                                                s.experts, args.rounds)},
               "server": server_throughput(bank, retriever, tokenizer, s, args)}
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


@torch.no_grad()
def retrieval_cost(bank, retriever, s, args) -> dict:
    """Median over rounds of (retrieval time / full forward time) on the same T tokens."""
    from premoe.data import token_windows

    ids = token_windows(s.test[0].texts, retriever.tokenizer, args.tokens, args.tokens)[:1]  # (1, T)
    ratios, retrieve_s, forward_s = [], [], []
    for round_ in range(args.rounds + 1):
        times = {}
        for side in (("retrieve", "forward") if round_ % 2 else ("forward", "retrieve")):
            start = time.perf_counter()
            if side == "retrieve":
                retriever.pattern(ids)
            else:
                bank.model(input_ids=ids, use_cache=False)
            times[side] = time.perf_counter() - start
        if round_:  # round 0 warms up
            ratios.append(times["retrieve"] / times["forward"])
            retrieve_s.append(times["retrieve"])
            forward_s.append(times["forward"])
    layers = bank.model.config.num_hidden_layers
    return {"tokens": int(ids.shape[1]), "ratio_median": round(statistics.median(ratios), 4),
            "goal": f"<= 1/L = {1 / layers:.4f} + small",
            "retrieve_ms_median": round(1e3 * statistics.median(retrieve_s), 3),
            "forward_ms_median": round(1e3 * statistics.median(forward_s), 3)}


def swap_cost(banks: dict, store, experts: int, rounds: int) -> dict:
    """Per-byte medians of each bank's swap against plain reads (bench/plain_reads.py), alternated.

    ``banks`` maps a name to a bank; every bank and every reference reads
    different experts in a round (those of the next domains), so none finds
    bytes another side just pulled into the CPU caches.
    """
    from plain_reads import PlainReads

    targets = [store.kept(d, experts) for d in store.domains]
    first = next(iter(banks.values()))
    resident = next(first.model.parameters()).dtype
    reads = PlainReads(torch.bfloat16, resident)  # the testbed's checkpoint is bf16
    references = ["pread", "pread_convert"] if first.cache is None else ["pread", "pread_kept"]
    sides = [*banks, *references]
    per_byte = {side: [] for side in sides}  # seconds per byte, each side on its own bytes
    times = {side: [] for side in sides}
    sizes = []
    try:
        for round_ in range(rounds + 1):
            n = len(targets)
            # bank i swaps to the domain i+1 after this round's; reference j reads the experts of a later one
            plan = {side: targets[(round_ + 1 + i) % n] for i, side in enumerate(sides)}
            # from the first bank's state before this round's swaps; with few domains a reference may fall on
            # the bank's own kept set (nothing to read): it then reads what the first bank is about to swap in
            ranges = {side: first.byte_ranges(plan[side]) or first.byte_ranges(plan[sides[0]]) for side in references}
            order = sides[round_ % len(sides):] + sides[: round_ % len(sides)]  # rotate the order every round
            elapsed, size = {}, {}
            for side in order:
                start = time.perf_counter()
                if side in banks:
                    size[side] = banks[side].swap(plan[side]).bytes
                else:
                    size[side] = reads.read(ranges[side], side)
                elapsed[side] = time.perf_counter() - start
            if round_ and all(size.values()):  # round 0 warms up
                for side, value in elapsed.items():
                    times[side].append(value)
                    per_byte[side].append(value / size[side])
                sizes.append(size[sides[0]])
    finally:
        reads.close()
    if not sizes:
        return {"note": "every stored domain keeps the same experts: no swap read anything"}
    out = {"swaps": len(sizes), "bytes_median": int(statistics.median(sizes)), "resident_dtype": str(resident),
           "goal": "<= 1.5 x pread"}
    for name in banks:
        for ref in references:
            ratios = [s / r for s, r in zip(per_byte[name], per_byte[ref])]
            out[f"{name}_vs_{ref}_median"] = round(statistics.median(ratios), 3)
    out.update({f"{side}_ns_per_byte_median": round(1e9 * statistics.median(v), 4) for side, v in per_byte.items()})
    out.update({f"{side}_ms_median": round(1e3 * statistics.median(v), 3) for side, v in times.items()})
    return out


def server_throughput(bank, retriever, tokenizer, s, args) -> dict:
    """Requests/s of the HTTP server: cycling domains (swaps), one domain (no swaps), fixed (no retrieval)."""
    import httpx

    from premoe.data import token_windows
    from premoe.serve import Engine, ServeLimits, start_in_thread

    limits = ServeLimits(max_prompt_tokens=4096, max_tokens=args.max_tokens, max_queue=4, retrieval_tokens=256)
    prompt_tokens = 64
    prompts = {src.name: [tokenizer.decode(w) for w in token_windows(src.texts, tokenizer, prompt_tokens,
                                                                       prompt_tokens * args.requests)]
               for src in s.test}
    names = list(prompts)
    cycling, same = [], []
    for i in range(args.requests):  # request i: domain i mod D (a different domain each time), or always the first
        domain = names[i % len(names)]
        cycling.append(prompts[domain][(i // len(names)) % len(prompts[domain])])
        same.append(prompts[names[0]][i % len(prompts[names[0]])])
    engines = {"cycling": Engine(bank.model, tokenizer, "bench", limits, bank, retriever, s.experts),
               "same": Engine(bank.model, tokenizer, "bench", limits, bank, retriever, s.experts),
               "fixed": Engine(bank.model, tokenizer, "bench", limits)}
    servers = {name: start_in_thread(engine) for name, engine in engines.items()}
    work = {"cycling": cycling, "same": same, "fixed": same}
    seconds = {name: [] for name in engines}
    swapped = {name: 0 for name in engines}
    try:
        for round_ in range(max(2, args.rounds // 4) + 1):
            order = list(engines) if round_ % 2 else list(reversed(engines))
            for name in order:
                with httpx.Client(base_url=servers[name][0], timeout=300) as client:
                    start = time.perf_counter()
                    for prompt in work[name]:
                        body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": args.max_tokens,
                                                                    "min_tokens": args.max_tokens}).json()
                        swapped[name] += int(body["premoe"]["swapped"]["experts"] > 0) if round_ else 0
                    if round_:  # round 0 warms up
                        seconds[name].append(time.perf_counter() - start)
    finally:
        for _, server, thread in servers.values():
            server.should_exit = True
            thread.join(timeout=10)
    rate = {name: round(args.requests / statistics.median(values), 3) for name, values in seconds.items()}
    return {"requests_per_round": args.requests, "max_tokens": args.max_tokens, "requests_per_s": rate,
            "swapping_requests": swapped, "cycling_vs_fixed": round(rate["cycling"] / rate["fixed"], 3),
            "same_vs_fixed": round(rate["same"] / rate["fixed"], 3)}


if __name__ == "__main__":
    main()
