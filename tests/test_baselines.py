"""Parity with the peers' released code: premoe's scorers equal independent ports of official REAP and PreMoe.

premoe.baselines ports CerebrasResearch/reap's observer saliencies and JarvisPei/PreMoe's top-1 logit ranking
from their own files; here both see the same calibration windows as ``premoe profile``.
"""
import pytest
import torch

import tiny
from premoe.adapters import get_adapter
from premoe.baselines import OfficialPreMoe, OfficialReap, observe
from premoe.data import Source, token_windows
from premoe.profile import Profile, ProfileParams, profile_model

SCORERS = ["reap", "reap_softmax", "ean_sum", "ean_mean", "tcess_top1", "tcess", "frequency"]


def official(model, adapter, windows, batch_size):
    """decoder layer -> (REAP with its default renormalisation, REAP without, PreMoe top-1, PreMoe Ka=2 r=0.55)."""
    experts, top_k = adapter.num_experts(model.config), adapter.top_k(model.config)
    renormalize = bool(getattr(model.config, "norm_topk_prob", False))  # official main._setup_observer
    return observe(model, adapter, windows, lambda: (OfficialReap(experts, top_k, renormalize),
                                                     OfficialReap(experts, top_k, False),
                                                     OfficialPreMoe(), OfficialPreMoe(k=2, r=0.55)),
                   batch_size=batch_size)


def assert_parity(profile: Profile, domain: str, ports: dict) -> None:
    """REAP/EAN to 1e-6 relative (the official observer accumulates in float32: 2.2e-7 at most on the testbed),
    PreMoe's mean logits to 1e-6 absolute."""
    stats = profile.domains[domain]
    close = dict(rtol=1e-6, atol=1e-9)
    for row, layer in enumerate(profile.moe_layers):
        reap, reap_old, top1, tcess = ports[layer]
        got = {name: profile.utility(domain, name)[row] for name in SCORERS}
        assert torch.allclose(got["reap"], reap.result()["reap"].double(), **close), layer
        assert torch.allclose(got["reap_softmax"], reap_old.result()["reap"].double(), **close), layer
        assert torch.allclose(got["ean_mean"], reap.result()["ean_mean"].double(), **close), layer
        # official ean_sum is the plain sum; premoe stores it per calibration token (the same ranking)
        assert torch.allclose(got["ean_sum"] * stats.tokens, reap.result()["ean_sum"], **close), layer
        assert torch.equal(stats.routed[row], reap.result()["expert_frequency"].double()), layer
        assert torch.allclose(got["tcess_top1"], top1.result()["mean_logit"].double(), atol=1e-6, rtol=0), layer
        assert torch.allclose(got["tcess"], tcess.result()["mean_logit"].double(), atol=1e-6, rtol=0), layer
        assert torch.equal(got["tcess_top1"].argsort(descending=True, stable=True),
                           top1.result()["mean_logit"].double().argsort(descending=True, stable=True))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])  # renormalising top-k, and softmax over all experts
def test_scorers_equal_the_official_ports_on_a_tiny_model(family, tmp_path):
    path = tiny.save(family, tmp_path / family)
    params = ProfileParams(max_tokens=256, seq_len=32, batch_size=4)
    text = Source("mixed", [tiny.TEXT], "tiny.TEXT")
    profile = profile_model(path, [text], SCORERS, params, progress=False)
    from premoe.modeling import load_model, load_tokenizer

    model, tokenizer = load_model(path), load_tokenizer(path)
    adapter = get_adapter(model.config)
    assert adapter.renormalises_top_k(model.config) == (family == "qwen3_moe")
    windows = token_windows(text.texts, tokenizer, params.seq_len, params.max_tokens)  # what profile_model ran
    assert profile.domains["mixed"].tokens == windows.numel() == 256
    assert_parity(profile, "mixed", official(model, adapter, windows, params.batch_size))


def test_ean_mean_is_per_routed_token_and_reap_renormalisation_matters(tmp_path):
    """Catch EAN normalised over all tokens, and reap silently left un-renormalised."""
    path = tiny.save("qwen3_moe", tmp_path / "m")
    profile = profile_model(path, [Source("d", [tiny.TEXT], "t")], ["ean_mean", "ean_sum", "reap", "reap_softmax"],
                            ProfileParams(max_tokens=128, seq_len=32), progress=False)
    stats = profile.domains["d"]
    assert torch.allclose(profile.utility("d", "ean_mean") * stats.routed, stats.sums["ean_mean"])
    assert (stats.routed < stats.tokens).all()  # so dividing by all tokens would differ
    assert torch.allclose(profile.utility("d", "ean_sum"), stats.sums["ean_sum"] / stats.tokens)
    assert not torch.allclose(profile.utility("d", "ean_mean"), profile.utility("d", "ean_sum"))
    # renormalised top-2 weights are larger than the all-experts softmax ones: every routed expert's reap grows
    routed = stats.routed > 0
    assert (profile.utility("d", "reap")[routed] > profile.utility("d", "reap_softmax")[routed]).all()


@pytest.mark.slow
def test_scorers_equal_the_official_ports_on_the_testbed_calibration_data():
    from premoe import testbed
    from premoe.data import parse_sources
    from premoe.modeling import load_model, load_tokenizer

    model, tokenizer = load_model("testbed"), load_tokenizer("testbed")
    adapter = get_adapter(model.config)
    params = ProfileParams(max_tokens=2048, seq_len=256, batch_size=8)
    sources = parse_sources([f"{d}:calib" for d in testbed.domains()[:2]], tokenizer=tokenizer)
    profile = profile_model("testbed", sources, SCORERS, params, progress=False, loaded=(model, tokenizer))
    for source in sources:
        windows = token_windows(source.texts, tokenizer, params.seq_len, params.max_tokens)
        assert_parity(profile, source.name, official(model, adapter, windows, params.batch_size))
