"""Reconstruction-guided selection: routing as compiled, exact small cases, the greedy search, the hidden recorder."""
import pytest
import torch

import tiny
from premoe.adapters import get_adapter
from premoe.capture import HiddenRecorder, RouterCapture
from premoe.scores import PRESETS, RouterBatch, parse_scorer
from premoe.select import (LayerSample, Routing, combine, eliminate, layer_sample, order_utility, refine,
                           reconstruction_error, reconstruction_utility, route, routing_of)


def test_route_masks_dropped_experts_and_renormalises_like_the_compiled_model():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    alive = torch.tensor([False, True, True, True])
    selected, gates = route(logits, alive, Routing(top_k=2, renormalise=False))
    assert selected.tolist() == [[1, 2]]
    # softmax over the kept experts only: e^2, e^1 over e^2 + e^1 + e^0
    z = torch.tensor([2.0, 1.0, 0.0]).exp()
    assert torch.allclose(gates, (z[:2] / z.sum()).unsqueeze(0).to(gates.dtype))
    _, renormalised = route(logits, alive, Routing(top_k=2, renormalise=True))
    assert torch.allclose(renormalised, (z[:2] / z[:2].sum()).unsqueeze(0).to(gates.dtype))


def test_route_uses_the_correction_bias_for_the_choice_but_not_the_gate():
    logits = torch.tensor([[0.0, 0.0, 2.0]])
    bias = torch.tensor([1.0, 0.0, 0.0])
    selected, gates = route(logits, torch.ones(3, dtype=torch.bool),
                            Routing(top_k=1, scoring="sigmoid", renormalise=False, correction_bias=bias))
    assert selected.tolist() == [[0]]  # sigmoid(0) + 1 = 1.5 beats sigmoid(2) = 0.88
    assert gates.item() == pytest.approx(0.5)


def test_combine_is_the_gate_weighted_sum_of_the_selected_outputs():
    outputs = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)  # (tokens, experts, hidden)
    y = combine(outputs, torch.tensor([[2, 0]]), torch.tensor([[0.25, 0.75]]))
    assert y.tolist() == [[0.25 * 8 + 0.75 * 0, 0.25 * 9 + 0.75 * 1, 0.25 * 10 + 0.75 * 2, 0.25 * 11 + 0.75 * 3]]


def twins_sample() -> LayerSample:
    """4 experts, top-1: experts 0 and 1 compute the same thing, 2 and 3 differ; each is some token's first choice."""
    torch.manual_seed(0)
    prefs = [[3.0, 2.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 2.0], [0.0, 0.0, 2.0, 3.0]]
    logits = torch.tensor(prefs).repeat(5, 1)  # (20, 4)
    outputs = torch.randn(20, 4, 8)
    outputs[:, 1] = outputs[:, 0]
    return LayerSample(logits, outputs)


def test_a_duplicate_expert_goes_first_and_costs_nothing():
    sample, routing = twins_sample(), Routing(top_k=1)
    order = eliminate(sample, routing)
    assert sorted(order) == [0, 1, 2, 3]
    assert order[3] in (0, 1)  # the first expert removed is one of the twins
    assert reconstruction_error(sample, order[:3], routing) == 0.0
    assert reconstruction_error(sample, [0, 1, 2], routing) > 0.0  # dropping a non-twin costs


def test_each_greedy_step_is_the_best_single_removal_recomputed_from_scratch():
    torch.manual_seed(1)
    sample = LayerSample(torch.randn(64, 6) * 2, torch.randn(64, 6, 5))
    for routing in (Routing(top_k=2, renormalise=True), Routing(top_k=2, renormalise=False)):
        order = eliminate(sample, routing)
        alive = list(range(6))
        for removed in reversed(order[2:]):  # the elimination sequence
            costs = {j: reconstruction_error(sample, [e for e in alive if e != j], routing) for j in alive}
            assert costs[removed] == pytest.approx(min(costs.values()), rel=1e-5, abs=1e-6)
            alive.remove(removed)


