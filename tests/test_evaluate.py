import json
import math
import random

import pytest
import torch
from click.testing import CliRunner

import tiny
from premoe.data import Source
from premoe.errors import InputError
from premoe.evaluate import Evaluator, evaluate, run_lm_eval
from premoe.metrics import kl_divergence, mean_and_se, perplexity, token_nll

SEQ = 16
KEPT = {0: [0, 2, 5, 7], 1: [1, 2, 3, 6]}


@pytest.fixture(scope="module")
def model():
    return tiny.build("qwen3_moe")


@pytest.fixture(scope="module")
def sources():
    lines = tiny.TEXT.splitlines(keepends=True)
    random.Random(0).shuffle(lines)  # windows that differ, so standard errors are not 0
    return [Source("code", ["".join(lines[:30])], "test"), Source("prose", ["".join(lines[30:])], "test")]


def test_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    expected = [math.log(math.exp(2) + 1 + math.exp(-1)) - 2, math.log(3)]
    assert token_nll(logits, targets).tolist() == pytest.approx(expected)
    assert perplexity(expected) == pytest.approx(math.exp(sum(expected) / 2))
    assert mean_and_se([1.0, 3.0]) == (2.0, 1.0)
    assert kl_divergence(logits, logits).tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl_divergence(p.log(), q.log())) == pytest.approx(by_hand)


def test_perplexity_matches_hand_computation(model, sources):
    ev = Evaluator(model, tiny.tiny_tokenizer(), sources, seq_len=SEQ, max_windows=2, batch_size=1)
    result = ev.evaluate(domains=["code"])
    windows = ev.windows["code"]
    assert windows.shape == (2, SEQ)
    per_window = []
    with torch.no_grad():
        for w in windows:
            log_probs = torch.log_softmax(model(input_ids=w[None]).logits[0], dim=-1)  # (seq, vocab)
            per_window.append(-sum(float(log_probs[t, w[t + 1]]) for t in range(SEQ - 1)) / (SEQ - 1))
    d = result.domains["code"]
    mean = sum(per_window) / 2
    assert d.nll == pytest.approx(mean, rel=1e-5)
    assert d.ppl == pytest.approx(math.exp(mean), rel=1e-5)
    assert d.nll_se == pytest.approx(abs(per_window[0] - per_window[1]) / 2, rel=1e-4)
    assert d.ppl_low < d.ppl < d.ppl_high
    assert d.tokens == 2 * (SEQ - 1) and d.kl == 0.0


def test_masking_changes_ppl_and_kl_is_positive(model, sources):
    ev = Evaluator(model, tiny.tiny_tokenizer(), sources, seq_len=SEQ, max_windows=4)
    full, masked = ev.evaluate(), ev.evaluate(KEPT)
    assert masked.kept == KEPT
    for domain in ("code", "prose"):
        assert masked.domains[domain].kl > 0
        assert masked.domains[domain].nll != pytest.approx(full.domains[domain].nll)
    again = ev.evaluate(KEPT)  # cached reference log-probs give the same answer
    assert again.domains["code"].kl == masked.domains["code"].kl
    assert ev.evaluate({0: list(range(8)), 1: list(range(8))}).domains["code"].kl == pytest.approx(0, abs=1e-6)


def test_reference_cache_budget_does_not_change_results(model, sources):
    cached = Evaluator(model, tiny.tiny_tokenizer(), sources, seq_len=SEQ, max_windows=4, batch_size=2)
    uncached = Evaluator(model, tiny.tiny_tokenizer(), sources, seq_len=SEQ, max_windows=4, batch_size=2, cache_gb=0)
    a, b = cached.evaluate(KEPT), uncached.evaluate(KEPT)
    assert not uncached._cache and cached._cache
    assert a.domains["prose"].kl == pytest.approx(b.domains["prose"].kl, rel=1e-6)
    seeded = Evaluator(model, tiny.tiny_tokenizer(), sources, seq_len=SEQ, max_windows=4, batch_size=2)
    seeded.evaluate()  # the full model's log-probs are the reference: cached without another pass
    assert len(seeded._cache) == len(cached._cache)
    assert seeded.evaluate(KEPT).domains["prose"].kl == pytest.approx(a.domains["prose"].kl, rel=1e-6)


