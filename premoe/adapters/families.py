"""The supported families, one adapter each. The only place that names model types."""
from __future__ import annotations

from premoe.adapters.base import MoEAdapter

QWEN3_MOE = MoEAdapter(
    name="Qwen3-MoE",
    model_types=("qwen3_moe",),
    # transformers 5 writes num_local_experts; 4.x and vLLM read num_experts: write both
    expert_count_keys=("num_local_experts", "num_experts"),
)

QWEN2_MOE = MoEAdapter(
    name="Qwen2-MoE",
    model_types=("qwen2_moe",),
    expert_count_keys=("num_experts", "num_local_experts"),
    shared_expert_attrs=("shared_expert", "shared_expert_gate"),
)

OLMOE = MoEAdapter(
    name="OLMoE",
    model_types=("olmoe",),
    expert_count_keys=("num_experts", "num_local_experts"),
)

MIXTRAL = MoEAdapter(
    name="Mixtral",
    model_types=("mixtral",),
    expert_count_keys=("num_local_experts",),
    norm_topk_key=None,  # Mixtral always renormalises its top-k
)

DEEPSEEK_V3 = MoEAdapter(
    name="DeepSeek-V3",
    model_types=("deepseek_v3",),
    expert_count_keys=("n_routed_experts",),
    scoring="sigmoid",
    correction_bias_attr="e_score_correction_bias",
    group_keys=("n_group", "topk_group"),
    shared_expert_attrs=("shared_experts",),
    dense_layer_keys=("first_k_dense_replace",),
)

GPT_OSS = MoEAdapter(
    name="GPT-OSS",
    model_types=("gpt_oss",),
    expert_count_keys=("num_local_experts",),
    norm_topk_key=None,  # softmax over the top-k logits
    router="router",
    router_bias_attrs=("bias",),
    fused_on_disk=True,
)

LLAMA4 = MoEAdapter(
    name="Llama4",
    model_types=("llama4_text", "llama4"),
    expert_count_keys=("num_local_experts",),
    scoring="sigmoid",
    norm_topk_key=None,
    always_renormalises=False,  # sigmoid of the top-1 logit
    moe_block="feed_forward",
    router="router",
    router_logits_index=1,  # Llama4Router returns (scores, logits)
    shared_expert_attrs=("shared_expert",),
    fused_on_disk=True,
)

ALL: tuple[MoEAdapter, ...] = (QWEN3_MOE, QWEN2_MOE, OLMOE, MIXTRAL, DEEPSEEK_V3, GPT_OSS, LLAMA4)
