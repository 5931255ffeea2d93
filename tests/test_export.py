"""`premoe export gguf`: finding llama.cpp, what its converter reads, the pre-tokenizer shim, atomic output.

The fast tests run a stand-in converter with the real one's layout (convert_hf_to_gguf.py + conversion/base.py);
the slow test converts the testbed with a real llama.cpp when PREMOE_LLAMA_CPP names one.
"""
import json
import os
import subprocess
import sys

import pytest

from premoe.errors import CheckpointError, MissingFileError, OutputExistsError, PremoeError
from premoe.export import (LLAMA_CPP_ENV, check_uniform, converter_count_key, export_gguf,
                           fallback_pre_tokenizer, find_llama_cpp)
from premoe.modeling import resolve_model_path

FAKE_BASE = '''
class TextModel:
    def get_vocab_base_pre(self, tokenizer):
        raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")
'''
FAKE_CONVERTER = '''
import argparse, json, sys
from conversion.base import TextModel
def main():
    p = argparse.ArgumentParser(); p.add_argument("model"); p.add_argument("--outfile"); p.add_argument("--outtype")
    a = p.parse_args()
    pre = TextModel().get_vocab_base_pre(None)
    open(a.outfile, "w").write(json.dumps({"model": a.model, "outtype": a.outtype, "pre": pre}))
if __name__ == "__main__":
    main()
'''


