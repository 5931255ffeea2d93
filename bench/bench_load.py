"""A bounded load test of `premoe serve` on loopback: fixed request count, fixed deadline, some clients abandoning.

Run (from the repository root; ~1-3 min on 2 cores)::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_load.py --json bench/results/load-testbed.json
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_load.py --requests 60 --concurrency 8   # quicker

What it does: starts ``premoe serve MODEL`` (default the shipped ``testbed``,
fixed mode; ``--store DIR --experts M`` for retrieval mode) as a child
process bound to 127.0.0.1, warms it up, then sends ``--requests`` OpenAI
requests from ``--concurrency`` concurrent clients (a quarter of them
streaming; prompts are 300-character slices of the testbed's test split,
cycling through its domains). Every ``--abandon-every``-th client gives up
after a random 20-300 ms and closes its connection (mid-queue, mid-generation
or mid-stream). A client refused with 429 waits the server's ``Retry-After``
and retries, at most ``--retries`` times. Everything must finish within
``--deadline`` seconds; what has not counts as failed.

Reports: success rate (200 over the requests that did not abandon), 429s
(first tries and final), p50/p95/max latency of successful requests (retries
included), /health latency probed every 100 ms during the load, the server's
own counters (cancelled, in flight after the run: must be 0), and the server
process's RSS before and after the load (VmRSS) and its peak (VmHWM).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed", help="checkpoint directory or 'testbed'")
    parser.add_argument("--store", help="pattern store: serve in retrieval mode (needs --experts)")
    parser.add_argument("--experts", type=int, help="M resident experts per layer (with --store)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8, help="generated tokens per request")
    parser.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue")
    parser.add_argument("--abandon-every", type=int, default=10, help="every N-th request is abandoned mid-way")
    parser.add_argument("--retries", type=int, default=3, help="retries after a 429, honouring Retry-After")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole load")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    prompts = load_prompts()
    server = start_server(args)
    try:
        results = asyncio.run(run_load(args, prompts, server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.rename(args.json)


def load_prompts() -> list[str]:
    """300-character slices of the testbed's test split, interleaved across its domains."""
    from premoe.data import parse_sources

    per_domain = [[text[i:i + 300] for text in source.texts for i in range(0, min(len(text), 3000), 300)
                   if text[i:i + 300].strip()][:64] for source in parse_sources(["testbed"], split="test")]
    return [p for group in zip(*per_domain) for p in group]


def start_server(args) -> subprocess.Popen:
    from premoe.serve import start_process

    command = [args.model, "--max-tokens", str(args.max_tokens), "--max-queue", str(args.max_queue)]
    if args.store:
        command += ["--store", args.store, "--experts", str(args.experts)]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        return start_process(command, args.port, timeout=120, env=env)
    except RuntimeError as e:
        raise SystemExit(str(e)) from e


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


async def run_load(args, prompts: list[str], pid: int) -> dict:
    base = f"http://127.0.0.1:{args.port}"
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(base_url=base, timeout=args.deadline) as warm:
        for prompt in prompts[:6]:
            await warm.post("/v1/completions", json={"prompt": prompt, "max_tokens": args.max_tokens})
    before = memory_kb(pid)
    plan = [{"index": i, "prompt": prompts[i % len(prompts)], "stream": i % 4 == 3,
             "abandon_after": rng.uniform(0.02, 0.3) if args.abandon_every and i % args.abandon_every == 5 else None}
            for i in range(args.requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    outcomes: list[dict] = []
    health: list[float] = []
    stop_probe = threading.Event()
    started = time.perf_counter()

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=args.deadline) as client:
            while not queue.empty():
                outcomes.append(await one_request(client, queue.get_nowait(), args))

    def probe() -> None:  # a thread with its own client, so the load's event loop does not delay it
        with httpx.Client(base_url=base, timeout=10) as client:
            while not stop_probe.is_set():
                t = time.perf_counter()
                client.get("/health")
                health.append(time.perf_counter() - t)
                time.sleep(0.1)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(args.concurrency))), args.deadline)
    except asyncio.TimeoutError:
        pass
    seconds = time.perf_counter() - started
    stop_probe.set()
    prober.join()
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(100):  # abandoned requests end at their next token; wait for the queue to drain
            if (await client.get("/health")).json()["in_flight"] == 0:
                break
            await asyncio.sleep(0.1)
        metrics = parse_metrics((await client.get("/metrics")).text)
    after = memory_kb(pid)
    return summarise(args, outcomes, health, metrics, before, after, seconds)


