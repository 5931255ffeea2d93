"""Streaming profiles (one decoder layer in memory at a time) equal in-memory profiles, and fail cleanly."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from premoe.data import Source
from premoe.errors import CheckpointError, InputError, UnsupportedModelError
from premoe.profile import Profile, ProfileParams, profile_model
from premoe.scores import DEFAULT_SCORERS, PRESETS
from premoe.streaming import _Loader, _skeleton, profile_streaming

PARAMS = ProfileParams(max_tokens=200, seq_len=32, batch_size=2)
SOURCES = [Source("code", [tiny.TEXT[:700]], "code.txt"), Source("rest", [tiny.TEXT[700:]], "rest.txt")]
ROUTER_ONLY = [n for n in DEFAULT_SCORERS if not PRESETS[n].needs_expert_outputs]
# dense first layer + sigmoid groups (deepseek_v3), per-layer sliding/full masks (gpt_oss), linear-attention
# hybrid layers (qwen3_next), plain softmax families; the rest of tiny.FAMILIES run with -m slow
QUICK = ["qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_next", "mixtral"]


def assert_same(streamed: Profile, in_memory: Profile) -> None:
    assert streamed.moe_layers == in_memory.moe_layers and streamed.scorers == in_memory.scorers
    assert streamed.domains.keys() == in_memory.domains.keys()
    for domain, stats in in_memory.domains.items():
        assert streamed.domains[domain].tokens == stats.tokens
        assert torch.equal(streamed.domains[domain].routed, stats.routed), domain
        for scorer in in_memory.scorers:
            difference = (streamed.utility(domain, scorer) - in_memory.utility(domain, scorer)).abs().max()
            assert difference <= 1e-5, (domain, scorer, float(difference))


def check_family(family: str, path, scorers, tmp_path) -> None:
    tiny.save(family, path)
    reference = profile_model(path, SOURCES, scorers, PARAMS, progress=False)
    in_memory = profile_streaming(path, SOURCES, scorers, PARAMS, progress=False, memory_budget=1 << 30)
    assert in_memory.timing["hidden_states"] == "memory"
    assert_same(in_memory, reference)
    on_disk = profile_streaming(path, SOURCES, scorers, PARAMS, workdir=tmp_path / "scratch", progress=False,
                                memory_budget=0)
    assert on_disk.timing["hidden_states"] == "file"
    assert_same(on_disk, reference)
    assert not list((tmp_path / "scratch").iterdir())  # the scratch file is gone


def test_equals_in_memory_with_every_default_scorer(tmp_path):
    check_family("qwen3_moe", tmp_path / "model", None, tmp_path)


@pytest.mark.parametrize("family", QUICK[1:])
def test_equals_in_memory_across_families(family, tmp_path):
    check_family(family, tmp_path / "model", ROUTER_ONLY, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(tiny.FAMILIES) - set(QUICK)))
def test_equals_in_memory_every_family(family, tmp_path):
    check_family(family, tmp_path / "model", None, tmp_path)


def test_hidden_states_stay_in_memory_when_smaller_than_a_layer(tiny_qwen3):
    small = ProfileParams(max_tokens=8, seq_len=8)  # 2 x 8 tokens x 32 x 4 bytes = 2 KB, far below a layer
    assert profile_streaming(tiny_qwen3, SOURCES, ["peu"], small, progress=False).timing["hidden_states"] == "memory"
    large = ProfileParams(max_tokens=4000, seq_len=32)  # 4000 tokens x 32 x 4 bytes = 512 KB > the ~60 KB layer
    assert profile_streaming(tiny_qwen3, [Source("a", [tiny.TEXT * 30], "a")], ["peu"], large,
                             progress=False).timing["hidden_states"] == "file"


def test_loaded_layers_go_back_to_meta(tiny_qwen3):
    from transformers import AutoConfig

    from premoe import checkpoint

    net = _skeleton(AutoConfig.from_pretrained(tiny_qwen3))
    assert all(p.is_meta for p in net.parameters())
    loader = _Loader(net, tiny_qwen3, checkpoint.tensors(tiny_qwen3), len(net.model.layers), "cpu")
    layer = net.model.layers[1]
    with loader.loaded(loader.layer_keys(1), layer, "decoder layer 1"):
        assert not any(p.is_meta for p in layer.parameters())
        assert all(p.is_meta for p in net.model.layers[0].parameters())
    assert all(p.is_meta for p in net.parameters())


def test_generation_needs_the_model_in_memory(tiny_qwen3):
    with pytest.raises(InputError, match="without --stream"):
        profile_streaming(tiny_qwen3, SOURCES, ["peu"], ProfileParams(generate=4), progress=False)


def rewrite(path, change) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_a_missing_tensor_is_named(tmp_path):
    path = tiny.save("qwen3_moe", tmp_path / "model")
    rewrite(path, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match="lacks tensor self_attn.q_proj.weight of decoder layer 1"):
        profile_streaming(path, SOURCES, ["peu"], PARAMS, progress=False)


def test_a_missing_layer_is_named(tmp_path):
    path = tiny.save("qwen3_moe", tmp_path / "model")
    rewrite(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")])
    with pytest.raises(CheckpointError, match="no tensor of decoder layer 1"):
        profile_streaming(path, SOURCES, ["peu"], PARAMS, progress=False)


def test_a_wrong_shape_is_named(tmp_path):
    path = tiny.save("qwen3_moe", tmp_path / "model")
    rewrite(path, lambda t: t.update({"model.layers.0.mlp.gate.weight": torch.zeros(9, 32)}))
    with pytest.raises(CheckpointError, match=r"mlp.gate.weight has shape \(9, 32\)"):
        profile_streaming(path, SOURCES, ["peu"], PARAMS, progress=False)


def test_a_model_without_experts_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    AutoModelForCausalLM.from_config(LlamaConfig(**tiny.COMMON, intermediate_size=64)).save_pretrained(tmp_path / "m")
    tiny.tiny_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(UnsupportedModelError):
        profile_streaming(tmp_path / "m", SOURCES, ["peu"], PARAMS, progress=False)


def test_a_missing_expert_tensor_is_named(tmp_path):
    """Experts are placed straight into the fused parameter: one absent expert must not leave garbage in its slot."""
    path = tiny.save("qwen3_moe", tmp_path / "model")
    rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"15 of the 16 expert tensors that make up experts.gate_up_proj"):
        profile_streaming(path, SOURCES, ["peu"], PARAMS, progress=False)


def test_a_wrong_expert_shape_is_named(tmp_path):
    path = tiny.save("qwen3_moe", tmp_path / "model")
    rewrite(path, lambda t: t.update({"model.layers.0.mlp.experts.2.down_proj.weight": torch.zeros(32, 8)}))
    with pytest.raises(CheckpointError, match=r"experts.2.down_proj.weight has shape \(32, 8\), the config expects "
                                              r"\(32, 16\)"):
        profile_streaming(path, SOURCES, ["peu"], PARAMS, progress=False)


def test_fp8_block_scales_dequantise_block_by_block():
    """weight_scale_inv multiplies each 128x128 block (DeepSeek's weight_dequant), partial edge blocks included."""
    from premoe.streaming import _BlockDequantized

    weight = torch.ones(130, 260).to(torch.float8_e4m3fn)  # 2 x 3 blocks, the last row/column blocks partial
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = _BlockDequantized(weight, scale, (128, 128))[...]
    assert out.shape == (130, 260)
    assert (out[0, 0], out[0, 128], out[0, 259], out[128, 0], out[129, 259]) == (1.0, 2.0, 3.0, 4.0, 6.0)
    assert torch.equal(out[:128, :128], torch.ones(128, 128))


def test_a_forward_takes_at_most_a_quarter_of_the_largest_layer():
    """Windows per streaming forward shrink where the forward's own memory (one-hot expert masks, activations) would
    pass a quarter of the largest layer's weights: the rehearsal's DeepSeek-V3 layout at toy width, where 8 windows a
    forward took the peak to 2.7x a layer; on the real model only for long windows."""
    from transformers import DeepseekV3Config

    from premoe.adapters import get_adapter
    from premoe.streaming import forward_batch, forward_bytes_per_token

    toy = DeepseekV3Config(n_routed_experts=256, num_experts_per_tok=8, hidden_size=128)
    real = DeepseekV3Config(n_routed_experts=256, num_experts_per_tok=8, hidden_size=7168)
    assert forward_bytes_per_token(toy, get_adapter(toy)) == 16 * 256 * 8 + 64 * 128
    assert forward_bytes_per_token(real, get_adapter(real)) == 16 * 256 * 8 + 64 * 7168
    assert forward_batch(8, 128, 40960, 25_692_800) == 1  # 6.4 MB of 5.2 MB windows
    assert forward_batch(8, 128, 40960, 4 * 2 * 5_242_880) == 2
    real_token = 16 * 256 * 8 + 64 * 7168
    assert forward_batch(8, 512, real_token, 11_300_000_000) == 8  # the real layer, default windows: not bound
    assert forward_batch(8, 4096, real_token, 11_300_000_000) == 1  # 4096-token windows: 8 would take 16 GB
    assert forward_batch(8, 10, 100, 16_000) == 4  # exactly a quarter of the layer fits
    assert forward_batch(8, 10, 100, 15_999) == 3
    assert forward_batch(8, 128, 10**9, 10) == 1  # at least one window
    assert forward_batch(3, 1, 1, 10**9) == 3  # never more than asked
