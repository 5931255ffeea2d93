"""The supported families, one adapter each. The only place that names model types.

Every entry was checked against transformers 5.24's modeling code and a saved
tiny checkpoint (tests/test_adapters.py): router logits, forced routing versus
in-memory pruning, on-disk key classification and config counts.
"""
from __future__ import annotations

import torch
from torch import nn

from premoe.adapters.base import MoEAdapter

# Mixtral-style per-expert names on disk: w1 = gate, w3 = up, w2 = down
_W1_W3_W2 = (("experts.*.w1.weight", "experts.gate_up_proj", 0, 2),
             ("experts.*.w3.weight", "experts.gate_up_proj", 1, 2),
             ("experts.*.w2.weight", "experts.down_proj", 0, 1))

QWEN3_MOE = MoEAdapter(
    name="Qwen3-MoE",
    model_types=("qwen3_moe",),
    # transformers 5 writes num_local_experts; 4.x and vLLM read num_experts: write both
    expert_count_keys=("num_local_experts", "num_experts"),
)

QWEN2_MOE = MoEAdapter(
    name="Qwen2-MoE",
    model_types=("qwen2_moe",),
    expert_count_keys=("num_experts",),
    shared_expert_attrs=("shared_expert", "shared_expert_gate"),
    notes=("softmax over all experts; with norm_topk_prob=False (the default) pruning raises the kept gate weights",),
)

QWEN3_NEXT = MoEAdapter(
    name="Qwen3-Next",
    model_types=("qwen3_next",),
    expert_count_keys=("num_experts",),
    shared_expert_attrs=("shared_expert", "shared_expert_gate"),
)

OLMOE = MoEAdapter(
    name="OLMoE",
    model_types=("olmoe",),
    expert_count_keys=("num_experts",),
    notes=("softmax over all experts; with norm_topk_prob=False (the default) pruning raises the kept gate weights",),
)

FLEX_OLMO = MoEAdapter(
    name="FlexOlmo",
    model_types=("flex_olmo",),
    expert_count_keys=("num_experts",),
)

MIXTRAL = MoEAdapter(
    name="Mixtral",
    model_types=("mixtral",),
    expert_count_keys=("num_local_experts",),
    norm_topk_key=None,  # Mixtral always renormalises its top-k
    disk_blocks=("block_sparse_moe", "mlp"),  # v5 saves the original block_sparse_moe.experts.{i}.w1/w2/w3 names
    disk_to_memory=_W1_W3_W2,
)

MINIMAX = MoEAdapter(
    name="MiniMax",
    model_types=("minimax",),
    expert_count_keys=("num_local_experts",),
    norm_topk_key=None,
    disk_blocks=("block_sparse_moe", "mlp"),
    disk_to_memory=_W1_W3_W2,
)

MINIMAX_M2 = MoEAdapter(
    name="MiniMax-M2",
    model_types=("minimax_m2",),
    expert_count_keys=("num_local_experts",),
    scoring="sigmoid",
    norm_topk_key=None,
    correction_bias="e_score_correction_bias",  # on the block, passed to the router as an argument
    disk_blocks=("block_sparse_moe", "mlp"),
    disk_to_memory=_W1_W3_W2,
)

PHIMOE = MoEAdapter(
    name="PhiMoE",
    model_types=("phimoe",),
    expert_count_keys=("num_local_experts",),
    norm_topk_key=None,  # sparsemixer: softmax over the experts near the top logit
    router="router",
    disk_blocks=("block_sparse_moe", "mlp"),
    disk_to_memory=_W1_W3_W2,
    disk_router_tensors=("gate.weight",),  # in memory mlp.router, on disk block_sparse_moe.gate
)

HUNYUAN_MOE = MoEAdapter(
    name="HunYuan-MoE",
    model_types=("hunyuan_v1_moe",),
    expert_count_keys=("num_experts",),
    top_k_key="moe_topk",
    norm_topk_key=None,
    router_weight="wg.weight",  # the gate wraps an nn.Linear
    shared_expert_attrs=("shared_mlp",),
    notes=("per-layer expert counts (a list in num_experts) are not supported",),
)

DEEPSEEK_V2 = MoEAdapter(
    name="DeepSeek-V2",
    model_types=("deepseek_v2",),
    expert_count_keys=("n_routed_experts",),
    norm_topk_key=None,
    always_renormalises=False,  # softmax over all experts, top-k weights used as they are
    group_keys=("n_group", "topk_group"),  # used by topk_method=group_limited_greedy
    shared_expert_attrs=("shared_experts",),
    dense_layer_keys=("first_k_dense_replace",),
)