@pytest.fixture
def fake_llama(tmp_path, monkeypatch):
    root = tmp_path / "llama.cpp"
    (root / "conversion").mkdir(parents=True)
    (root / "conversion" / "__init__.py").write_text("")
    (root / "conversion" / "base.py").write_text(FAKE_BASE)
    (root / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    monkeypatch.delenv(LLAMA_CPP_ENV, raising=False)
    return root


def test_missing_llama_cpp_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.delenv(LLAMA_CPP_ENV, raising=False)
    with pytest.raises(MissingFileError, match="git clone https://github.com/ggml-org/llama.cpp.*PREMOE_LLAMA_CPP"):
        find_llama_cpp()
    with pytest.raises(MissingFileError, match=f"{tmp_path} holds no convert_hf_to_gguf.py"):
        find_llama_cpp(tmp_path)
    monkeypatch.setenv(LLAMA_CPP_ENV, str(tmp_path))
    with pytest.raises(MissingFileError, match="holds no convert_hf_to_gguf.py"):
        find_llama_cpp()


def test_the_converter_reads_the_expert_count(tmp_path):
    testbed = resolve_model_path("testbed")
    assert converter_count_key(json.loads((testbed / "config.json").read_text()), testbed) == "num_local_experts"
    assert converter_count_key({"num_experts": 8}, tmp_path) == "num_experts"
    with pytest.raises(CheckpointError, match="none of num_local_experts, num_experts, n_routed_experts"):
        converter_count_key({"moe_num_experts": 8}, tmp_path)


def test_compact_checkpoints_are_refused(tmp_path):
    check_uniform({"premoe": {"export": "uniform"}}, tmp_path)
    check_uniform({}, tmp_path)
    with pytest.raises(CheckpointError, match=r"compact checkpoint \(\[4, 6\] experts per layer\).*--export padded"):
        check_uniform({"premoe": {"export": "compact", "experts_per_layer": {"0": 4, "1": 6}}}, tmp_path)


def test_gpt2_pre_tokenizer_only_for_plain_byte_level_bpe(tmp_path):
    assert fallback_pre_tokenizer(resolve_model_path("testbed")) == "gpt-2"
    tokenizer = json.loads((resolve_model_path("testbed") / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert fallback_pre_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").unlink()
    assert fallback_pre_tokenizer(tmp_path) is None


def test_export_runs_the_converter_with_the_fallback(fake_llama, tmp_path):
    out = tmp_path / "gguf" / "testbed.gguf"
    done = export_gguf("testbed", out, llama_cpp=fake_llama, outtype="f32")
    written = json.loads(out.read_text())
    assert written == {"model": str(resolve_model_path("testbed")), "outtype": "f32", "pre": "gpt-2"}
    assert done.pre_tokenizer_fallback == "gpt-2" and done.nbytes == out.stat().st_size
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in out.parent.iterdir()] == ["testbed.gguf"], "a temp file was left behind"
    with pytest.raises(OutputExistsError, match="pass --force"):
        export_gguf("testbed", out, llama_cpp=fake_llama)


def test_converter_failure_is_one_line_and_leaves_nothing(fake_llama, tmp_path):
    (fake_llama / "convert_hf_to_gguf.py").write_text("def main():\n    raise SystemExit('model type not supported')\n")
    with pytest.raises(PremoeError, match="convert_hf_to_gguf.py failed \\(exit 1\\): model type not supported"):
        export_gguf("testbed", tmp_path / "x.gguf", llama_cpp=fake_llama)
    assert not list(tmp_path.glob("*x.gguf*"))


def test_quantize_needs_llama_quantize(fake_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingFileError, match="llama-quantize not found.*--target llama-quantize"):
        export_gguf("testbed", tmp_path / "q.gguf", llama_cpp=fake_llama, quantize="Q4_K_M")


def test_cli_error_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != LLAMA_CPP_ENV}
    done = subprocess.run([sys.executable, "-c", "from premoe.cli import main; main()", "export", "gguf", "testbed",
                           "--out", str(tmp_path / "t.gguf")], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("premoe: error: llama.cpp not found:") and done.stderr.count("\n") == 1


@pytest.mark.slow
def test_real_llama_cpp_converts_the_testbed(tmp_path):
    """With a real llama.cpp: the GGUF holds the testbed's architecture, counts and tokenizer."""
    if not os.environ.get(LLAMA_CPP_ENV):
        pytest.skip(f"set {LLAMA_CPP_ENV} to a llama.cpp source directory")
    root = find_llama_cpp()
    sys.path.insert(0, str(root / "gguf-py"))
    from gguf import GGUFReader

    out = export_gguf("testbed", tmp_path / "testbed.gguf", outtype="f32").out
    reader = GGUFReader(str(out))

    def field(name):
        f = reader.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    config = json.loads((resolve_model_path("testbed") / "config.json").read_text())
    assert field("general.architecture") == "qwen3moe"
    assert field("qwen3moe.expert_count") == config["num_local_experts"]
    assert field("qwen3moe.expert_used_count") == config["num_experts_per_tok"]
    assert field("tokenizer.ggml.pre") == "gpt-2"
    gate = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_exps.weight")
    assert gate.shape.tolist() == [config["hidden_size"], config["moe_intermediate_size"], config["num_local_experts"]]


@pytest.mark.slow
def test_real_llama_quantize(tmp_path):
    """With llama.cpp's llama-quantize built: --quantize Q4_K_M writes a smaller GGUF of file type Q4_K_M (15)."""
    if not os.environ.get(LLAMA_CPP_ENV):
        pytest.skip(f"set {LLAMA_CPP_ENV} to a llama.cpp source directory")
    from premoe.export import find_quantize

    root = find_llama_cpp()
    try:
        find_quantize(root)
    except MissingFileError:
        pytest.skip("llama-quantize is not built")
    sys.path.insert(0, str(root / "gguf-py"))
    from gguf import GGUFReader

    f16 = export_gguf("testbed", tmp_path / "f16.gguf").out
    q4 = export_gguf("testbed", tmp_path / "q4.gguf", quantize="Q4_K_M").out
    assert q4.stat().st_size < 0.4 * f16.stat().st_size
    field = GGUFReader(str(q4)).fields["general.file_type"]
    assert (field.contents() if hasattr(field, "contents") else field.parts[field.data[0]][0]) == 15
