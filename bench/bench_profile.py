"""Profiling benchmarks: router-hook overhead, and streaming memory and time.

Run from the repository root (timings on a shared CPU swing, so each
benchmark alternates the things it compares inside one run)::

    # a medium random Qwen3-MoE (hidden 256, 4 layers, 32 experts top-4) for when the testbed is not shipped
    OMP_NUM_THREADS=1 python bench/bench_profile.py medium /tmp/premoe-medium
    # (a) forward with router hooks vs plain forward, default scorers and router-logit-only scorers
    OMP_NUM_THREADS=1 python bench/bench_profile.py hooks --model /tmp/premoe-medium --rounds 10
    # (b) a random ~1.5 GB bf16 checkpoint profiled in streaming mode and in memory, each in a subprocess
    OMP_NUM_THREADS=1 python bench/bench_profile.py stream --gb 1.5 --workdir /tmp/premoe-stream

Each prints a table and writes JSON into ``--out`` (default ``bench/results``).
Goals: hook overhead <= 1.03x for the router-only scorers; streaming peak RSS
<= 2x the largest decoder layer's fp32 bytes.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tiny  # noqa: E402  (tests/tiny.py: random models and the tiny tokenizer)


def _write_json(out: Path, name: str, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


# --------------------------------------------------------------------------- (a) hook overhead


def medium(args) -> None:
    """Save a medium random Qwen3-MoE for the hook benchmark (the shipped testbed's shape, random weights)."""
    tiny.save("qwen3_moe", Path(args.path), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
              intermediate_size=512)
    print(f"saved {args.path}")


@torch.no_grad()
def hooks(args) -> None:
    from premoe.adapters import get_adapter
    from premoe.capture import RouterCapture
    from premoe.modeling import load_model
    from premoe.profile import resolve_scorers

    model = load_model(args.model)
    adapter = get_adapter(model.config)
    every = resolve_scorers(None)
    router_only = [s for s in every if not s.needs_expert_outputs]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
               for _ in range(args.batches)]

    def plain():
        for ids in batches:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    class TimedCapture(RouterCapture):
        """Also sums the seconds spent inside its hooks: the overhead itself, which machine noise cannot hide."""

        hook_seconds = 0.0

        def _on_router(self, *args) -> None:
            started = time.perf_counter()
            try:
                super()._on_router(*args)
            finally:
                self.hook_seconds += time.perf_counter() - started

    hook_seconds: dict[str, list[float]] = {}

    def captured(name, specs):
        capture = TimedCapture(model, adapter, specs)

        def run():
            capture.hook_seconds = 0.0
            with capture:  # hooks on for this call only, so the plain forward runs without them
                for ids in batches:
                    capture.run(ids)
            hook_seconds.setdefault(name, []).append(capture.hook_seconds)
        return run

    variants = {"plain": plain, "router-only scorers": captured("router-only scorers", router_only),
                "default scorers": captured("default scorers", every)}
    names = list(variants)
    for name in names:  # warm-up, not timed
        variants[name]()
    hook_seconds.clear()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[: round_ % len(names)]  # rotate so no variant always goes first
        for name in order:
            started = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - started)
    rows, result = [], {"model": str(args.model), "batches": args.batches, "batch_size": args.batch_size,
                        "seq_len": args.seq_len, "rounds": args.rounds, "router_only": [s.name for s in router_only],
                        "default": [s.name for s in every], "variants": {}}
    for name in names:
        ratios = [t / p for t, p in zip(seconds[name], seconds["plain"])]  # same round: same machine state
        # the same run without its hooks' own time: total / (total - hooks)
        inside = [t / (t - h) for t, h in zip(seconds[name], hook_seconds.get(name, [0.0] * len(ratios)))]
        result["variants"][name] = {"median_s": statistics.median(seconds[name]), "median_ratio": statistics.median(ratios),
                                    "in_hook_ratio": statistics.median(inside), "seconds": seconds[name],
                                    "hook_seconds": hook_seconds.get(name, [])}
        rows.append([name, statistics.median(seconds[name]), statistics.median(ratios), min(ratios), max(ratios),
                     statistics.median(inside)])
    print(_table(["variant", "median s/round", "ratio vs plain (median)", "min", "max", "ratio from hook time"], rows))
    router_only_result = result["variants"]["router-only scorers"]
    print(f"goal: router-only ratio <= 1.03 -> {router_only_result['median_ratio']:.3f} alternating, "
          f"{router_only_result['in_hook_ratio']:.3f} from the time spent inside the hooks")
    print(f"wrote {_write_json(Path(args.out), 'profile_hooks', result)}")


