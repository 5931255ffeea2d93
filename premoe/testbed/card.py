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
    scorer = coverage_scorer(model.config.model_type)
    profile = profile_model(model_name, sources, [scorer], ProfileParams(max_tokens=16384), loaded=(model, tokenizer))
    coverage = {d: profile.coverage(d, scorer, 0.9) for d in trained}
    return {"windows": windows, "seq_len": SEQ_LEN, "perplexity": perplexity, "coverage90": coverage,
            "coverage_scorer": scorer, "moe_layers": profile.moe_layers, "num_experts": profile.num_experts}


def coverage_scorer(model_type: str) -> str:
    """What the card's "experts for 90%" counts: softmax routing mass, or for a sigmoid router (whose scores do
    not sum to one and stay near 0.5 for unchosen experts) the tokens the router really sends to each expert."""
    return "frequency" if model_type == "deepseek_v3" else "router_mass"


def write_card(model_name: str | Path = "testbed", corpus: Path | None = None, windows: int = 64) -> dict:
    """Measure and write ``card.json`` + ``README.md`` into the model directory (``testbed``, ``testbed-dsv3`` or a path)."""
    from premoe.modeling import read_config, resolve_model_path

    path = resolve_model_path(model_name)
    corpus = corpus or testbed.corpus_path()
    result = measure(model_name, corpus, windows)
    (path / "card.json").write_text(json.dumps(result, indent=1) + "\n")
    (path / "README.md").write_text(render_card(read_config(path), result, corpus, path, str(model_name)))
    return result


def render_card(config: dict, result: dict, corpus: Path, path: Path, name: str = "testbed") -> str:
    from safetensors import safe_open

    training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    params = sum(math.prod(s) for s in shapes.values())
    expert_params = sum(math.prod(s) for k, s in shapes.items() if ".experts." in k and ".shared_experts." not in k)
    manifest = json.loads((corpus / "manifest.json").read_text())
    rows = "\n".join(f"| {d} | {p['val']:.2f} | {p['test']:.2f} | {' / '.join(map(str, result['coverage90'][d]))} |"
                     for d, p in result["perplexity"].items())
    sources = "\n".join(f"| {d} | {i['description']} | {', '.join(f'{k} {v}' for k, v in i['packages'].items()) or '-'} "
                        f"| {i['licence']} | {'yes' if i['trained'] else 'no (unseen)'} |"
                        for d, i in manifest["domains"].items())
    head = _dsv3_head if config.get("model_type") == "deepseek_v3" else _qwen3_moe_head
    what = {"router_mass": "routing\nmass (router softmax,", "frequency": "routed\ntokens (the router's real top-k choice,"}[
        result.get("coverage_scorer", "router_mass")]
    return head(config, training, params, expert_params) + f"""
## Per-domain perplexity and expert specialisation

Perplexity over the first {result['windows']} windows of {result['seq_len']} tokens of each split;
"experts for 90%" = per MoE layer, how many of the {result['num_experts']} experts hold 90% of the domain's {what} calib split). Reproduce: `premoe testbed card{'' if name == 'testbed' else ' ' + name}`.

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


def _qwen3_moe_head(config: dict, training: dict, params: int, expert_params: int) -> str:
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
"""


def _dsv3_head(config: dict, training: dict, params: int, expert_params: int) -> str:
    cfg = training.get("config", {})
    resumes = "; ".join(f"at step {r['step']} (schedule total {r['max_steps']} steps, {r['threads']} thread(s))"
                        for r in training.get("resumes", []))
    finished = training.get("steps") == cfg.get("max_steps")
    imbalance = training.get("bias_imbalance_history") or [[None, []]]
    return f"""# premoe testbed-dsv3: a small DeepSeek-V3 (sigmoid router, correction bias, groups) trained by premoe

Architecture: `DeepseekV3ForCausalLM` (transformers), {config['num_hidden_layers']} layers: the first
{config['first_k_dense_replace']} with a dense MLP (width {config['intermediate_size']}), the rest MoE; hidden {config['hidden_size']},
{config['num_attention_heads']} heads of multi-head latent attention (KV rank {config['kv_lora_rank']}). Each MoE layer:
{config['n_routed_experts']} routed experts (width {config['moe_intermediate_size']}) in {config['n_group']} groups, top-{config['num_experts_per_tok']}
chosen by sigmoid score + `e_score_correction_bias` from the best {config['topk_group']} groups, weights = the
sigmoid scores renormalised x {config['routed_scaling_factor']}, plus {config['n_shared_experts']} always-on shared expert.
Vocabulary {config['vocab_size']} (the first testbed's tokenizer: same token ids), tied embeddings.
{params / 1e6:.1f}M parameters, {expert_params / 1e6:.1f}M of them in routed experts. Stored in bf16; the routers
(gate weight and correction bias) in fp32, as in DeepSeek-V3's checkpoints.

Training: {training.get('steps', '?')} steps of {cfg.get('batch_size', '?')} x {cfg.get('seq_len', '?')} tokens
= {training.get('train_tokens', 0) / 1e6:.1f}M tokens{'' if finished else f" (of a {cfg.get('max_steps')}-step schedule: exported before the end)"},
domains sampled uniformly, AdamW lr {cfg.get('lr', '?')} cosine, no auxiliary loss: after every step each expert's
correction bias moves by {cfg.get('bias_update_speed')} towards balance (+ if it got fewer tokens than the mean
in that step, - if more; DeepSeek-V3's auxiliary-loss-free balancing). Max/mean expert load per MoE layer in the
last logged step: {imbalance[-1][1]}. fp32 on a CPU shared with other jobs, {training.get('wall_seconds', 0) / 60:.0f} min
wall time (`premoe testbed train --arch deepseek_v3`; loss curve in `loss.png`).
{' '.join(filter(None, [f'Resumed from its checkpoints {resumes}.' if resumes else '',
                          _val_trend(training.get('val_history', []), cfg.get('eval_windows'))]))}
"""


def _val_trend(val_history: list, windows: int | None, span: int = 2) -> str:
    """How much validation perplexity still fell over the last ``span`` evaluations (a convergence statement)."""
    if len(val_history) <= span:
        return ""
    (start, before), (end, after) = val_history[-1 - span], val_history[-1]
    changes = {d: math.exp(after[d] - before[d]) - 1 for d in after}
    mean = math.exp(sum(after[d] - before[d] for d in after) / len(after)) - 1
    return (f"Validation perplexity ({windows} windows per domain) changed by {mean:+.1%} (geometric mean over domains; "
            f"{', '.join(f'{d} {c:+.1%}' for d, c in changes.items())}) from step {start} to step {end}.")


def ship(model: Path, corpus: Path) -> None:
    """Copy the trained checkpoint and the calib/val/test splits into the package directory."""
    ship_model(model)
    ship_corpus(corpus)


def ship_model(model: Path, name: str = "testbed") -> None:
    """Copy a trained checkpoint into the package folder of the shipped testbed ``name``."""
    from premoe.modeling import shipped_dir

    target_model = shipped_dir(name)
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
