"""`premoe export gguf`: convert a checkpoint to GGUF with llama.cpp's own converter (and quantize it)."""
from __future__ import annotations

import json

import click


@click.group("export")
def command() -> None:
    """Export a checkpoint to another runtime's format."""


@command.command("gguf")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(), help="The .gguf file to write.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Tensor type the converter writes (before --quantize).")
@click.option("--quantize", metavar="TYPE", help="Then run llama-quantize to TYPE (Q4_K_M, Q4_0, Q5_K_M, ...).")
@click.option("--llama-cpp", "llama_cpp", type=click.Path(), envvar="PREMOE_LLAMA_CPP",
              help="llama.cpp source directory (holds convert_hf_to_gguf.py; build/bin for llama-quantize). "
                   "Default: $PREMOE_LLAMA_CPP.")
@click.option("--python", metavar="EXE", help="Python that runs the converter (default: this one).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def gguf(model, out, outtype, quantize, llama_cpp, python, force, as_json) -> None:
    """Convert MODEL (a compiled checkpoint, any HF checkpoint, or `testbed`) to one GGUF file.

    \b
    premoe export gguf python-50/ --out python-50.gguf --llama-cpp ~/llama.cpp
    premoe export gguf python-50/ --out python-50-q4.gguf --quantize Q4_K_M
    """
    from premoe.export import export_gguf

    done = export_gguf(model, out, llama_cpp=llama_cpp, outtype=outtype, quantize=quantize, python=python,
                       force=force)
    if as_json:
        click.echo(json.dumps({"out": str(done.out), "outtype": done.outtype, "quantize": done.quantize,
                               "bytes": done.nbytes, "pre_tokenizer_fallback": done.pre_tokenizer_fallback}))
    else:
        click.echo(done.summary())
