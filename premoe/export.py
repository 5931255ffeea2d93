"""Export a checkpoint to GGUF with llama.cpp's own converter, for llama.cpp / Ollama / LM Studio users.

premoe does not write GGUF itself: llama.cpp's ``convert_hf_to_gguf.py`` owns that format, and a
compiled checkpoint is an ordinary Hugging Face checkpoint it reads. This module finds llama.cpp,
checks what the converter will read, runs it, and optionally runs ``llama-quantize``.

One shim, and why: the converter identifies a BPE tokenizer's pre-tokenizer by hashing the ids it
gives for a test string and refuses hashes it does not list. A tokenizer trained for one model (the
testbed's) is never listed, although its pre-tokenizer is plain GPT-2 byte-level. When tokenizer.json
says exactly that (``ByteLevel`` with ``use_regex`` and no normaliser), the export tells the converter
``gpt-2`` *only if* its own check does not recognise the hash; any other tokenizer is left to it.

    premoe export gguf python-50/ --out python-50.gguf --llama-cpp ~/llama.cpp
    premoe export gguf python-50/ --out python-50-q4.gguf --outtype f16 --quantize Q4_K_M
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from premoe.errors import CheckpointError, InputError, MissingFileError, OutputExistsError, PremoeError
from premoe.fileio import clean_stale_temps, refuse_if_appeared, temp_prefix
from premoe.modeling import read_config, resolve_model_path

#: the environment variable naming a llama.cpp source directory (one holding convert_hf_to_gguf.py)
LLAMA_CPP_ENV = "PREMOE_LLAMA_CPP"
#: what convert_hf_to_gguf.py --outtype accepts that is worth offering
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: llama.cpp's conversion/base.py (TextModel.set_gguf_parameters, find_hparam) reads the expert count
#: from the first of these present in config.json (Qwen2/3-MoE's modify_tensors: the first two only)
CONVERTER_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
GGUF_MAGIC = b"GGUF"  # the first bytes of every GGUF file: what --force may replace

HOW_TO_GET = (
    "get llama.cpp's converter with `git clone https://github.com/ggml-org/llama.cpp` (or unpack the "
    "llama-cpp-python sdist: `pip download llama-cpp-python --no-binary :all: --no-deps`, then use its "
    "vendor/llama.cpp), install its requirements/requirements-convert_hf_to_gguf.txt, and pass "
    f"--llama-cpp DIR or set {LLAMA_CPP_ENV}=DIR"
)

# Runs the converter's main() with a fallback pre-tokenizer name; argv: llama_dir pre_name converter-args...
_DRIVER = """
import sys
llama_dir, pre = sys.argv[1], sys.argv[2]
sys.argv = [llama_dir + "/convert_hf_to_gguf.py"] + sys.argv[3:]
sys.path.insert(0, llama_dir)
import convert_hf_to_gguf as converter
try:
    from conversion.base import TextModel
except ImportError:  # llama.cpp before the conversion/ package: one script
    TextModel = converter.TextModel
original = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        if not pre:
            raise
        print(f"premoe: tokenizer hash not in llama.cpp's list; its tokenizer.json is GPT-2 byte-level: {pre}",
              file=sys.stderr)
        return pre
TextModel.get_vocab_base_pre = get_vocab_base_pre
converter.main()
"""


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote: the file, its type, and the pre-tokenizer shim if it applied."""

    out: Path
    outtype: str
    quantize: str | None
    nbytes: int
    pre_tokenizer_fallback: str | None

    def summary(self) -> str:
        kind = f"{self.outtype} -> {self.quantize}" if self.quantize else self.outtype
        return f"wrote {self.out} ({kind}, {self.nbytes / 1e6:.1f} MB)"


def find_llama_cpp(option: str | Path | None = None) -> Path:
    """The llama.cpp source directory: ``--llama-cpp`` or ``$PREMOE_LLAMA_CPP``; error naming how to get it."""
    given = option or os.environ.get(LLAMA_CPP_ENV)
    if not given:
        raise MissingFileError(f"llama.cpp not found: {HOW_TO_GET}")
    path = Path(given).expanduser()
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise MissingFileError(f"{path} holds no convert_hf_to_gguf.py (expected a llama.cpp source directory); "
                               f"{HOW_TO_GET}")
    return path


def find_quantize(llama_cpp: Path) -> Path:
    """The ``llama-quantize`` binary: llama.cpp's build/bin, else $PATH; error saying how to build it."""
    for candidate in (llama_cpp / "build" / "bin" / "llama-quantize", llama_cpp / "llama-quantize"):
        if candidate.is_file():
            return candidate
    found = shutil.which("llama-quantize")
    if found:
        return Path(found)
    raise MissingFileError(f"llama-quantize not found in {llama_cpp}/build/bin or $PATH; build it with "
                           f"`cmake -B build && cmake --build build --target llama-quantize` in {llama_cpp}")


