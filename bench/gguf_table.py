"""The "fits on a laptop" table: the testbed and its python specialists in llama.cpp, at f32/f16 and 4-bit.

For the full testbed and the 50% / 25% python specialists (`premoe profile/plan/compile`), this exports
GGUF with llama.cpp's own converter (`premoe export gguf`), quantizes f16 -> Q4_K_M with llama.cpp,
and measures in llama.cpp on this CPU: file size, peak resident memory, prompt and generation tokens/s,
and perplexity on the python test split -- on the very token ids transformers sees (the windows of
`premoe eval`), fed to llama.cpp through llama-cpp-python's bindings, so tokenizers cannot differ. It
also checks llama.cpp's own tokenizer against transformers' on that text.

Needs llama.cpp's source (PREMOE_LLAMA_CPP, with libllama built in build/bin) and the llama-cpp-python
sources of the same version (LLAMA_CPP_PYTHON: the unpacked sdist), e.g.:

    pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps && tar xzf llama_cpp_python-0.3.36.tar.gz
    export LLAMA_CPP_PYTHON=$PWD/llama_cpp_python-0.3.36 PREMOE_LLAMA_CPP=$PWD/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S $PREMOE_LLAMA_CPP -B $PREMOE_LLAMA_CPP/build -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build $PREMOE_LLAMA_CPP/build -j2 --target llama      # libllama only: ~25 min on 2 busy cores
    python bench/gguf_table.py --work /tmp/gguf                    # ~16 min here; --respeed redoes only tokens/s
    # (python: one with numpy, diskcache and jinja2 beside premoe; llama-cpp-python is not installed, only imported)

Writes bench/results/gguf.json and bench/results/gguf.md (``--results DIR`` writes them there instead).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KEEPS = {"full": None, "50%": 0.5, "25%": 0.25}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Directory for the profile, checkpoints and GGUFs.")
    parser.add_argument("--domain", default="python", help="Testbed domain of the specialists and the test text.")
    parser.add_argument("--windows", type=int, default=48, help="Test windows of --seq-len tokens.")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads.")
    parser.add_argument("--quant", default="Q4_K_M", help="4-bit type for llama_model_quantize.")
    parser.add_argument("--speed-rounds", type=int, default=5,
                        help="Rounds of the speed pass, every GGUF once per round in turn (the median is kept).")
    parser.add_argument("--respeed", action="store_true", help="Only redo the speed pass of RESULTS/gguf.json.")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="Directory for gguf.json and gguf.md (default bench/results).")
    parser.add_argument("--measure", nargs=2, metavar=("GGUF", "IDS"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--speed", nargs=2, metavar=("GGUF", "IDS"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), args.threads)))
        return
    if args.speed:
        print(json.dumps(speed(Path(args.speed[0]), Path(args.speed[1]), args.threads)))
        return
    respeed(args) if args.respeed else run(args)


def respeed(args) -> None:
    """Redo only the speed pass on the GGUFs of an existing bench/results/gguf.json (``--respeed``)."""
    result = json.loads((args.results / "gguf.json").read_text())
    speed_pass(args, result["rows"])
    result["load_average"] = os.getloadavg()
    (args.results / "gguf.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "gguf.md").write_text(markdown(result))
    print(markdown(result))


def run(args) -> None:
    import numpy as np

    args.work.mkdir(parents=True, exist_ok=True)
    models = {label: checkpoint(args.work, label, keep, args.domain) for label, keep in KEEPS.items()}
    ids, text = test_windows(args.domain, args.windows, args.seq_len)  # (windows, seq)
    np.save(args.work / "ids.npy", ids)
    rows = []
    for label, model in models.items():
        hf_ppl = transformers_ppl(model, ids)
        for kind in ("f32", "f16", args.quant):
            gguf = export(model, args.work / f"{label.rstrip('%')}-{kind}.gguf", kind)
            child = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--threads", str(args.threads),
                                    "--measure", str(gguf), str(args.work / "ids.npy")],
                                   capture_output=True, text=True, check=True)
            m = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append({"model": label, "type": kind, "file_mb": gguf.stat().st_size / 1e6, **m,
                         "transformers_ppl": hf_ppl, "ppl_vs_transformers": m["ppl"] / hf_ppl - 1})
            print(json.dumps(rows[-1]), flush=True)
    speed_pass(args, rows)
    tokenizer_check = compare_tokenizers(args.work / "full-f32.gguf", models["full"], text)
    result = {"domain": args.domain, "windows": int(ids.shape[0]), "seq_len": args.seq_len, "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
              "tokenizer": tokenizer_check, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gguf.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "gguf.md").write_text(markdown(result))
    print(markdown(result))


def checkpoint(work: Path, label: str, keep: float | None, domain: str) -> str:
    """The full testbed, or a specialist compiled with the premoe CLI (reused when present)."""
    if keep is None:
        return "testbed"
    out = work / f"{domain}-{int(keep * 100)}"
    if not out.exists():
        premoe = [sys.executable, "-c", "from premoe.cli import main; main()"]
        if not (work / "prof").exists():
            subprocess.run(premoe + ["profile", "testbed", "--data", domain, "--out", str(work / "prof")], check=True)
        plan = work / f"{out.name}.json"
        subprocess.run(premoe + ["plan", str(work / "prof"), "--keep", str(keep), "--domain", domain,
                                 "--out", str(plan)], check=True)
        subprocess.run(premoe + ["compile", "testbed", str(plan), "--out", str(out)], check=True)
    return str(out)


def test_windows(domain: str, windows: int, seq_len: int):
    """The token windows `premoe eval --data DOMAIN:test` uses, and the text they come from."""
    from premoe.data import parse_sources, token_windows
    from premoe.modeling import load_tokenizer

    source = parse_sources([f"{domain}:test"], split="test")[0]
    ids = token_windows(source.texts, load_tokenizer("testbed"), seq_len, windows * seq_len)
    return ids.numpy(), "\n".join(source.texts)[: 20000]


def transformers_ppl(model: str, ids) -> float:
    """exp(mean NLL) of tokens 1.. of each window, transformers fp32 (what `premoe eval` reports)."""
    import torch

    from premoe.metrics import perplexity, token_nll
    from premoe.modeling import load_model

    net = load_model(model)
    windows = torch.from_numpy(ids)
    with torch.no_grad():
        nll = torch.cat([token_nll(net(batch).logits[:, :-1], batch[:, 1:]).flatten()
                         for batch in windows.split(8)])
    return perplexity(nll)


def export(model: str, out: Path, kind: str) -> Path:
    """f32/f16 through `premoe export gguf`; a k-quant from the f16 file through llama_model_quantize."""
    from premoe.export import export_gguf

    if out.exists():
        return out
    if kind in ("f32", "f16"):
        export_gguf(model, out, outtype=kind)
        return out
    llama_cpp = bindings()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    source = out.with_name(out.name.replace(kind, "f16"))
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {source} -> {kind} failed")
    return out


def bindings():
    """llama-cpp-python from its unpacked sources, on the libllama built in PREMOE_LLAMA_CPP/build/bin."""
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(Path(os.environ["PREMOE_LLAMA_CPP"]) / "build" / "bin"))
    sys.path.insert(0, os.environ["LLAMA_CPP_PYTHON"])
    import llama_cpp

    return llama_cpp


def measure(gguf: Path, ids_file: Path, threads: int) -> dict:
    """In a fresh process: perplexity on the windows, prompt and generation tokens/s, peak RSS."""
    import numpy as np

    ids = np.load(ids_file)  # (windows, seq)
    bindings()
    from llama_cpp import Llama

    before = _status_kb("VmRSS")
    llm = Llama(str(gguf), n_ctx=ids.shape[1], n_batch=ids.shape[1], n_threads=threads, logits_all=True,
                verbose=False)
    nll, started = [], time.perf_counter()
    for window in ids:
        llm.reset()
        llm.eval(window.tolist())
        logits = llm.scores[: len(window) - 1].astype(np.float64)  # (seq-1, vocab)
        log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        nll.append(-log_probs[np.arange(len(window) - 1), window[1:]])
    prompt_s = time.perf_counter() - started
    gen_tokens, started = generation(llm, ids[0])
    gen_s = time.perf_counter() - started
    peak = _status_kb("VmHWM")  # this process's peak RSS (ru_maxrss would carry the parent's over exec)
    return {"ppl": float(np.exp(np.concatenate(nll).mean())), "prompt_tok_s": ids.size / prompt_s,
            "gen_tok_s": gen_tokens / gen_s, "peak_rss_mb": peak / 1024, "rss_over_python_mb": (peak - before) / 1024}


def _status_kb(field: str) -> int:
    """A memory field of /proc/self/status, in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def speed_pass(args, rows: list[dict]) -> None:
    """Tokens/s again, every file in turn for --speed-rounds rounds (load swings 10x here); keeps the medians."""
    import statistics

    files = [args.work / f"{r['model'].rstrip('%')}-{r['type']}.gguf" for r in rows]
    runs: list[list[dict]] = [[] for _ in rows]
    for _ in range(args.speed_rounds):
        for i, gguf in enumerate(files):
            child = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--threads", str(args.threads),
                                    "--speed", str(gguf), str(args.work / "ids.npy")],
                                   capture_output=True, text=True, check=True)
            runs[i].append(json.loads(child.stdout.strip().splitlines()[-1]))
    for row, done in zip(rows, runs):
        for key in ("prompt_tok_s", "gen_tok_s"):
            row[key] = statistics.median(d[key] for d in done)
        row["speed_rounds"] = len(done)