def _prune_in_memory(model, kept):
    """Slice router rows and fused experts: what a compiled checkpoint holds, without touching disk."""
    from premoe.adapters import get_adapter

    for layer in get_adapter(model.config).moe_layers(model):
        idx = torch.tensor(kept[layer.index])
        layer.router.weight = torch.nn.Parameter(layer.router.weight.data[idx].clone())
        layer.experts.gate_up_proj = torch.nn.Parameter(layer.experts.gate_up_proj.data[idx].clone())
        layer.experts.down_proj = torch.nn.Parameter(layer.experts.down_proj.data[idx].clone())
        layer.router.num_experts = layer.experts.num_experts = len(idx)
    return model


def test_masking_equals_pruned_model(model, sources):
    masked = Evaluator(model, tiny.tiny_tokenizer(), sources, seq_len=SEQ, max_windows=3).evaluate(KEPT)
    pruned_model = _prune_in_memory(tiny.build("qwen3_moe"), KEPT)
    pruned = Evaluator(pruned_model, tiny.tiny_tokenizer(), sources, seq_len=SEQ, max_windows=3,
                       reference=model).evaluate()
    for domain in ("code", "prose"):
        assert pruned.domains[domain].window_nll == pytest.approx(masked.domains[domain].window_nll, abs=1e-5)
        assert pruned.domains[domain].kl == pytest.approx(masked.domains[domain].kl, abs=1e-5)


def test_masking_equals_compiled_checkpoint(tiny_qwen3, sources, tmp_path):
    compile_module = pytest.importorskip("premoe.compile")
    from premoe.plan import Plan

    plan = _plan_for(tiny_qwen3, KEPT)
    plan_path = plan.save(tmp_path / "plan.json")
    compile_module.compile_checkpoint(tiny_qwen3, Plan.load(plan_path), tmp_path / "compiled", progress=False)
    masked = evaluate(tiny_qwen3, sources, plan=plan_path, seq_len=SEQ, max_windows=3)
    compiled = evaluate(tmp_path / "compiled", sources, reference=tiny_qwen3, seq_len=SEQ, max_windows=3)
    for domain in ("code", "prose"):
        assert compiled.domains[domain].window_nll == pytest.approx(masked.domains[domain].window_nll, abs=1e-5)
        assert compiled.domains[domain].kl == pytest.approx(masked.domains[domain].kl, abs=1e-5)


def _plan_for(model_dir, kept):
    from premoe.modeling import model_identity
    from premoe.plan import Plan

    return Plan(model_identity(model_dir), "Qwen3-MoE", 8, 2, [0, 1], kept, {l: list(range(8)) for l in kept},
                {"scorer": "test", "ranking": "local"}, "specialist:code", {})


def test_evaluate_refuses_a_plan_for_another_model(tiny_qwen3, sources, tmp_path):
    from premoe.errors import PlanError

    plan = _plan_for(tiny_qwen3, KEPT)
    plan.model = {**plan.model, "name": "other", "config_hash": "0" * 16}
    with pytest.raises(PlanError, match="made for other"):
        evaluate(tiny_qwen3, sources, plan=plan, seq_len=SEQ, max_windows=1)


def test_unknown_domain_is_a_clear_error(model, sources):
    ev = Evaluator(model, tiny.tiny_tokenizer(), sources, seq_len=SEQ, max_windows=1)
    with pytest.raises(InputError, match="no evaluation data for math"):
        ev.evaluate(domains=["math"])


def test_lm_eval_missing_says_how_to_install(monkeypatch, tiny_qwen3):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(InputError, match=r"pip install 'premoe\[eval\]'"):
        run_lm_eval(tiny_qwen3, ["hellaswag"])