# --------------------------------------------------------------------------- (b) streaming


def _stream_config(args):
    from transformers import Qwen3MoeConfig

    fields = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_experts=args.experts,
                  num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
                  intermediate_size=4 * args.hidden, max_position_embeddings=4096, tie_word_embeddings=False,
                  eos_token_id=0, bos_token_id=0, pad_token_id=0)
    layer_bytes = 2 * (3 * args.experts * args.moe_intermediate * args.hidden + args.experts * args.hidden
                       + 2 * args.hidden * args.heads * args.head_dim + 2 * args.hidden * args.kv_heads * args.head_dim)
    layers = args.layers or max(1, round(args.gb * 1e9 / layer_bytes))
    return Qwen3MoeConfig(num_hidden_layers=layers, **fields)


def _write_checkpoint(config, path: Path, shard_bytes: int) -> dict[int, int]:
    """A random bf16 checkpoint in the on-disk layout transformers writes; returns fp32 bytes per decoder layer."""
    import re

    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layout = revert_weight_conversion(skeleton, skeleton.state_dict())  # on-disk names and shapes, on meta
    gen = torch.Generator().manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, number, per_layer = {}, {}, 0, 0, {}

    def flush():
        nonlocal shard, size, number
        name = f"model-{number:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, number = {}, 0, number + 1

    for key, meta in layout.items():
        if meta.dim() == 1:  # norms
            value = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(meta.shape, generator=gen) * (0.2 if key.endswith("mlp.gate.weight") else 0.02)).bfloat16()
        match = re.search(r"layers\.(\d+)\.", key)
        if match:
            per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0) + 4 * value.numel()
        shard[key] = value
        size += value.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return per_layer


def _child(args) -> None:
    """One measured run in its own process: prints {seconds, maxrss_bytes} as the last line."""
    from premoe import malloc

    if args.mode == "stream":
        malloc.return_freed_memory()  # what the premoe CLI does first for --stream runs (premoe.cli.main)
    from premoe.data import Source
    from premoe.profile import ProfileParams, profile_model

    texts = {name: [Path(f).read_text()] for name, f in zip(("a", "b"), args.data)}
    sources = [Source(name, t, name) for name, t in texts.items()]
    params = ProfileParams(max_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size)
    started = time.perf_counter()
    if args.mode == "baseline":  # imports, tokens and the empty model: what every run pays before any weight
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from premoe.data import token_windows
        from premoe.modeling import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        for source in sources:
            token_windows(source.texts, tokenizer, args.seq_len, args.tokens)
        with init_empty_weights():
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    elif args.mode == "stream":
        from premoe.streaming import profile_streaming

        profile_streaming(args.model, sources, None, params, workdir=args.workdir, progress=False).save(args.save, force=True)
    else:
        profile_model(args.model, sources, None, params, progress=False).save(args.save, force=True)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "maxrss_bytes": _peak_rss()}))