def speed(gguf: Path, ids_file: Path, threads: int) -> dict:
    """Prompt tokens/s over 4 windows and generation tokens/s, in a fresh process."""
    import numpy as np

    ids = np.load(ids_file)[:4]  # (4, seq)
    bindings()
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=ids.shape[1], n_batch=ids.shape[1], n_threads=threads, logits_all=True,
                verbose=False)
    started = time.perf_counter()
    for window in ids:
        llm.reset()
        llm.eval(window.tolist())
    prompt_s = time.perf_counter() - started
    gen_tokens, started = generation(llm, ids[0])
    return {"prompt_tok_s": ids.size / prompt_s, "gen_tok_s": gen_tokens / (time.perf_counter() - started)}


def generation(llm, window) -> tuple[int, float]:
    """Decode one token at a time (the window's own tokens, teacher-forced): what chat generation costs."""
    llm.reset()
    llm.eval(window[:16].tolist())
    started = time.perf_counter()
    for token in window[16:128]:
        llm.eval([int(token)])
    return len(window[16:128]), started


def compare_tokenizers(gguf: Path, model: str, text: str) -> dict:
    """llama.cpp's tokenizer (from the GGUF's vocab + gpt-2 pre-tokenizer) against transformers' on the text."""
    from premoe.modeling import load_tokenizer

    bindings()
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=64, vocab_only=True, verbose=False)
    theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
    ours = load_tokenizer(model)(text, add_special_tokens=False)["input_ids"]
    same = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    return {"characters": len(text), "transformers_tokens": len(ours), "llama_cpp_tokens": len(theirs),
            "identical": theirs == ours, "first_difference": None if theirs == ours else same}