async def one_request(client: httpx.AsyncClient, item: dict, args) -> dict:
    body = {"prompt": item["prompt"], "max_tokens": args.max_tokens, "stream": item["stream"]}
    started = time.perf_counter()
    statuses = []
    for _ in range(args.retries + 1):
        try:
            status, retry_after = await asyncio.wait_for(send(client, body), item["abandon_after"])
        except asyncio.TimeoutError:  # the client gives up and closes its connection
            return {**item, "statuses": statuses, "outcome": "abandoned", "seconds": time.perf_counter() - started}
        except httpx.HTTPError as e:
            return {**item, "statuses": statuses, "outcome": f"transport error {type(e).__name__}",
                    "seconds": time.perf_counter() - started}
        statuses.append(status)
        if status != 429:
            break
        await asyncio.sleep(retry_after)
    return {**item, "statuses": statuses, "outcome": statuses[-1], "seconds": time.perf_counter() - started}


async def send(client: httpx.AsyncClient, body: dict) -> tuple[int, float]:
    """(status, Retry-After seconds) of one request; a stream is read to its end and must close with [DONE]."""
    if not body["stream"]:
        response = await client.post("/v1/completions", json=body)
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] >= 1
        return response.status_code, float(response.headers.get("retry-after", 0))
    async with client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line]
        if response.status_code == 200 and lines[-1] != "data: [DONE]":
            return 599, 0.0  # a stream that did not finish properly
        return response.status_code, float(response.headers.get("retry-after", 0))


def parse_metrics(text: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and "{" not in line}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def summarise(args, outcomes, health, metrics, before, after, seconds) -> dict:
    kept = [o for o in outcomes if o["outcome"] != "abandoned"]
    ok = [o for o in kept if o["outcome"] == 200]
    latencies = [o["seconds"] for o in ok]
    other = sorted({str(o["outcome"]) for o in kept if o["outcome"] != 200})
    return {
        "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "model": args.model, "mode": "retrieval" if args.store else "fixed", "requests": args.requests,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "server_max_queue": args.max_queue,
        "retries_after_429": args.retries, "seconds": round(seconds, 2), "finished": len(outcomes),
        "abandoned": len(outcomes) - len(kept), "success_rate": round(len(ok) / max(1, len(kept)), 4),
        "not_successful": {s: sum(str(o["outcome"]) == s for o in kept) for s in other},
        "first_try_429": sum(bool(o["statuses"]) and o["statuses"][0] == 429 for o in outcomes),
        "all_429_responses": sum(o["statuses"].count(429) for o in outcomes),
        "streams_ok": sum(o["stream"] for o in ok),
        "latency_s": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                      "max": percentile(latencies, 1.0), "mean": round(statistics.fmean(latencies), 4) if ok else None},
        "health_latency_s": {"probes": len(health), "p50": percentile(health, 0.5), "p95": percentile(health, 0.95),
                             "max": percentile(health, 1.0)},
        "server": {"cancelled": metrics.get("premoe_cancelled_total"), "rejected_429": metrics.get("premoe_rejected_total"),
                   "in_flight_after": metrics.get("premoe_in_flight"), "errors": metrics.get("premoe_errors_total"),
                   "completion_tokens": metrics.get("premoe_completion_tokens_total")},
        "rss_mb": {"before": round(before["VmRSS"] / 1024, 1), "after": round(after["VmRSS"] / 1024, 1),
                   "growth": round((after["VmRSS"] - before["VmRSS"]) / 1024, 1),
                   "peak": round(after["VmHWM"] / 1024, 1)},
    }


if __name__ == "__main__":
    main()
