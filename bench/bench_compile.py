"""Compile throughput against the physical limit (copying the kept bytes), and compile's peak memory.

Run (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_compile.py                  # ~3 GB checkpoint, 3 rounds
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_compile.py --gb 1 --json bench/results/compile-1gb.json

It writes a random bf16 checkpoint in the Qwen3-MoE on-disk layout (per-expert
keys, several shards and an index) straight with safetensors — no model is
built — makes a plan keeping a random half of every layer's experts, then
alternates, round by round:

* compile: ``premoe.compile.compile_checkpoint`` in a fresh subprocess, timed
  inside it (imports excluded); its peak RSS is its own ``VmHWM`` (its
  ``ru_maxrss`` would carry over this parent's peak through fork + exec);
* copy: ``head -c N`` of every shard into a file, N = the bytes compile keeps
  from that shard: a plain read + write of the same number of bytes from the
  same files, the physical limit;
* kernel copy: the same bytes with ``copy_file_range`` (what ``cp`` does),
  the stricter limit, since compile copies in the kernel too.

Outputs are deleted, ``sync`` runs and the disk gets ``--settle`` seconds
(untimed) between runs, so each starts with clean dirty-page state and no
pending discards; the source stays in the page cache for all; the
order rotates every round. Reports the throughput ratios (copy time / compile
time) per round and their medians (goal ≥ 0.8)
and the peak RSS as a multiple of the largest tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 1024  # model width
MOE_INTERMEDIATE = 512  # per-expert MLP width
EXPERTS = 64  # routed experts per layer
TOP_K = 8
VOCAB = 32768
HEADS, KV_HEADS, HEAD_DIM = 16, 4, 64
SHARD_BYTES = 400_000_000  # target shard size

# The child reads its peak from VmHWM: ru_maxrss survives exec, so a child forked from this (large) bench
# process would report the parent's high-water mark.
COMPILE_CHILD = r"""
import json, sys, time
from premoe.compile import compile_checkpoint, copy_threads
from premoe.plan import Plan
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
rss_after_imports = status("VmRSS:")
start, cpu_start = time.perf_counter(), time.process_time()
threads = int(sys.argv[4]) if len(sys.argv) > 4 else None
report = compile_checkpoint(sys.argv[1], Plan.load(sys.argv[2]), sys.argv[3], force=True, progress=False, threads=threads)
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "threads": copy_threads(threads), "bytes": report.plan.bytes_after, "largest_tensor": report.plan.largest_tensor,
                  "peak_rss": status("VmHWM:"),
                  "rss_after_imports": rss_after_imports,
                  "kept_per_shard": {s: sum(w.nbytes for w in ws) for s, ws in report.plan.shards().items()}}))
"""


def layer_tensors(layer: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder layer's tensors, Qwen3-MoE on-disk names."""
    p = f"model.layers.{layer}."
    shapes = {
        p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN), p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,),
        p + "mlp.gate.weight": (EXPERTS, HIDDEN),
    }
    for e in range(EXPERTS):
        shapes[f"{p}mlp.experts.{e}.gate_proj.weight"] = (MOE_INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.experts.{e}.up_proj.weight"] = (MOE_INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.experts.{e}.down_proj.weight"] = (HIDDEN, MOE_INTERMEDIATE)
    return shapes


def make_checkpoint(path: Path, gb: float) -> tuple[int, int]:
    """Write the random checkpoint; returns (layers, total bytes)."""
    per_layer = sum(2 * torch.Size(s).numel() for s in layer_tensors(0).values())
    layers = max(1, round((gb * 1e9 - 4 * VOCAB * HIDDEN) / per_layer))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(layers):
        shapes.update(layer_tensors(layer))
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        current[key] = shape
        size += 2 * torch.Size(shape).numel()
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards += [current] if current else []
    path.mkdir(parents=True)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.randn(s, generator=generator, dtype=torch.bfloat16) for k, s in shard.items()}
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * 2 for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN,
              "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "head_dim": HEAD_DIM, "moe_intermediate_size": MOE_INTERMEDIATE, "intermediate_size": 4 * HIDDEN,
              "num_local_experts": EXPERTS, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K,
              "norm_topk_prob": True, "vocab_size": VOCAB, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return layers, total


