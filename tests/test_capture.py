"""Router capture on a tiny model: token counting, padding, constant state, reset, hook removal, early stop."""
import pytest
import torch

import tiny
from premoe.adapters import get_adapter
from premoe.capture import RouterCapture
from premoe.scores import PRESETS, ScorerSpec

SCORERS = [PRESETS[n] for n in ("peu", "tcess", "frequency", "router_mass", "reap")]


@pytest.fixture(scope="module")
def model():
    return tiny.build("qwen3_moe")


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(tiny.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_counts_exclude_padding_and_padded_rows_score_like_unpadded(model):
    adapter = get_adapter(model.config)
    tokens = ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right padding: the causal model's first 5 tokens of row 1 are unaffected by it
    with RouterCapture(model, adapter, SCORERS) as capture:
        capture.run(tokens, mask)
        padded = capture.reset()
        capture.run(tokens[:1])
        capture.run(tokens[1:, :5])
        separate = capture.reset()
    assert padded.tokens == separate.tokens == 13
    top_k = adapter.top_k(model.config)
    assert torch.equal(padded.routed.sum(1), torch.full((2,), 13.0 * top_k, dtype=torch.float64))
    assert torch.equal(padded.routed, separate.routed)
    assert torch.equal(padded.sums["frequency"], padded.routed)
    for name in padded.sums:
        assert torch.allclose(padded.sums[name], separate.sums[name], atol=1e-5), name


def test_state_does_not_grow_with_tokens(model):
    adapter = get_adapter(model.config)
    with RouterCapture(model, adapter, SCORERS) as capture:
        capture.run(ids(2, 8))
        shapes = {n: t.shape for n, t in capture.stats.sums.items()}
        for seed in range(1, 4):
            capture.run(ids(4, 16, seed))
        assert capture.stats.tokens == 16 + 3 * 64
        assert {n: t.shape for n, t in capture.stats.sums.items()} == shapes == {n.name: (2, 8) for n in SCORERS}
        held = [v for v in vars(capture).values() if isinstance(v, torch.Tensor)]
        assert all(t.numel() <= 2 * 8 for t in held)  # nothing kept per token between batches


def test_reset_returns_the_sums_and_starts_from_zero(model):
    with RouterCapture(model, get_adapter(model.config), SCORERS) as capture:
        capture.run(ids(1, 8))
        old = capture.reset()
        assert old.tokens == 8 and old.routed.sum() > 0
        assert capture.stats.tokens == 0 and not capture.stats.routed.any()
        assert all(not t.any() for t in capture.stats.sums.values())


def test_hooks_are_removed_on_exit_even_after_an_error(model):
    capture = RouterCapture(model, get_adapter(model.config), SCORERS)
    routers = [layer.router for layer in capture.layers]
    before = [len(r._forward_hooks) for r in routers]
    with capture:
        assert [len(r._forward_hooks) for r in routers] == [b + 1 for b in before]
    assert [len(r._forward_hooks) for r in routers] == before
    with pytest.raises(RuntimeError):
        with capture:
            raise RuntimeError("boom")
    assert [len(r._forward_hooks) for r in routers] == before


def test_stop_after_last_ends_the_pass_at_the_last_captured_router(model):
    adapter = get_adapter(model.config)
    first, last = adapter.moe_layers(model)[0], adapter.moe_layers(model)[-1]
    calls = []
    handle = last.router.register_forward_hook(lambda *a: calls.append(1))
    try:
        with RouterCapture(model, adapter, SCORERS, layers=[first.index], stop_after_last=True) as early:
            early.run(ids(2, 8))
        assert not calls  # the later router never ran
        with RouterCapture(model, adapter, SCORERS) as full:
            full.run(ids(2, 8))
        assert calls
    finally:
        handle.remove()
    assert early.stats.sums["peu"].shape == (1, 8)
    assert torch.allclose(early.stats.sums["peu"][0], full.stats.sums["peu"][0])


def test_layers_that_are_not_moe_are_refused(model):
    with pytest.raises(ValueError, match="no MoE layer among"):
        RouterCapture(model, get_adapter(model.config), SCORERS, layers=[7])


@pytest.fixture(scope="module")
def biased_deepseek():
    """A tiny DeepSeek-V3 (2 groups of 4 experts, 1 group per token) whose correction bias dominates its choice."""
    model = tiny.build("deepseek_v3")
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 2.0])  # sigmoid ≤ 1: experts 4 and 7 always win
    for layer in get_adapter(model.config).moe_layers(model):
        layer.block.gate.e_score_correction_bias.copy_(bias)
    return model


def actually_routed(model, tokens) -> dict[int, torch.Tensor]:
    """Decoder layer -> (tokens, top_k) indices the experts module was called with (the model's real choice)."""
    seen, handles = {}, []
    for layer in get_adapter(model.config).moe_layers(model):
        handles.append(layer.experts.register_forward_pre_hook(
            lambda module, args, index=layer.index: seen.__setitem__(index, args[1].reshape(-1, args[1].shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_routed_candidates_and_frequency_follow_the_biased_grouped_router(biased_deepseek):
    model, tokens = biased_deepseek, ids(2, 8)
    adapter = get_adapter(model.config)
    routed_rule = ScorerSpec("peu", (("candidates", 2), ("threshold", 0.0), ("transform", "prob"),
                                     ("candidates_from", "routed")))
    with RouterCapture(model, adapter, [PRESETS["frequency"], PRESETS["tcess_top1"], routed_rule]) as capture:
        capture.run(tokens)
    real = actually_routed(model, tokens)
    layers = [l.index for l in capture.layers]
    counts = torch.stack([torch.bincount(real[l].reshape(-1), minlength=8) for l in layers]).double()  # (layers, 8)
    assert torch.equal(capture.stats.sums["frequency"], counts)
    assert torch.equal(capture.stats.routed, counts)
    assert counts[:, 4].tolist() == counts[:, 7].tolist() == [16.0] * len(layers)  # the bias decides
    # every token's routed-rule candidates are exactly its routed experts (probabilities sum to 1 per token)
    assert torch.allclose(capture.stats.sums[routed_rule.name].sum(1), torch.full((len(layers),), 16.0,
                                                                                 dtype=torch.float64))
    assert torch.equal(capture.stats.sums[routed_rule.name] > 0, counts > 0)
    # the raw-logit top-k (what frequency would be if computed from logits) is a different choice here
    with RouterCapture(model, adapter, [PRESETS["tcess_top1"]]) as top1:
        top1.run(tokens)
    assert not torch.equal(top1.stats.sums["tcess_top1"] != 0, counts > 0)