def converter_count_key(config: dict, path: Path) -> str:
    """The config field the converter will read the expert count from; error when it reads none."""
    for key in CONVERTER_COUNT_KEYS:
        if key in config:
            return key
    raise CheckpointError(f"{path}/config.json has none of {', '.join(CONVERTER_COUNT_KEYS)}; llama.cpp's converter "
                          "reads the expert count from these; recompile with `premoe compile` or add the field")


def check_uniform(config: dict, path: Path) -> None:
    """GGUF holds one expert count per model: refuse a compact checkpoint (different counts per layer)."""
    info = config.get("premoe") or {}
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}/config.json has a malformed 'premoe' block (a JSON {type(info).__name__}, "
                              "expected an object); recompile the checkpoint")
    if info.get("export") == "compact":
        counts = info.get("experts_per_layer")
        shown = ", ".join(sorted({json.dumps(n) for n in counts.values()})) if isinstance(counts, dict) else "?"
        raise CheckpointError(f"{path} is a compact checkpoint ([{shown}] experts per layer); GGUF's single expert "
                              "count cannot describe it; recompile with `premoe compile ... --export padded`")


def fallback_pre_tokenizer(model_dir: Path) -> str | None:
    """``gpt-2`` when tokenizer.json is plain GPT-2 byte-level BPE (the converter's hash list aside), else None."""
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        tokenizer = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(tokenizer, dict):
        raise CheckpointError(f"{file} holds a JSON {type(tokenizer).__name__}, not a tokenizer object; the "
                              "checkpoint is corrupt")
    model, pre = (tokenizer.get(k) if isinstance(tokenizer.get(k), dict) else {} for k in ("model", "pre_tokenizer"))
    plain = (model.get("type") == "BPE" and tokenizer.get("normalizer") is None
             and pre.get("type") == "ByteLevel" and pre.get("use_regex", True))
    return "gpt-2" if plain else None


def converter_command(llama_cpp: Path, model_dir: Path, outfile: Path, outtype: str, python: str | None = None,
                      pre_tokenizer: str | None = None) -> list[str]:
    """The converter's command line (through the pre-tokenizer driver)."""
    return [python or sys.executable, "-c", _DRIVER, str(llama_cpp), pre_tokenizer or "",
            str(model_dir), "--outfile", str(outfile), "--outtype", outtype]


def export_gguf(model: str | Path, out: str | Path, *, llama_cpp: str | Path | None = None, outtype: str = "f16",
                quantize: str | None = None, python: str | None = None, force: bool = False) -> GgufExport:
    """Convert MODEL to one GGUF file with llama.cpp's converter, then optionally ``llama-quantize`` it.

    >>> export_gguf("python-50/", "python-50.gguf", llama_cpp="~/llama.cpp", quantize="Q4_K_M")  # doctest: +SKIP
    """
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    model_dir = resolve_model_path(model)
    out = _check_out(out, model_dir, force)
    config = read_config(model_dir)
    converter_count_key(config, model_dir)
    check_uniform(config, model_dir)
    root = find_llama_cpp(llama_cpp)
    quantizer = find_quantize(root) if quantize else None
    pre = fallback_pre_tokenizer(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)  # a killed export's temp, which holds a whole GGUF
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out), dir=out.parent) as tmp:
        converted = Path(tmp) / f"model-{outtype}.gguf"
        _run(converter_command(root, model_dir, converted, outtype, python, pre), "convert_hf_to_gguf.py")
        final = converted
        if quantizer:
            final = Path(tmp) / f"model-{quantize}.gguf"
            _run([str(quantizer), str(converted), str(final), quantize], "llama-quantize")
        final.chmod(0o644)
        refuse_if_appeared(out, force)
        os.replace(final, out)
    return GgufExport(out, outtype, quantize, out.stat().st_size, pre)


def _check_out(out: str | Path, model_dir: Path, force: bool) -> Path:
    """The output file: not the model or inside it, and replaced (with ``force``) only if it is a GGUF file or empty.

    The general rule (:mod:`premoe.fileio`) recognises premoe's JSON; a .gguf is llama.cpp's format, known by its
    magic bytes, so anything else at ``out`` (a file of the user's, a directory) is never replaced.
    """
    from premoe.fileio import check_inputs, check_space

    out = check_inputs(out, [model_dir])
    if out.exists():
        if not force:
            raise OutputExistsError(f"{out} already exists; pass --force to replace it")
        if not out.is_file():
            raise OutputExistsError(f"{out} exists and is not a regular file; choose another output file")
        with open(out, "rb") as f:
            magic = f.read(4)
        if magic and magic != GGUF_MAGIC:
            raise OutputExistsError(f"{out} is not a GGUF file, so --force does not replace it; remove it yourself "
                                    "or choose another output file")
    check_space(out)
    return out


def _run(command: list[str], what: str) -> None:
    """Run a llama.cpp tool; on failure raise with the last line it printed (the whole log under PREMOE_DEBUG)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        if os.environ.get("PREMOE_DEBUG"):
            print(done.stderr, file=sys.stderr)
        raise PremoeError(f"{what} failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")
