"""Tiny random models of every supported family, for fast CPU tests.

Each entry builds a transformers config small enough to run in milliseconds
(hidden 32, a handful of experts) and saves it with a tiny byte-level BPE
tokenizer, so the saved directory is a real Hugging Face checkpoint.
``FAMILIES`` has one entry per registered adapter; ``GENERIC`` holds real
transformers families premoe serves only through its generic fallback.
Dimensions are chosen so that in an MoE layer only per-expert tensors have as
many rows as there are experts (tests use that to find them on disk).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

TEXT = ("def add(a, b):\n    return a + b\n" * 20 + "In the beginning God created the heaven and the earth.\n" * 20
        + "Der schnelle braune Fuchs springt über den faulen Hund.\n" * 20)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, max_position_embeddings=256, eos_token_id=0, bos_token_id=0, pad_token_id=0,
              tie_word_embeddings=False)


def config_qwen3_moe(**overrides):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**COMMON, "intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
                             "moe_intermediate_size": 16, "norm_topk_prob": True, **overrides})


def config_qwen2_moe(**overrides):
    from transformers import Qwen2MoeConfig

    # norm_topk_prob False (the default): softmax over all experts, no renormalisation (DESIGN.md §4 pitfall)
    return Qwen2MoeConfig(**{**COMMON, "intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
                             "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
                             "norm_topk_prob": False, **overrides})


def config_mixtral(**overrides):
    from transformers import MixtralConfig

    return MixtralConfig(**{**COMMON, "intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                            **overrides})


def config_olmoe(**overrides):
    from transformers import OlmoeConfig

    return OlmoeConfig(**{**COMMON, "intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
                          "norm_topk_prob": False, **overrides})


MLA = dict(num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=16)  # DeepSeek multi-head latent attention, tiny
NO_HEAD_DIM = {k: v for k, v in COMMON.items() if k != "head_dim"}  # MLA configs derive head_dim themselves


def config_deepseek_v3(**overrides):
    from transformers import DeepseekV3Config

    # 3 layers, the first dense; 2 groups of 4 experts, 1 group chosen per token, 1 shared expert
    return DeepseekV3Config(**{**NO_HEAD_DIM, **MLA, "num_hidden_layers": 3, "intermediate_size": 64,
                               "moe_intermediate_size": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
                               "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
                               "norm_topk_prob": True, "routed_scaling_factor": 2.5, **overrides})


def config_deepseek_v2(**overrides):
    from transformers import DeepseekV2Config

    # softmax over all experts, group-limited greedy: 2 groups of 4, 1 chosen per token
    return DeepseekV2Config(**{**NO_HEAD_DIM, **MLA, "num_hidden_layers": 3, "intermediate_size": 64,
                               "moe_intermediate_size": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
                               "n_group": 2, "topk_group": 1, "topk_method": "group_limited_greedy",
                               "first_k_dense_replace": 1, "n_shared_experts": 1, **overrides})


def config_gpt_oss(**overrides):
    from transformers import GptOssConfig

    return GptOssConfig(**{**COMMON, "intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                           "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
                           **overrides})


def config_llama4_text(**overrides):
    from transformers import Llama4TextConfig

    # every layer MoE (interleave step 1), top-1 sigmoid router + shared expert
    return Llama4TextConfig(**{**COMMON, "intermediate_size": 16, "intermediate_size_mlp": 64,
                               "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
                               "attention_chunk_size": 64, **overrides})


def config_glm4_moe(**overrides):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**{**COMMON, "num_hidden_layers": 3, "intermediate_size": 64, "moe_intermediate_size": 16,
                            "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 2,
                            "first_k_dense_replace": 1, "n_shared_experts": 1, "partial_rotary_factor": 0.5,
                            **overrides})


def config_dots1(**overrides):
    from transformers import Dots1Config

    return Dots1Config(**{**COMMON, "num_hidden_layers": 3, "intermediate_size": 64, "moe_intermediate_size": 16,
                          "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                          "first_k_dense_replace": 1, "n_shared_experts": 1, "norm_topk_prob": True, **overrides})


def config_phimoe(**overrides):
    from transformers import PhimoeConfig

    return PhimoeConfig(**{**COMMON, "intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                           "sliding_window": None, **overrides})


def config_granitemoe(**overrides):
    from transformers import GraniteMoeConfig

    return GraniteMoeConfig(**{**COMMON, "intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                               **overrides})


def config_granitemoeshared(**overrides):
    from transformers import GraniteMoeSharedConfig

    return GraniteMoeSharedConfig(**{**COMMON, "intermediate_size": 16, "num_local_experts": 8,
                                     "num_experts_per_tok": 2, "shared_intermediate_size": 32, **overrides})


def config_ernie4_5_moe(**overrides):
    from transformers import Ernie4_5_MoeConfig

    # first layer dense (moe_layer_start_index 1), correction bias in gate.moe_statics, 1 shared expert
    return Ernie4_5_MoeConfig(**{**COMMON, "num_hidden_layers": 3, "intermediate_size": 64,
                                 "moe_intermediate_size": 16, "moe_num_experts": 8, "moe_k": 2,
                                 "moe_num_shared_experts": 1, "moe_layer_start_index": 1, "moe_layer_interval": 1,
                                 **overrides})


def config_hunyuan_v1_moe(**overrides):
    from transformers import HunYuanMoEV1Config

    return HunYuanMoEV1Config(**{**COMMON, "intermediate_size": 16, "num_experts": 8, "moe_topk": 2, **overrides})


def config_minimax(**overrides):
    from transformers import MiniMaxConfig

    return MiniMaxConfig(**{**COMMON, "intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                            "layer_types": ["linear_attention", "full_attention"], "block_size": 16, **overrides})


def config_minimax_m2(**overrides):
    from transformers import MiniMaxM2Config

    return MiniMaxM2Config(**{**COMMON, "intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                              **overrides})


def config_qwen3_next(**overrides):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**{**COMMON, "intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
                              "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
                              "norm_topk_prob": True, "layer_types": ["linear_attention", "full_attention"],
                              "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
                              "linear_value_head_dim": 16, "linear_conv_kernel_dim": 2, **overrides})


def config_flex_olmo(**overrides):
    from transformers import FlexOlmoConfig

    return FlexOlmoConfig(**{**COMMON, "intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
                             **overrides})


FAMILIES = {
    "qwen3_moe": config_qwen3_moe,
    "qwen2_moe": config_qwen2_moe,
    "mixtral": config_mixtral,
    "olmoe": config_olmoe,
    "deepseek_v3": config_deepseek_v3,
    "deepseek_v2": config_deepseek_v2,
    "gpt_oss": config_gpt_oss,
    "llama4_text": config_llama4_text,
    "glm4_moe": config_glm4_moe,
    "dots1": config_dots1,
    "phimoe": config_phimoe,
    "granitemoe": config_granitemoe,
    "granitemoeshared": config_granitemoeshared,
    "ernie4_5_moe": config_ernie4_5_moe,
    "hunyuan_v1_moe": config_hunyuan_v1_moe,
    "minimax": config_minimax,
    "minimax_m2": config_minimax_m2,
    "qwen3_next": config_qwen3_next,
    "flex_olmo": config_flex_olmo,
}


def build(family: str, seed: int = 0, **overrides):
    """A random model of ``family`` in fp32 eval mode, with weights large enough to route decisively."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    factory = FAMILIES.get(family) or GENERIC[family]
    model = AutoModelForCausalLM.from_config(factory(**overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():  # default init is tiny: spread the router logits out
            if p.dim() >= 2:
                p.normal_(0, 0.2)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:  # router / correction biases too
            if name.endswith("bias") and t.is_floating_point():
                t.normal_(0, 0.1)
    return model.eval()


def save(family: str, path: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    model = build(family, seed, **overrides)
    model.to(dtype).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _factory(config_class: str, base: dict = COMMON, **fields):
    """A config factory: ``config_class(**base, **fields, **overrides)``."""
    def factory(**overrides):
        import transformers

        return getattr(transformers, config_class)(**{**base, **fields, **overrides})

    factory.__name__ = f"config_{config_class}"
    return factory


MOE8 = dict(intermediate_size=64, moe_intermediate_size=16, num_experts_per_tok=2)
GROUPED8 = dict(MOE8, num_hidden_layers=3, n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=1,
                n_shared_experts=1, norm_topk_prob=True)  # DeepSeek-V3-style: 2 groups of 4, first layer dense
GROUPED8_ALL_MOE = {k: v for k, v in GROUPED8.items() if k != "first_k_dense_replace"}  # no dense layers

FAMILIES.update({
    "solar_open": _factory("SolarOpenConfig", **GROUPED8_ALL_MOE),
    "exaone_moe": _factory("ExaoneMoeConfig", **MOE8, num_experts=8, num_hidden_layers=3, first_k_dense_replace=1,
                           num_shared_experts=1, n_group=2, topk_group=1),
    "glm4_moe_lite": _factory("Glm4MoeLiteConfig", NO_HEAD_DIM, **MLA, **GROUPED8),
    "qwen3_5_moe_text": _factory("Qwen3_5MoeTextConfig", **MOE8, num_experts=8, shared_expert_intermediate_size=32,
                                 layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                 linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                 linear_conv_kernel_dim=2),
    "afmoe": _factory("AfmoeConfig", **MOE8, num_experts=8, num_hidden_layers=3, num_dense_layers=1,
                      num_shared_experts=1),
    "lfm2_moe": _factory("Lfm2MoeConfig", **MOE8, num_experts=8, num_hidden_layers=3, num_dense_layers=1,
                         layer_types=["conv", "full_attention", "conv"]),
    "deepseek_v32": _factory("DeepseekV32Config", NO_HEAD_DIM, **{**MLA, "q_lora_rank": 16}, **GROUPED8,
                             index_topk=4, index_head_dim=16, index_n_heads=2),
    "hy_v3": _factory("HYV3Config", **MOE8, num_experts=8, num_shared_experts=1),
    "mimo_v2_flash": _factory("MiMoV2FlashConfig", **GROUPED8_ALL_MOE, v_head_dim=16),
    "kolibri1": _factory("Kolibri1Config", moe_intermediate_size=16, num_experts_per_tok=2, num_experts=8,
                         shared_expert_intermediate_size=32),
    "kimi_linear": _factory("KimiLinearConfig", NO_HEAD_DIM, **MLA, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=8, num_experts_per_token=2, num_expert_group=2, topk_group=1,
                            num_shared_experts=1, moe_renormalize=True, layer_types=["linear_attention",
                                                                                     "full_attention"],
                            mlp_layer_types=["sparse", "sparse"], linear_num_heads=2, linear_head_dim=16),
    "jamba": _factory("JambaConfig", intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                      attn_layer_offset=1),  # layer 0: Mamba + dense MLP, layer 1: attention + MoE
    "granitemoehybrid": _factory("GraniteMoeHybridConfig", intermediate_size=16, num_local_experts=8,
                                 num_experts_per_tok=2, shared_intermediate_size=32,
                                 layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
                                 mamba_d_state=8, mamba_chunk_size=8),
})

# families with no adapter of their own: the generic fallback reads their layout off the model
GENERIC = {
    "mellum": _factory("MellumConfig", **MOE8, num_experts=8),
    "cohere2_moe": _factory("Cohere2MoeConfig", **MOE8, num_experts=8),
    "laguna": _factory("LagunaConfig", **MOE8, num_experts=8, shared_expert_intermediate_size=32),
}


# --------------------------------------------------------------------------- multi-token-prediction layers

# tensors an MTP layer holds beside its decoder block, as DeepSeek-V3/R1 and GLM-4.5 shards spell them
# (model.layers.61.* in DeepSeek-V3; vLLM deepseek_mtp.py / glm4_moe_mtp.py _rewrite_spec_layer_name)
MTP_EXTRA = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
             "embed_tokens.weight")


def add_mtp_layer(path: Path, family: str, seed: int = 1) -> list[str]:
    """Append one on-disk MTP layer to the saved checkpoint at ``path``, laid out as the real shards are.

    The layer is numbered ``num_hidden_layers`` (``model.layers.{L}.*``): a full
    decoder layer — attention, norms, router with its correction bias, routed
    experts ``mlp.experts.{i}.{gate,up,down}_proj.weight``, shared experts —
    taken from a random model of the same family one layer deeper, plus
    ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.{norm,head}`` and
    ``embed_tokens``. It goes into a shard of its own, mapped by
    ``model.safetensors.index.json`` (written if the checkpoint was a single
    file), and config.json says ``num_nextn_predict_layers: 1``.
    Returns the MTP layer's keys.
    """
    import json
    import tempfile

    from safetensors.torch import load_file, save_file

    config = json.loads((path / "config.json").read_text())
    layers = config["num_hidden_layers"]
    prefix = f"model.layers.{layers}."
    deeper = build(family, seed, num_hidden_layers=layers + 1)
    with tempfile.TemporaryDirectory() as scratch:
        deeper.save_pretrained(scratch)  # per-expert names on disk, as in the real shards
        block = {k: v for k, v in load_file(f"{scratch}/model.safetensors").items() if k.startswith(prefix)}
    generator = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    shapes = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
              "shared_head.norm.weight": (hidden,), "shared_head.head.weight": (vocab, hidden),
              "embed_tokens.weight": (vocab, hidden)}
    mtp = {**block, **{prefix + name: torch.randn(shapes[name], generator=generator) for name in MTP_EXTRA}}
    bias = prefix + "mlp.gate.e_score_correction_bias"
    mtp[bias] = torch.randn(mtp[bias].shape, generator=generator)  # random, so a wrong slice shows
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
    else:  # a single-file checkpoint becomes a sharded one, as every real MTP checkpoint is
        single = load_file(str(path / "model.safetensors"))
        (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in single.values())},
                 "weight_map": {k: "model-00001-of-00002.safetensors" for k in single}}
    shard = f"model-{len(set(index['weight_map'].values())) + 1:05d}-of-mtp.safetensors"
    save_file({k: v.contiguous() for k, v in mtp.items()}, str(path / shard), metadata={"format": "pt"})
    index["weight_map"].update({k: shard for k in mtp})
    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in mtp.values())
    index_file.write_text(json.dumps(index, indent=2))
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return sorted(mtp)
