"""Router capture on a tiny model: token counting, padding, constant state, reset, hook removal, early stop."""
import pytest
import torch

import tiny
from premoe.adapters import get_adapter
from premoe.capture import RouterCapture
from premoe.scores import PRESETS

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
