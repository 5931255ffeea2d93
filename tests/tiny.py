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


FAMILIES = {
    "qwen3_moe": config_qwen3_moe,
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