def markdown(result: dict) -> str:
    lines = [f"# The testbed in llama.cpp ({result['domain']} test split, {result['windows']} windows x "
             f"{result['seq_len']} tokens, {result['threads']} threads, load average "
             f"{result['load_average'][0]:.1f})", "",
             "| model | type | file MB | peak RSS MB | of which model MB | prompt tok/s | gen tok/s | ppl llama.cpp | "
             "ppl transformers | Δ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['type']} | {r['file_mb']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_over_python_mb']:.0f} | {r['prompt_tok_s']:.0f} | {r['gen_tok_s']:.0f} | "
                     f"{r['ppl']:.3f} | {r['transformers_ppl']:.3f} | "
                     f"{100 * r['ppl_vs_transformers']:+.2f}% |")
    t = result["tokenizer"]
    rounds = result["rows"][0].get("speed_rounds", 1)
    lines += ["", f"Peak RSS is the whole process (Python, numpy, llama-cpp-python, a 256 x 8192 logits buffer); "
              "'of which model' is the peak minus the RSS before the model was loaded. Tokens/s: median of "
              f"{rounds} rounds, every file in turn, at the load average above (2 cores shared), so compare rows, "
              "not with other machines. Perplexity: llama.cpp on the same token ids as transformers."]
    lines += ["", f"Tokenizer: llama.cpp gives {t['llama_cpp_tokens']} tokens, transformers {t['transformers_tokens']} "
              f"on {t['characters']} characters of the test text; identical: {t['identical']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