def make_plan(model: Path, layers: int, out: Path) -> None:
    from premoe.modeling import model_identity
    from premoe.plan import Plan

    generator = torch.Generator().manual_seed(1)
    kept = {l: sorted(torch.randperm(EXPERTS, generator=generator)[: EXPERTS // 2].tolist()) for l in range(layers)}
    Plan(model_identity(model), "Qwen3-MoE", EXPERTS, TOP_K, list(range(layers)), kept,
         {l: list(range(EXPERTS)) for l in range(layers)}, {"scorer": "random", "ranking": "local"}, "bench",
         {}).save(out, force=True)


def run_compile(model: Path, plan: Path, out: Path, threads: int | None = None) -> dict:
    """premoe's compile in a fresh process; ``threads`` copying (None: compile's default)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = [] if threads is None else [str(threads)]
    done = subprocess.run([sys.executable, "-c", COMPILE_CHILD, str(model), str(plan), str(out), *extra], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def kept_per_shard(model: Path, plan: Path, out: Path) -> dict[str, int]:
    """Bytes compile keeps from each shard, from its dry run."""
    from premoe.compile import plan_writes
    from premoe.plan import Plan

    return {s: sum(w.nbytes for w in ws) for s, ws in plan_writes(model, Plan.load(plan), out, force=True).shards().items()}


def run_copy(model: Path, kept_per_shard: dict[str, int], out: Path) -> float:
    """Seconds to read + write the kept bytes of every shard with `head -c` (plain read/write)."""
    out.mkdir()
    start = time.perf_counter()
    for shard, nbytes in kept_per_shard.items():
        with open(out / shard, "wb") as dest:
            subprocess.run(["head", "-c", str(nbytes), str(model / shard)], stdout=dest, check=True)
    return time.perf_counter() - start


def run_kernel_copy(model: Path, kept_per_shard: dict[str, int], out: Path) -> float:
    """Seconds to copy the same bytes in the kernel (copy_file_range, what `cp` does): the stricter limit."""
    out.mkdir()
    start = time.perf_counter()
    for shard, nbytes in kept_per_shard.items():
        with open(model / shard, "rb") as src, open(out / shard, "wb") as dest:
            offset = 0
            while offset < nbytes:
                offset += os.copy_file_range(src.fileno(), dest.fileno(), nbytes - offset, offset)
    return time.perf_counter() - start


def reset(out: Path, settle: float = 0.0) -> None:
    """Delete the last output, flush, and let the disk finish (this ext4 is mounted with discard: deleting
    gigabytes queues TRIMs that slow the next run, so without a pause whoever runs right after a delete loses)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    time.sleep(settle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=3.0, help="checkpoint size in GB (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating compile/copy rounds (default 3)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after each delete (default 5)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/compile.json"), help="results file")
    args = parser.parse_args()
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)  # a fresh --dir, as the other benches take theirs
    work = Path(tempfile.mkdtemp(prefix="premoe-bench-compile-", dir=args.dir))
    try:
        model, plan, out = work / "model", work / "plan.json", work / "out"
        started = time.perf_counter()
        layers, total = make_checkpoint(model, args.gb)
        make_plan(model, layers, plan)
        print(f"checkpoint: {total / 1e9:.2f} GB, {layers} layers x {EXPERTS} experts, "
              f"{len(list(model.glob('*.safetensors')))} shards, written in {time.perf_counter() - started:.0f} s")
        rounds = []
        kept = kept_per_shard(model, plan, out)
        runs = {"compile": lambda: run_compile(model, plan, out),
                "copy": lambda: run_copy(model, kept, out), "kernel_copy": lambda: run_kernel_copy(model, kept, out),
                "compile_1thread": lambda: run_compile(model, plan, out, threads=1)}  # copying as cp does
        for r in range(args.rounds):  # rotate the order, so no contender always finds a warmer cache
            names = list(runs)[r % len(runs):] + list(runs)[: r % len(runs)]
            results = {}
            for name in names:
                reset(out, args.settle)
                results[name] = runs[name]()
            compiled = results["compile"]
            rounds.append({"round": r + 1, "order": names, "compile_s": compiled["seconds"], "copy_s": results["copy"],
                           "kernel_copy_s": results["kernel_copy"],
                           "compile_MBps": compiled["bytes"] / compiled["seconds"] / 1e6,
                           "copy_MBps": compiled["bytes"] / results["copy"] / 1e6,
                           "kernel_copy_MBps": compiled["bytes"] / results["kernel_copy"] / 1e6,
                           "ratio": results["copy"] / compiled["seconds"],
                           "ratio_kernel": results["kernel_copy"] / compiled["seconds"],
                           "compile_1thread_s": results["compile_1thread"]["seconds"],
                           "ratio_kernel_1thread": results["kernel_copy"] / results["compile_1thread"]["seconds"],
                           "threads": compiled["threads"], "peak_rss": compiled["peak_rss"],
                           "rss_after_imports": compiled["rss_after_imports"]})
        reset(out)
        largest = compiled["largest_tensor"]
        print(f"kept bytes: {compiled['bytes'] / 1e9:.2f} GB ({compiled['bytes'] / total:.1%}); largest tensor "
              f"{largest / 1e6:.1f} MB")
        print(f"{'round':>5} {'compile MB/s':>13} {'head -c MB/s':>13} {'kernel MB/s':>12} {'ratio':>6} "
              f"{'ratio kernel':>13} {'peak RSS MB':>12} {'x largest':>10}")
        for row in rounds:
            print(f"{row['round']:>5} {row['compile_MBps']:>13.0f} {row['copy_MBps']:>13.0f} "
                  f"{row['kernel_copy_MBps']:>12.0f} {row['ratio']:>6.2f} {row['ratio_kernel']:>13.2f} "
                  f"{row['peak_rss'] / 1e6:>12.0f} {row['peak_rss'] / largest:>10.2f}")
        ratio = statistics.median(r["ratio"] for r in rounds)
        ratio_kernel = statistics.median(r["ratio_kernel"] for r in rounds)
        ratio_serial = statistics.median(r["ratio_kernel_1thread"] for r in rounds)
        peak = max(r["peak_rss"] for r in rounds)
        imports = max(r["rss_after_imports"] for r in rounds)
        print(f"median throughput ratio compile/copy: {ratio:.2f} vs head -c, {ratio_kernel:.2f} vs in-kernel copy "
              f"(goal >= 0.8), copying with {compiled['threads']} threads; with one: {ratio_serial:.2f} vs in-kernel "
              "copy")
        print(f"peak RSS {peak / 1e6:.0f} MB = {peak / largest:.2f} x largest tensor; the interpreter with torch and "
              f"premoe imported holds {imports / 1e6:.0f} MB of it, compile adds {(peak - imports) / 1e6:.0f} MB "
              f"({(peak - imports) / largest:.2f} x largest tensor)")
        print("head -c: plain read + write of each shard's kept bytes; kernel: copy_file_range of the same bytes "
              "(what cp does); no fsync in any, sync between runs")
        result = {"gb": total / 1e9, "layers": layers, "experts": EXPERTS, "kept_bytes": compiled["bytes"],
                  "largest_tensor": largest, "rounds": rounds, "median_ratio": ratio,
                  "median_ratio_kernel": ratio_kernel, "median_ratio_kernel_1thread": ratio_serial,
                  "threads": compiled["threads"], "peak_rss": peak,
                  "rss_after_imports": imports, "cpus": os.cpu_count(),
                  "note": "copy = head -c of the kept bytes per shard, kernel_copy = copy_file_range of the same bytes; "
                          "no fsync in any run; sync between runs"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
