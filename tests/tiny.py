"""Tiny random models of every supported family, for fast CPU tests.

Each entry builds a transformers config small enough to run in milliseconds
(hidden 32, a handful of experts) and saves it with a tiny byte-level BPE
tokenizer, so the saved directory is a real Hugging Face checkpoint.
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


MLA = dict(head_dim=None, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=16)  # DeepSeek multi-head latent attention, tiny


def config_deepseek_v3(**overrides):
    from transformers import DeepseekV3Config

    # 3 layers, the first dense; 2 groups of 4 experts, 1 group chosen per token, 1 shared expert
    return DeepseekV3Config(**{**COMMON, **MLA, "num_hidden_layers": 3, "intermediate_size": 64,
                               "moe_intermediate_size": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
                               "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
                               "norm_topk_prob": True, "routed_scaling_factor": 2.5, **overrides})


def config_deepseek_v2(**overrides):
    from transformers import DeepseekV2Config

    # softmax over all experts, group-limited greedy: 2 groups of 4, 1 chosen per token
    return DeepseekV2Config(**{**COMMON, **MLA, "num_hidden_layers": 3, "intermediate_size": 64,
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
    model = AutoModelForCausalLM.from_config(FAMILIES[family](**overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():  # default init is tiny: spread the router logits out
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.eval()


def save(family: str, path: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    model = build(family, seed, **overrides)
    model.to(dtype).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