def test_cli_eval_json_with_plan(tiny_qwen3, tmp_path):
    from premoe.cli import cli

    text = tmp_path / "code.txt"
    text.write_text(tiny.TEXT)
    plan_path = _plan_for(tiny_qwen3, KEPT).save(tmp_path / "plan.json")
    out = tmp_path / "eval.json"
    args = ["eval", str(tiny_qwen3), "--data", f"code={text}", "--seq-len", str(SEQ), "--max-windows", "2",
            "--json", str(out)]
    result = CliRunner().invoke(cli, args + ["--plan", str(plan_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert "specialist:code" in result.stdout  # the table is still printed
    stdout_only = CliRunner().invoke(cli, args[:-1] + ["-", "--plan", str(plan_path)])
    again = json.loads(stdout_only.stdout)
    assert [r["domains"] for r in again["results"]] == [r["domains"] for r in data["results"]]
    assert [r["label"] for r in data["results"]] == ["full", "specialist:code"]
    full, pruned = (r["domains"]["code"] for r in data["results"])
    assert full["kl"] == 0.0 and pruned["kl"] > 0 and full["windows"] == 2


def math_choice_task(folder, count: int = 48) -> str:
    """An offline lm-eval task from the shipped math test split: which of 4 expressions answers this problem?

    A problem and "Answer:" are the context; the choices are its own expression (" 7 * 62", which copies the
    problem's numbers) and the expressions of the next three problems (chance: 25%). The testbed cannot do
    the arithmetic itself, so the task asks for what it learned: reading the problem into the answer.
    """
    import gzip
    import re

    from premoe import testbed

    with gzip.open(testbed.corpus_path() / "math" / "test.jsonl.gz", "rt") as f:
        text = "".join(json.loads(line)["text"] for line in f)
    pairs = re.findall(r"(Problem \d+\. [^\n]+)\nAnswer:( [^=\n]+?) =", text)[: count + 3]
    rows = [{"question": f"{problem}\nAnswer:", "choices": [expr] + [e for _, e in pairs[i + 1:i + 4]], "answer": 0}
            for i, (problem, expr) in enumerate(pairs[:count])]
    (folder / "math.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "math.yaml").write_text(
        "task: premoe_math\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'math.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    return "premoe_math"


def test_lm_eval_full_testbed_beats_random_experts(tmp_path, monkeypatch):
    """lm-evaluation-harness for real (CI installs premoe[eval]), offline on a local task from the math split.

    Measured (torch 2.13 CPU, lm_eval 0.4.13): the full testbed 41/48 (acc 0.854), a random 8 of 32 experts per
    layer 19/48 (0.396). About 25 s of CPU (lm_eval import, two runs of 192 loglikelihood requests).
    """
    pytest.importorskip("lm_eval")
    import torch

    from premoe.adapters import get_adapter
    from premoe.modeling import load_model, load_tokenizer, model_identity
    from premoe.plan import Plan

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = math_choice_task(tmp_path)
    net, tokenizer = load_model("testbed"), load_tokenizer("testbed")
    adapter = get_adapter(net.config)
    layers = [l.index for l in adapter.moe_layers(net)]
    generator = torch.Generator().manual_seed(0)
    kept = {l: sorted(torch.randperm(32, generator=generator)[:8].tolist()) for l in layers}
    random_plan = Plan(model_identity("testbed"), adapter.name, 32, 4, layers, kept,
                       {l: kept[l] + [e for e in range(32) if e not in kept[l]] for l in layers},
                       {"scorer": "random", "ranking": "local"}, "random", {})
    full = run_lm_eval("testbed", [task], include_path=tmp_path, batch_size=16, loaded=(net, tokenizer))
    pruned = run_lm_eval("testbed", [task], plan=random_plan, include_path=tmp_path, batch_size=16,
                         loaded=(net, tokenizer))
    full_acc, random_acc = full[task]["acc,none"], pruned[task]["acc,none"]
    assert full_acc >= 0.8, full_acc  # measured 41/48 = 0.854 (chance 0.25)
    assert full_acc - random_acc >= 0.35, (full_acc, random_acc)  # measured 0.854 - 0.396 (19/48) = 0.458