_DEEPSEEK_V3_LIKE = dict(
    expert_count_keys=("n_routed_experts",),
    scoring="sigmoid",
    correction_bias="gate.e_score_correction_bias",
    group_keys=("n_group", "topk_group"),
    shared_expert_attrs=("shared_experts",),
    dense_layer_keys=("first_k_dense_replace",),
    # DeepSeek-V3/R1 (model.layers.61.*) and GLM-4.5 (model.layers.92.*) ship MTP layers; config.json says
    # num_nextn_predict_layers, transformers 5 aliases it num_mtp_layers (vLLM deepseek_mtp.py, glm4_moe_mtp.py)
    mtp_count_keys=("num_nextn_predict_layers", "num_mtp_layers"),
)

DEEPSEEK_V3 = MoEAdapter(name="DeepSeek-V3", model_types=("deepseek_v3",), **_DEEPSEEK_V3_LIKE,
                         notes=("the multi-token-prediction layer (model.layers.61 on disk) is not loaded by "
                                "transformers; compile drops it by default (--mtp prune keeps it, pruned)",))
# Kimi-K2 (moonshotai): DeepSeek-V3's architecture (architectures: DeepseekV3ForCausalLM; 384 experts, one group,
# first layer dense, no MTP layer) under its own model_type, which transformers does not register
KIMI_K2 = MoEAdapter(name="Kimi-K2", model_types=("kimi_k2",), transformers_model_type="deepseek_v3",
                     **_DEEPSEEK_V3_LIKE)
DEEPSEEK_V32 = MoEAdapter(name="DeepSeek-V3.2", model_types=("deepseek_v32",), **_DEEPSEEK_V3_LIKE)
GLM4_MOE = MoEAdapter(name="GLM-4-MoE", model_types=("glm4_moe",), **_DEEPSEEK_V3_LIKE)
GLM4_MOE_LITE = MoEAdapter(name="GLM-4-MoE-Lite", model_types=("glm4_moe_lite",), **_DEEPSEEK_V3_LIKE)
DOTS1 = MoEAdapter(name="dots.llm1", model_types=("dots1",), **_DEEPSEEK_V3_LIKE)
SOLAR_OPEN = MoEAdapter(name="Solar-Open", model_types=("solar_open",), **_DEEPSEEK_V3_LIKE)
MIMO_V2_FLASH = MoEAdapter(name="MiMo-V2-Flash", model_types=("mimo_v2_flash",), **_DEEPSEEK_V3_LIKE)

KIMI_LINEAR = MoEAdapter(
    name="Kimi-Linear",
    model_types=("kimi_linear",),
    # config.json spells the counts its own way (transformers aliases them to the DeepSeek names)
    **{**_DEEPSEEK_V3_LIKE, "expert_count_keys": ("num_experts",), "group_keys": ("num_expert_group", "topk_group"),
       "dense_layer_keys": ("mlp_layer_types",)},
    top_k_key="num_experts_per_token",
    norm_topk_key="moe_renormalize",
    disk_blocks=("block_sparse_moe", "mlp"),  # saved as block_sparse_moe.experts.{i}.w1/w2/w3
    disk_to_memory=_W1_W3_W2,
)

EXAONE_MOE = MoEAdapter(
    name="EXAONE-MoE",
    model_types=("exaone_moe",),
    **{**_DEEPSEEK_V3_LIKE, "expert_count_keys": ("num_experts",),
       "dense_layer_keys": ("first_k_dense_replace", "mlp_layer_types")},
    disk_router_tensors=("gate.weight", "e_score_correction_bias"),  # the bias sits on the block on disk
)

HY_V3 = MoEAdapter(
    name="Hunyuan-V3",
    model_types=("hy_v3",),
    expert_count_keys=("num_experts",),
    scoring="sigmoid",
    norm_topk_key=None,
    correction_bias="e_score_correction_bias",  # on the block, passed to the router
    shared_expert_attrs=("shared_experts",),
    dense_layer_keys=("mlp_layer_types",),
    disk_router_tensors=("router.gate.weight", "expert_bias"),
    # transformers ignores model.layers.80.* (an MTP layer); the count's config name is not confirmed here, so
    # compile finds the layer on disk and writes num_nextn_predict_layers for it
    mtp_count_keys=("num_nextn_predict_layers",),
)

KOLIBRI1 = MoEAdapter(
    name="Kolibri-1",
    model_types=("kolibri1",),
    # transformers writes num_local_experts (num_experts is its alias); vLLM's kolibri1.py reads num_experts: both
    expert_count_keys=("num_local_experts", "num_experts"),
    scoring="sigmoid",  # top-k of logit + bias, sigmoid of the chosen logits
    correction_bias="gate.e_score_correction_bias",
    correction_bias_added_to="logit",
    shared_expert_attrs=("shared_experts",),
    disk_blocks=("mlp", "moe"),
    disk_router_tensors=("gate.weight", "router.expert_bias"),  # on disk the bias is model.layers.N.moe.router.*
)

AFMOE = MoEAdapter(
    name="AFMoE",
    model_types=("afmoe",),
    expert_count_keys=("num_experts",),
    scoring="sigmoid",
    norm_topk_key=None,
    router="router",
    router_weight="gate.weight",  # the router wraps an nn.Linear
    correction_bias="expert_bias",  # on the block, passed to the router
    shared_expert_attrs=("shared_experts",),
    dense_layer_keys=("num_dense_layers",),
)