def test_grouped_routing_keeps_groups_even_at_every_multiple_of_n_group():
    torch.manual_seed(2)
    sample = LayerSample(torch.randn(50, 8), torch.randn(50, 8, 4))
    order = eliminate(sample, Routing(top_k=2, n_group=2))
    for m in (4, 6, 8):
        assert sorted(e // 4 for e in order[:m]).count(0) == m // 2
    assert len(order) == 8 and len(set(order)) == 8


def test_order_utility_ranks_the_order():
    assert order_utility([2, 0, 1]).tolist() == [2.0, 1.0, 3.0]


@pytest.fixture(scope="module")
def model():
    return tiny.build("qwen3_moe", num_experts=8, num_experts_per_tok=2)


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(tiny.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_hidden_recorder_keeps_every_stride_th_router_input_up_to_the_limit(model):
    adapter = get_adapter(model.config)
    seen = {}
    layer = adapter.moe_layers(model)[0]

    def keep_input(module, args, output) -> None:  # returns None: the router's output is left alone
        seen.setdefault("x", args[0].reshape(-1, 32).clone())

    handle = layer.router.register_forward_hook(keep_input)
    with HiddenRecorder(model, adapter, tokens=10, stride=3) as rec, torch.no_grad():
        model(input_ids=ids(2, 16))
    handle.remove()
    assert rec.full and sorted(rec.hidden) == [l.index for l in adapter.moe_layers(model)]
    assert torch.equal(rec.hidden[layer.index], seen["x"][::3][:10])
    with torch.no_grad():
        model(input_ids=ids(2, 16))  # hooks are gone: nothing more is recorded
    assert rec.hidden[layer.index].shape == (10, 32)


def test_greedy_then_swaps_reconstructs_better_than_top_m_of_any_scorer(model):
    adapter = get_adapter(model.config)
    tokens = ids(8, 32, seed=3)
    scorers = [PRESETS[n] for n in ("peu", "tcess", "tcess_top1", "frequency", "router_mass", "reap", "ean_sum")]
    with HiddenRecorder(model, adapter, tokens=256) as rec, RouterCapture(model, adapter, scorers) as cap:
        cap.run(tokens)
    utility = reconstruction_utility(model, adapter, rec.hidden)  # (layers, experts)
    m = 4
    better = 0
    for position, layer in enumerate(adapter.moe_layers(model)):
        sample, routing = layer_sample(adapter, layer, rec.hidden[layer.index]), routing_of(adapter, model.config, layer)
        greedy = reconstruction_error(sample, refine(sample, utility[position].topk(m).indices.tolist(), routing),
                                      routing)
        for spec in scorers:
            row = cap.stats.sums[spec.name][position] / (cap.stats.routed[position].clamp(min=1)
                                                        if spec.per_routed_token else 1)
            other = reconstruction_error(sample, row.topk(m).indices.tolist(), routing)
            assert greedy <= other * (1 + 1e-6), (spec.name, layer.index, greedy, other)
            better += greedy < other * (1 - 1e-6)
    assert better >= len(scorers)  # strictly better than most scorer choices, not merely tied


def test_gate_norm_transform_is_gate_times_output_norm_on_confident_candidates():
    logits = torch.tensor([[2.0, 0.0, -1.0, -5.0], [0.0, 0.0, 0.0, 0.0]])
    gate = logits.softmax(-1)
    selected = torch.tensor([[0, 1], [2, 3]])
    norms = torch.tensor([[3.0, 4.0], [5.0, 6.0]])
    spec = parse_scorer("peu(candidates=2,threshold=0.55,transform=gate_norm)")
    assert spec.needs_expert_outputs and not parse_scorer("peu").needs_expert_outputs
    out = spec(RouterBatch(logits, gate, selected, norms))
    expected = torch.zeros(2, 4, dtype=torch.float64)
    expected[0, 0] = gate[0, 0].double() * 3.0  # token 0: expert 0 is confident (p = 0.88 over {0, 1})
    # token 1: all logits tie, local p = 0.5 < 0.55: nothing is confident
    assert torch.allclose(out, expected)


def test_refine_never_worsens_and_fixes_a_bad_start():
    sample, routing = twins_sample(), Routing(top_k=1)
    fixed = refine(sample, [0, 1, 2], routing)  # keeping both twins wastes a slot: a swap brings 3 back
    assert fixed in ([0, 2, 3], [1, 2, 3])
    assert reconstruction_error(sample, fixed, routing) == 0.0


def test_plan_select_reconstruct_writes_a_valid_plan_that_reconstructs_better(tiny_qwen3, tmp_path):
    from premoe.data import parse_sources, token_windows
    from premoe.errors import InputError
    from premoe.modeling import load_model, load_tokenizer
    from premoe.plan import PlanRequest, make_plan, validate_plan
    from premoe.profile import ProfileParams, profile_model
    from premoe.select import record_hidden

    (tmp_path / "code.txt").write_text(tiny.TEXT)
    sources = parse_sources([f"code={tmp_path / 'code.txt'}"])
    profile = profile_model(tiny_qwen3, sources, ["router_mass"], ProfileParams(max_tokens=512, seq_len=32),
                            progress=False)
    request = PlanRequest(experts=3, domain="code", scorer="router_mass", select="reconstruct", sample_tokens=96)
    plan = make_plan(profile, request)
    validate_plan(plan, 8, 2, moe_layers=[0, 1])
    assert all(len(v) == 3 for v in plan.kept.values()) and plan.request["select"] == "reconstruct"
    top = make_plan(profile, PlanRequest(experts=3, domain="code", scorer="router_mass"))
    net, tok = load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)
    adapter = get_adapter(net.config)
    hidden = record_hidden(net, adapter, token_windows(sources[0].texts, tok, 32, 96 * 4), 96)
    for layer in adapter.moe_layers(net):
        sample, routing = layer_sample(adapter, layer, hidden[layer.index]), routing_of(adapter, net.config, layer)
        assert (reconstruction_error(sample, plan.kept[layer.index], routing)
                <= reconstruction_error(sample, top.kept[layer.index], routing) * (1 + 1e-6))
    with pytest.raises(InputError, match="ranking local"):
        make_plan(profile, PlanRequest(experts=4, domain="code", select="reconstruct", ranking="global",
                                       scorer="router_mass"))


def test_math_problems_take_questions_with_worked_examples_before_them():
    from premoe.generation import math_problems

    text = ("Problem 1. Compute 1 + 1.\nAnswer: 1 + 1 = 2.\n\nProblem 2. Compute 2 + 2.\nAnswer: 2 + 2 = 4.\n\n"
            "Problem 3. Solve for x: 2x = 4.\nSolution: x = 4 / 2 = 2.\n\nProblem 4. Compute 3 + 3.\nAnswer: 3 + 3 = 6.")
    problems = math_problems([text], count=5)
    assert [p.answer for p in problems] == ["Solution: x = 4 / 2 = 2.", "Answer: 3 + 3 = 6."]
    assert problems[0].prompt.endswith("Problem 3. Solve for x: 2x = 4.\n")
    assert math_problems([text], count=1, min_context=0)[0].answer == "Answer: 1 + 1 = 2."


def test_repetition_rate_counts_repeated_ngrams():
    from premoe.generation import repetition_rate

    assert repetition_rate([1, 2, 3, 4, 1, 2, 3, 4], n=4) == pytest.approx(0.2)
    assert repetition_rate([7] * 10, n=4) == pytest.approx(6 / 7)
    assert repetition_rate(list(range(10))) == 0.0 and repetition_rate([1, 2]) == 0.0


def test_generation_metrics_score_a_model_that_answers_from_memory(tiny_qwen3):
    from premoe.generation import MathProblem, generation_metrics
    from premoe.modeling import load_model, load_tokenizer

    net, tok = load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)
    prompt = "Problem 3. Compute 1 + 1.\n"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    produced = tok.decode(net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                       min_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:])
    right = MathProblem(prompt, produced.split("\n", 1)[0])  # the model's own greedy line is "correct"
    wrong = MathProblem(prompt, right.answer + "x")
    out = generation_metrics(net, tok, [right, wrong], max_new_tokens=8)
    assert out["math_exact"] == 0.5 and out["problems"] == 2
    assert out["math_setup"] == 1.0  # the wrong answer differs only after its last " = "
    other = MathProblem(prompt, "Answer: zzz = 1.")  # set up differently from anything the model says
    assert generation_metrics(net, tok, [other], max_new_tokens=8)["math_setup"] == 0.0
    kept = {0: [0, 1], 1: [0, 1]}
    with get_adapter(net.config).restrict_routing(net, kept):  # the masked model's own line
        masked_line = tok.decode(net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                              min_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:])
    masked = MathProblem(prompt, masked_line.split("\n", 1)[0])
    assert generation_metrics(net, tok, [masked], kept=kept, max_new_tokens=8)["math_exact"] == 1.0
