"""Measure the testbed and write its model card; copy model + corpus splits into the package.

``premoe testbed card`` is the script behind every number in the card: per-
domain validation and test perplexity (the first ``windows`` non-overlapping
256-token windows of each split) and, per domain and MoE layer, how many
experts cover 90% of the routing mass (router softmax) on the calib split.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from premoe import testbed
from premoe.data import read_texts

SEQ_LEN = 256
SHIPPED_SPLITS = ("calib", "val", "test")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json", "training.json", "loss.png")


def split_sources(corpus: Path, domains: list[str], split: str) -> list:
    from premoe.data import Source

    return [Source(d, read_texts(corpus / d / f"{split}.jsonl.gz"), f"{corpus}/{d}/{split}") for d in domains]


def measure(model_name: str | Path, corpus: Path, windows: int) -> dict:
    from premoe.evaluate import Evaluator
    from premoe.modeling import load_model, load_tokenizer
    from premoe.profile import ProfileParams, profile_model

    model, tokenizer = load_model(model_name), load_tokenizer(model_name)
    manifest = json.loads((corpus / "manifest.json").read_text())
    trained = [d for d, info in manifest["domains"].items() if info["trained"]]
    perplexity: dict[str, dict[str, float]] = {d: {} for d in trained}
    for split in ("val", "test"):
        result = Evaluator(model, tokenizer, split_sources(corpus, trained, split), seq_len=SEQ_LEN,
                           max_windows=windows).evaluate(kl=False)
        for d in trained:
            perplexity[d][split] = round(result.domains[d].ppl, 3)
    sources = split_sources(corpus, trained, "calib")
    profile = profile_model(model_name, sources, ["router_mass"], ProfileParams(max_tokens=16384), loaded=(model, tokenizer))
    coverage = {d: profile.coverage(d, "router_mass", 0.9) for d in trained}
    return {"windows": windows, "seq_len": SEQ_LEN, "perplexity": perplexity, "coverage90": coverage,
            "moe_layers": profile.moe_layers, "num_experts": profile.num_experts}


def write_card(model_name: str | Path = "testbed", corpus: Path | None = None, windows: int = 64) -> dict:
    """Measure and write ``card.json`` + ``README.md`` into the model directory."""
    from premoe.modeling import read_config, resolve_model_path

    path = resolve_model_path(model_name)
    corpus = corpus or testbed.corpus_path()
    result = measure(model_name, corpus, windows)
    (path / "card.json").write_text(json.dumps(result, indent=1) + "\n")
    (path / "README.md").write_text(render_card(read_config(path), result, corpus, path))
    return result


def render_card(config: dict, result: dict, corpus: Path, path: Path) -> str:
    from safetensors import safe_open

    training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    params = sum(math.prod(s) for s in shapes.values())
    expert_params = sum(math.prod(s) for k, s in shapes.items() if ".experts." in k)
    manifest = json.loads((corpus / "manifest.json").read_text())
    rows = "\n".join(f"| {d} | {p['val']:.2f} | {p['test']:.2f} | {' / '.join(map(str, result['coverage90'][d]))} |"
                     for d, p in result["perplexity"].items())
    sources = "\n".join(f"| {d} | {i['description']} | {', '.join(f'{k} {v}' for k, v in i['packages'].items()) or '-'} "
                        f"| {i['licence']} | {'yes' if i['trained'] else 'no (unseen)'} |"
                        for d, i in manifest["domains"].items())
    return f"""# premoe testbed: a small Qwen3-MoE trained offline by premoe

Architecture: `Qwen3MoeForCausalLM` (transformers), {config['num_hidden_layers']} layers, all MoE, hidden
{config['hidden_size']}, {config['num_attention_heads']} heads ({config['num_key_value_heads']} KV),
{config.get('num_local_experts') or config.get('num_experts')} routed experts per layer, top-{config['num_experts_per_tok']}
(renormalised), expert width {config['moe_intermediate_size']}, vocabulary {config['vocab_size']} (byte-level BPE),
tied embeddings. {params / 1e6:.1f}M parameters, {expert_params / 1e6:.1f}M of them in experts. Stored in bf16.

Training: {training.get('steps', '?')} steps of {training.get('config', {}).get('batch_size', '?')} x
{training.get('config', {}).get('seq_len', '?')} tokens = {training.get('train_tokens', 0) / 1e6:.1f}M tokens,
domains sampled uniformly, AdamW lr {training.get('config', {}).get('lr', '?')} cosine, router aux loss
{config.get('router_aux_loss_coef')}, fp32 on a 2-core CPU, {training.get('wall_seconds', 0) / 60:.0f} min wall time
(`premoe testbed train`; loss curve in `loss.png`). The run was resumed from its checkpoints twice: at step 750 with
the schedule's total shortened from 6000 to 5000 steps, and at step 1000 with one thread instead of two, to finish
within its time budget while sharing the machine. Validation loss was still falling slowly at the end (about 2-4%
perplexity per 250 steps in the last 1000): a longer run would give a better model.

## Per-domain perplexity and expert specialisation

Perplexity over the first {result['windows']} windows of {result['seq_len']} tokens of each split;
"experts for 90%" = per MoE layer, how many of the {result['num_experts']} experts hold 90% of the domain's routing
mass (router softmax, calib split). Reproduce: `premoe testbed card`.

| domain | val ppl | test ppl | experts for 90% (layer {' / '.join(map(str, result['moe_layers']))}) |
|---|---|---|---|
{rows}

## Corpus (offline, from Debian packages; `premoe testbed corpus`)

| domain | text | packages | licence | trained |
|---|---|---|---|---|
{sources}

Splits are by document (hash of the document id): no document is in two splits. The math domain is synthetic
(generated word problems, seed 1234). Only calib/val/test text ships with premoe.
"""


def ship(model: Path, corpus: Path) -> None:
    """Copy the trained checkpoint and the calib/val/test splits into the package directory."""
    ship_model(model)
    ship_corpus(corpus)


def ship_model(model: Path) -> None:
    target_model = testbed.path()
    missing = [f for f in MODEL_FILES[:5] if not (model / f).exists()]
    if missing:
        from premoe.errors import MissingFileError

        raise MissingFileError(f"{model} lacks {', '.join(missing)}; train it with `premoe testbed train`")
    shutil.rmtree(target_model, ignore_errors=True)
    target_model.mkdir(parents=True)
    for name in MODEL_FILES:
        if (model / name).exists():
            shutil.copy2(model / name, target_model / name)


def ship_corpus(corpus: Path) -> None:
    target_corpus = testbed.corpus_path()
    shutil.rmtree(target_corpus, ignore_errors=True)
    manifest = json.loads((corpus / "manifest.json").read_text())
    for domain, info in manifest["domains"].items():
        (target_corpus / domain).mkdir(parents=True)
        for split in SHIPPED_SPLITS:
            shutil.copy2(corpus / domain / f"{split}.jsonl.gz", target_corpus / domain / f"{split}.jsonl.gz")
        info["shipped_splits"] = list(SHIPPED_SPLITS)
    (target_corpus / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