LFM2_MOE = MoEAdapter(
    name="LFM2-MoE",
    model_types=("lfm2_moe",),
    expert_count_keys=("num_experts",),
    scoring="sigmoid",
    moe_block="feed_forward",
    correction_bias="expert_bias",  # on the block, used when use_expert_bias
    disk_to_memory=_W1_W3_W2,
    dense_layer_keys=("num_dense_layers",),
)

JAMBA = MoEAdapter(
    name="Jamba",
    model_types=("jamba",),
    expert_count_keys=("num_experts",),
    norm_topk_key=None,
    always_renormalises=False,  # softmax over all experts, top-k weights used as they are
    moe_block="feed_forward",
    router="router",
    dense_layer_keys=("expert_layer_period", "expert_layer_offset"),
)

QWEN3_5_MOE = MoEAdapter(
    name="Qwen3.5-MoE",
    model_types=("qwen3_5_moe_text",),  # the multimodal qwen3_5_moe config resolves through its text_config
    expert_count_keys=("num_experts",),
    norm_topk_key=None,  # always renormalises
    shared_expert_attrs=("shared_expert", "shared_expert_gate"),
)

ERNIE4_5_MOE = MoEAdapter(
    name="Ernie-4.5-MoE",
    model_types=("ernie4_5_moe",),
    expert_count_keys=("moe_num_experts",),
    top_k_key="moe_k",
    norm_topk_key=None,  # renormalised (clamped by moe_norm_min)
    correction_bias="gate.moe_statics.e_score_correction_bias",  # shape (1, experts)
    disk_router_tensors=("gate.weight", "moe_statics.e_score_correction_bias"),
    shared_expert_attrs=("shared_experts",),
    dense_layer_keys=("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"),
)

GRANITE_MOE = MoEAdapter(
    name="GraniteMoE",
    model_types=("granitemoe", "granitemoeshared", "granitemoehybrid"),
    expert_count_keys=("num_local_experts",),
    norm_topk_key=None,  # softmax over the top-k logits
    moe_block="block_sparse_moe",
    router="router",
    fused_on_disk=True,
    disk_router_tensors=("router.layer.weight",),
    disk_fused_experts=("input_linear.weight", "output_linear.weight"),
    disk_to_memory=(("input_linear.weight", "experts.gate_up_proj", 0, 1),
                    ("output_linear.weight", "experts.down_proj", 0, 1)),
    notes=("GraniteMoeShared/Hybrid's shared_mlp sits on the decoder layer, outside the sparse block",),
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
    dense_layer_keys=("moe_layers", "interleave_moe_layer_step"),
    fused_on_disk=True,
    expert_layout="matmul",  # gate_up_proj (E, H, 2I), down_proj (E, I, H)
    notes=("the router score scales the expert's input, not its output",),
)


class _GptOssAdapter(MoEAdapter):
    """GPT-OSS experts are not a SiLU-gated MLP: biases, interleaved gate/up, and a clamped SwiGLU.

    A subclass rather than a field: the activation reads two module constants
    (``alpha``, ``limit``) and two bias tensors that no other family has, so
    a generic "activation" string could not describe it.
    """

    def expert_output(self, experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]  # (tokens, 2I)
        gate = gate_up[..., ::2].clamp(max=experts.limit)  # (tokens, I)
        up = gate_up[..., 1::2].clamp(min=-experts.limit, max=experts.limit)  # (tokens, I)
        glu = gate * torch.sigmoid(gate * experts.alpha)
        return ((up + 1) * glu) @ experts.down_proj[expert] + experts.down_proj_bias[expert]  # (tokens, hidden)


GPT_OSS = _GptOssAdapter(
    name="GPT-OSS",
    model_types=("gpt_oss",),
    expert_count_keys=("num_local_experts",),
    norm_topk_key=None,  # softmax over the top-k logits
    router="router",
    router_bias_attrs=("bias",),
    fused_on_disk=True,
    expert_layout="matmul",
)

ALL: tuple[MoEAdapter, ...] = (
    QWEN3_MOE, QWEN2_MOE, QWEN3_NEXT, QWEN3_5_MOE, OLMOE, FLEX_OLMO, MIXTRAL, MINIMAX, MINIMAX_M2, PHIMOE,
    HUNYUAN_MOE, HY_V3, DEEPSEEK_V2, DEEPSEEK_V3, KIMI_K2, DEEPSEEK_V32, GLM4_MOE, GLM4_MOE_LITE, DOTS1, SOLAR_OPEN,
    MIMO_V2_FLASH, KIMI_LINEAR, EXAONE_MOE, KOLIBRI1, AFMOE, LFM2_MOE, JAMBA, ERNIE4_5_MOE, GRANITE_MOE, LLAMA4,
    GPT_OSS,
)