def _peak_rss() -> int:
    """This process's peak resident set size in bytes.

    /proc's VmHWM where there is one: after fork + exec, Linux's ru_maxrss
    still holds the parent's RSS at fork time, which would bury the child's own peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stream(args) -> None:
    from premoe.profile import Profile

    work = Path(args.workdir)
    config = _stream_config(args)
    model = work / "model"
    started = time.perf_counter()
    per_layer = _write_checkpoint(config, model, args.shard_mb << 20)
    written = time.perf_counter() - started
    disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    data, tokenizer = [], tiny.tiny_tokenizer()
    for name, repeat in (("a", 1), ("b", 3)):  # two domains: different mixes of tiny.TEXT's three languages
        unit = tiny.TEXT * repeat + tiny.TEXT[::-1]
        copies = 1 + args.tokens // len(tokenizer(unit)["input_ids"])  # just enough text: tokenizing costs memory too
        file = work / f"{name}.txt"
        file.write_text(unit * copies)
        data.append(str(file))
    largest = max(per_layer.values())
    print(f"checkpoint {model}: {disk / 1e9:.2f} GB bf16 in {written:.0f} s, {config.num_hidden_layers} layers, "
          f"largest decoder layer {largest / 1e6:.0f} MB in fp32")

    def run(mode: str) -> dict:
        command = [sys.executable, __file__, "_child", mode, str(model), *data, "--tokens", str(args.tokens),
                   "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                   "--workdir", str(work / "scratch"), "--save", str(work / f"profile-{mode}")]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    runs: dict[str, list[dict]] = {"baseline": [run("baseline")], "stream": [], "memory": []}
    for round_ in range(args.rounds):
        for mode in (("stream", "memory") if round_ % 2 == 0 else ("memory", "stream")):
            runs[mode].append(run(mode))
    streamed, in_memory = Profile.load(work / "profile-stream"), Profile.load(work / "profile-memory")
    worst = max((streamed.utility(d, s) - in_memory.utility(d, s)).abs().max().item()
                for d in in_memory.domains for s in in_memory.scorers)
    base = runs["baseline"][0]["maxrss_bytes"]
    rows, result = [], {"config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_experts",
                                                                   "moe_intermediate_size", "num_experts_per_tok",
                                                                   "vocab_size")},
                        "checkpoint_bytes": disk, "largest_layer_fp32_bytes": largest, "tokens_per_domain": args.tokens,
                        "baseline_maxrss_bytes": base, "max_utility_diff": worst, "runs": runs}
    for mode in ("stream", "memory"):
        rss = max(r["maxrss_bytes"] for r in runs[mode])
        secs = statistics.median(r["seconds"] for r in runs[mode])
        rows.append([mode, secs, rss / 1e9, rss / largest, (rss - base) / largest])
        result[mode] = {"median_s": secs, "maxrss_bytes": rss, "rss_per_layer": rss / largest,
                        "rss_above_baseline_per_layer": (rss - base) / largest}
    pairs = [s["seconds"] / m["seconds"] for s, m in zip(runs["stream"], runs["memory"])]
    result["time_ratio_stream_over_memory"] = statistics.median(pairs)
    print(_table(["mode", "median s", "peak RSS GB", "RSS / largest layer (fp32)", "(RSS - baseline) / layer"], rows))
    print(f"baseline (imports, tokens, empty model) RSS {base / 1e9:.2f} GB; time ratio stream/memory "
          f"{result['time_ratio_stream_over_memory']:.2f}; max |utility difference| {worst:.2e}")
    print(f"wrote {_write_json(Path(args.out), 'profile_stream', result)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("medium", help="save a medium random Qwen3-MoE")
    p.add_argument("path")
    p.set_defaults(run=medium)

    p = sub.add_parser("hooks", help="forward with router hooks vs plain forward")
    p.add_argument("--model", default="testbed", help="'testbed' or a checkpoint directory")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.set_defaults(run=hooks)

    p = sub.add_parser("stream", help="streaming vs in-memory profiling of a random checkpoint")
    p.add_argument("--workdir", required=True, help="where the checkpoint, data and scratch files go")
    p.add_argument("--gb", type=float, default=1.5, help="checkpoint size in bf16 (sets the layer count)")
    p.add_argument("--layers", type=int, default=0, help="layer count (overrides --gb)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--shard-mb", type=int, default=512)
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens per domain (2 domains)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="stream/memory pairs, order alternating")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.set_defaults(run=stream)

    p = sub.add_parser("_child")  # internal: one measured subprocess
    p.add_argument("mode", choices=["baseline", "stream", "memory"])
    p.add_argument("model")
    p.add_argument("data", nargs=2)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--save", required=True)
    p.set_defaults(run=_child)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
