"""`premoe eval`: per-domain perplexity (± SE) and KL divergence of a model, a compiled checkpoint, or plans."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("eval")
@click.argument("model")
@click.option("--plan", "plans", multiple=True, type=click.Path(),
              help="Plan JSON applied by masking (repeatable: the model loads once for all of them).")
@click.option("--data", "data", multiple=True,
              help="NAME=PATH of held-out text, or testbed domains (their 'test' split). Default for testbed: testbed.")
@click.option("--reference", help="Checkpoint to measure KL against (e.g. the original of a compiled MODEL). "
                                  "Default: MODEL without the plan.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per window.")
@click.option("--max-windows", type=int, default=128, show_default=True, help="Windows per domain (0: all).")
@click.option("--batch-size", default=8, show_default=True, help="Windows per forward pass.")
@click.option("--no-kl", is_flag=True, help="Skip the KL divergence (saves one reference pass).")
@click.option("--lm-eval", "lm_eval_tasks", help="Comma-separated lm-evaluation-harness tasks to run instead "
                                                 "(needs: pip install 'premoe[eval]').")
@click.option("--lm-eval-limit", type=int, help="Examples per lm-eval task (quick checks).")
@click.option("--lm-eval-include", type=click.Path(exists=True, file_okay=False),
              help="Directory of extra lm-eval task YAMLs (e.g. local data via dataset_path: json, for offline use).")
@click.option("--generation", type=int, default=0, show_default=True,
              help="Also greedy-decode N held-out problems of the 'math' data: exact-match and repetition rate.")
@click.option("--json", "json_out", type=click.Path(), help="Also write the results as JSON to this file ('-': stdout only).")
def command(model, plans, data, reference, seq_len, max_windows, batch_size, no_kl, lm_eval_tasks, lm_eval_limit,
            lm_eval_include, generation, json_out) -> None:
    """Evaluate MODEL (and each --plan applied to it) on every --data domain.

    \b
    premoe eval testbed --plan python-50.json
    premoe eval python-50/ --data python --reference testbed
    premoe eval ckpt/ --data code=held_out.jsonl --plan code-25.json --json eval.json
    premoe eval testbed --plan python-50.json --lm-eval hellaswag,arc_easy --lm-eval-limit 200
    premoe eval testbed --plan python-50.json --lm-eval mytask --lm-eval-include tasks/
    premoe eval testbed --data math --plan math-50.json --generation 64
    """
    from premoe.data import parse_sources
    from premoe.errors import InputError
    from premoe.evaluate import Evaluator, run_lm_eval
    from premoe.modeling import load_model, load_tokenizer, model_identity
    from premoe.plan import Plan
    from premoe.report import paired_delta

    from premoe.adapters import get_adapter

    loaded_plans = [Plan.load(p) for p in plans]
    identity = model_identity(model)
    for plan in loaded_plans:
        plan.check_model(identity)  # validate_plan against the config before the weights load
    net, tokenizer = load_model(model), load_tokenizer(model)
    for plan in loaded_plans:  # and against the loaded model's MoE layers
        plan.check_model(identity, [l.index for l in get_adapter(net.config).moe_layers(net)])
    if lm_eval_tasks:
        tasks = [t for t in lm_eval_tasks.split(",") if t]
        results = {plan.target if plan else "full": run_lm_eval(model, tasks, plan=plan, limit=lm_eval_limit,
                                                                batch_size=batch_size, include_path=lm_eval_include,
                                                                loaded=(net, tokenizer))
                   for plan in [None, *loaded_plans]}
        click.echo(json.dumps(results, indent=1, default=str))
        return
    if not data:
        if identity["name"] != "testbed":
            raise InputError("give held-out text with --data NAME=PATH (one per domain)")
        data = ("testbed",)
    sources = parse_sources(list(data), tokenizer=tokenizer, split="test")
    evaluator = Evaluator(net, tokenizer, sources, reference=load_model(reference) if reference else None,
                          seq_len=seq_len, max_windows=max_windows or None, batch_size=batch_size, name=model,
                          progress=json_out != "-")
    if generation:
        _generation(net, tokenizer, sources, generation, loaded_plans)
    results = [evaluator.evaluate(kl=not no_kl)]
    results += [evaluator.evaluate(plan.kept, kl=not no_kl, label=plan.target) for plan in loaded_plans]
    if json_out:
        text = json.dumps({"model": identity, "results": [r.to_dict() for r in results]}, indent=1)
        if json_out == "-":
            click.echo(text)
            return
        Path(json_out).write_text(text + "\n")
    full = results[0]
    for result in results:
        click.echo(result.table())
        if result is not full:
            deltas = {d: paired_delta(vars(result.domains[d]), vars(full.domains[d])) for d in result.domains}
            click.echo("  Δ ppl vs full (± SE, paired over windows): "
                       + ", ".join(f"{d} {delta}" for d, delta in deltas.items()))
        click.echo("")


def _generation(net, tokenizer, sources, count: int, plans) -> None:
    """Exact-match and repetition rate of greedy answers to the 'math' source's problems, full model and plans."""
    from premoe.errors import InputError
    from premoe.generation import generation_metrics, math_problems

    source = next((s for s in sources if s.name == "math"), None)
    problems = math_problems(source.texts, count) if source else []
    if not problems:
        raise InputError("--generation needs a 'math' data source of numbered problems with answer lines "
                         "(for the testbed: --data math)")
    for label, kept in [("full", None)] + [(plan.target, plan.kept) for plan in plans]:
        metrics = generation_metrics(net, tokenizer, problems, kept=kept)
        click.echo(f"generation [{label}]: exact match {metrics['math_exact']:.1%} (set up right "
                   f"{metrics['math_setup']:.1%}) on {metrics['problems']} math problems, "
                   f"repetition {metrics['repetition']:.3f}")
