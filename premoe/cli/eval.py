"""`premoe eval`: per-domain perplexity (± SE) and KL divergence of a model, a compiled checkpoint, or plans."""
from __future__ import annotations

import click

from premoe.cli.options import NON_NEGATIVE, POSITIVE, SEQ_LEN, json_option, model_input


@click.command("eval")
@click.argument("model")
@click.option("--plan", "plans", multiple=True, type=click.Path(),
              help="Plan JSON applied by masking (repeatable: the model loads once for all of them).")
@click.option("--data", "data", multiple=True,
              help="NAME=PATH of held-out text, or testbed domains (their 'test' split). Default for testbed: testbed.")
@click.option("--reference", help="Checkpoint to measure KL against (e.g. the original of a compiled MODEL). "
                                  "Default: MODEL without the plan.")
@click.option("--seq-len", default=256, show_default=True, type=SEQ_LEN, help="Tokens per window.")
@click.option("--max-windows", type=NON_NEGATIVE, default=128, show_default=True, help="Windows per domain (0: all).")
@click.option("--batch-size", default=8, show_default=True, type=POSITIVE, help="Windows per forward pass.")
@click.option("--no-kl", is_flag=True, help="Skip the KL divergence (saves one reference pass).")
@click.option("--lm-eval", "lm_eval_tasks", help="Comma-separated lm-evaluation-harness tasks to run instead "
                                                 "(needs: pip install 'premoe[eval]').")
@click.option("--lm-eval-limit", type=POSITIVE, help="Examples per lm-eval task (quick checks).")
@click.option("--lm-eval-include", type=click.Path(exists=True, file_okay=False),
              help="Directory of extra lm-eval task YAMLs (e.g. local data via dataset_path: json, for offline use).")
@click.option("--generation", type=NON_NEGATIVE, default=0, show_default=True,
              help="Also greedy-decode N held-out problems of the 'math' data: exact-match and repetition rate.")
@json_option("Also write the results as JSON to FILE ('-' or a bare --json: stdout instead of the tables).")
@click.option("--force", is_flag=True, help="Replace the --json FILE if it exists and premoe wrote it.")
def command(model, plans, data, reference, seq_len, max_windows, batch_size, no_kl, lm_eval_tasks, lm_eval_limit,
            lm_eval_include, generation, json_out, force) -> None:
    """Evaluate MODEL (and each --plan applied to it) on every --data domain.

    \b
    premoe eval testbed --plan python-50.json
    premoe eval python-50/ --data python --reference testbed
    premoe eval ckpt/ --data code=held_out.jsonl --plan code-25.json --json eval.json
    premoe eval testbed --plan python-50.json --lm-eval hellaswag,arc_easy --lm-eval-limit 200
    premoe eval testbed --plan python-50.json --lm-eval mytask --lm-eval-include tasks/
    premoe eval testbed --data math --plan math-50.json --generation 64
    """
    from premoe.data import data_paths, parse_sources
    from premoe.errors import InputError
    from premoe.evaluate import Evaluator, run_lm_eval
    from premoe.fileio import check_output, emit_json
    from premoe.modeling import is_testbed, load_model, load_tokenizer, model_identity
    from premoe.plan import Plan
    from premoe.report import paired_delta

    from premoe.adapters import get_adapter

    inputs = [model_input(model), model_input(reference), *plans, *data_paths(data), lm_eval_include]
    if json_out not in (None, "-"):
        check_output(json_out, inputs=inputs, force=force, kind="file")  # before the work, not after
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
        emit_json(json_out or "-", {"model": identity, "lm_eval": results}, kind="lm-eval", force=force, inputs=inputs)
        return
    if not data:
        if not is_testbed(identity["name"]):
            raise InputError("give held-out text with --data NAME=PATH (one per domain)")
        data = ("testbed",)
    sources = parse_sources(list(data), tokenizer=tokenizer, split="test",
                            max_tokens=max_windows * seq_len if max_windows else None)
    evaluator = Evaluator(net, tokenizer, sources, reference=load_model(reference) if reference else None,
                          seq_len=seq_len, max_windows=max_windows or None, batch_size=batch_size, name=model,
                          progress=json_out != "-")
    if generation:
        _generation(net, tokenizer, sources, generation, loaded_plans)
    # MODEL itself: "full" only when it is not measured against another checkpoint (a compiled one is not full)
    first = "full" if reference is None else (identity.get("name") or str(model))
    results = [evaluator.evaluate(kl=not no_kl, label=first)]
    results += [evaluator.evaluate(plan.kept, kl=not no_kl, label=plan.target) for plan in loaded_plans]
    emit_json(json_out, {"model": identity, "results": [r.to_dict() for r in results]}, kind="eval", force=force,
              inputs=inputs)
    if json_out == "-":
        return
    full = results[0]
    for result in results:
        click.echo(result.table())
        if result is not full:
            deltas = {d: paired_delta(vars(result.domains[d]), vars(full.domains[d])) for d in result.domains}
            click.echo(f"  Δ ppl vs {full.label} (± SE, paired over windows): "
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
