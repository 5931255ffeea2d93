"""What vLLM's model loader reads from a checkpoint, per architecture, as data (vLLM cannot run here).

Each entry was read from vLLM's source (github.com/vllm-project/vllm, vllm/model_executor/models/;
``source`` names the file, the commit it was read at, and the class/function): the config fields the MoE
block reads for the routed-expert count, top-k, groups and the experts' hidden size, and the checkpoint
key names its ``load_weights`` / ``get_expert_mapping`` (``FusedMoE.make_expert_params_mapping`` with
``ckpt_gate_proj_name``/``ckpt_down_proj_name``/``ckpt_up_proj_name``, default gate_proj/down_proj/up_proj)
or ``hf_to_vllm_mapper`` accepts. Key templates are relative to the decoder layer (``model.layers.{layer}.``);
``{expert}`` runs over 0..count-1. ``router_rows`` are tensors whose first dimension vLLM allocates as the
expert count (the router ``ReplicatedLinear(hidden, num_experts)`` / ``GateLinear``, its bias, the
correction bias); ``router_cols`` hold the count in their last dimension. ``expert_shapes`` give each expert
key's shape in symbols vLLM sizes ``FusedMoE`` with: ``E`` the count, ``H`` ``hidden_size``, ``I`` the first
of ``intermediate_keys`` the config sets (per-expert tensors omit ``E``).

Keys are the family names of tests/tiny.py; every family there has an entry here or in ``NO_VLLM``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VllmExpectation:
    architecture: str  # vLLM's registry key (_TEXT_GENERATION_MODELS), matched against config.architectures[0]
    source: str  # vLLM file @ commit :: class/function the facts were read from
    count_key: str  # config field vLLM reads for the routed-expert count
    topk_key: str  # config field vLLM reads for the experts per token
    expert_keys: tuple[str, ...]  # per-expert templates (with {expert}) or fused keys (experts on dim 0)
    router_rows: tuple[str, ...]  # tensors with one row per expert
    fused: bool = False  # True: one tensor holds every expert (dim 0); False: one tensor per expert
    group_keys: tuple[str, ...] = ()  # grouped routing: (n_group field, topk_group field)
    also_count_keys: tuple[str, ...] = ()  # other names of the count that must agree (other readers)
    expert_shapes: tuple[tuple[str, ...], ...] = ()  # one per expert_keys entry, in E/H/I/2I symbols
    intermediate_keys: tuple[str, ...] = ()  # config field(s) vLLM sizes each expert with, first set wins
    router_cols: tuple[str, ...] = ()  # tensors whose last dimension is the expert count
    shared_keys: tuple[str, ...] = ()  # shared-expert tensors vLLM loads: present, shape untouched
    # the name transformers' save_pretrained writes where vLLM's registry spells it otherwise: released
    # checkpoints carry vLLM's spelling (compile keeps the source's), a transformers-saved one does not
    transformers_architecture: str = ""
    # config fields this loader reads that transformers' config class does not write (the release's
    # config.json carries them); compile must copy them through unchanged
    config_gaps: tuple[str, ...] = ()


def _mlp(block: str = "mlp", gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> tuple[str, ...]:
    """Per-expert templates of a SiLU-gated expert MLP: gate, up, down."""
    return tuple(f"{block}.experts.{{expert}}.{name}.weight" for name in (gate, up, down))


def _shared(prefix: str) -> tuple[str, ...]:
    """A shared expert's gate/up/down projections under ``prefix``."""
    return tuple(f"{prefix}.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj"))


_PER_EXPERT_MLP = _mlp()
_MLP_SHAPES = (("I", "H"), ("I", "H"), ("H", "I"))  # gate (I, H), up (I, H), down (H, I)
_W1_W3_W2 = _mlp("block_sparse_moe", "w1", "w3", "w2")  # Mixtral naming: w1 gate, w3 up, w2 down
_MOE_I = ("moe_intermediate_size",)
_DENSE_I = ("intermediate_size",)
_GATE_AND_BIAS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
_DEEPSEEK_MOE = dict(  # deepseek_v2.py DeepseekV2MoE and the families built like it: grouped, biased router
    count_key="n_routed_experts", topk_key="num_experts_per_tok", expert_keys=_PER_EXPERT_MLP,
    router_rows=_GATE_AND_BIAS, group_keys=("n_group", "topk_group"), expert_shapes=_MLP_SHAPES,
    intermediate_keys=_MOE_I)
_GRANITE = dict(  # granitemoe.py GraniteMoeForCausalLM.load_weights splits these per expert
    count_key="num_local_experts", topk_key="num_experts_per_tok",
    expert_keys=("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
    router_rows=("block_sparse_moe.router.layer.weight",), fused=True,
    expert_shapes=(("E", "2I", "H"), ("E", "H", "I")), intermediate_keys=_DENSE_I)
_GRANITE_SHARED = ("shared_mlp.input_linear.weight", "shared_mlp.output_linear.weight")

EXPECTATIONS: dict[str, VllmExpectation] = {
    "qwen3_moe": VllmExpectation(
        "Qwen3MoeForCausalLM",
        "qwen3_moe.py :: Qwen3MoeSparseMoeBlock.__init__ (FusedMoE(num_experts=config.num_experts, "
        "top_k=config.num_experts_per_tok), gate ReplicatedLinear(hidden, num_experts)); "
        "Qwen3MoeModel.get_expert_mapping (gate_proj/down_proj/up_proj, num_experts=config.num_experts)",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.gate.weight",),
        also_count_keys=("num_local_experts",),  # what transformers 5 reads (and writes) for Qwen3-MoE
        expert_shapes=_MLP_SHAPES, intermediate_keys=_MOE_I),
    "qwen2_moe": VllmExpectation(
        "Qwen2MoeForCausalLM",
        "qwen2_moe.py :: Qwen2MoeSparseMoeBlock.__init__ (gate ReplicatedLinear(hidden, config.num_experts), "
        "SharedFusedMoE(num_experts=config.num_experts, top_k=config.num_experts_per_tok), shared_expert + "
        "shared_expert_gate); Qwen2MoeModel.get_expert_mapping (gate_proj/down_proj/up_proj)",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.gate.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_MOE_I,
        shared_keys=(*_shared("mlp.shared_expert"), "mlp.shared_expert_gate.weight")),
    "qwen3_next": VllmExpectation(
        "Qwen3NextForCausalLM",
        "qwen3_next.py @002d6073 :: Qwen3NextSparseMoeBlock.__init__ (gate ReplicatedLinear(hidden, "
        "config.num_experts), shared_expert_gate ReplicatedLinear(hidden, 1), shared_expert "
        "(shared_expert_intermediate_size), FusedMoEFactory(num_experts=config.num_experts, "
        "top_k=config.num_experts_per_tok, intermediate_size=config.moe_intermediate_size)); "
        "AutoWeightsLoader with FusedMoE's default gate_proj/up_proj/down_proj names",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.gate.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_MOE_I,
        shared_keys=(*_shared("mlp.shared_expert"), "mlp.shared_expert_gate.weight")),
    "qwen3_5_moe_text": VllmExpectation(
        "Qwen3_5MoeForCausalLM",
        "qwen3_5.py @00def4f8 :: Qwen3_5DecoderLayer (model_type qwen3_5_moe_text -> qwen3_next.py "
        "Qwen3NextSparseMoeBlock, as Qwen3-Next), Qwen3_5Model.load_weights (get_expert_mapping "
        "gate_proj/down_proj/up_proj, or fused experts.gate_up_proj/down_proj), Qwen3_5MoeForCausalLM; "
        "the text-only registry key is in newer registry.py (older ones list only "
        "Qwen3_5MoeForConditionalGeneration)",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.gate.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_MOE_I,
        shared_keys=(*_shared("mlp.shared_expert"), "mlp.shared_expert_gate.weight")),
    "olmoe": VllmExpectation(
        "OlmoeForCausalLM",
        "olmoe.py :: OlmoeDecoderLayer.__init__ (OlmoeMoE(num_experts=config.num_experts, "
        "top_k=config.num_experts_per_tok)); OlmoeModel.get_expert_mapping (gate_proj/down_proj/up_proj)",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.gate.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_DENSE_I),
    "flex_olmo": VllmExpectation(
        "FlexOlmoForCausalLM",
        "flex_olmo.py @1b360436 :: FlexOlmoMoE.__init__ (gate ReplicatedLinear(hidden, config.num_experts), "
        "FusedMoEFactory(num_experts=config.num_experts, top_k=config.num_experts_per_tok, "
        "intermediate_size=config.intermediate_size)); FlexOlmoForCausalLM(OlmoeForCausalLM) loads as OLMoE",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.gate.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_DENSE_I),
    "mixtral": VllmExpectation(
        "MixtralForCausalLM",
        "mixtral.py :: MixtralDecoderLayer.__init__ (MixtralMoE(num_experts=config.num_local_experts, "
        "top_k=config.num_experts_per_tok), block_sparse_moe.gate); MixtralModel.get_expert_mapping "
        "(ckpt names w1/w2/w3, num_experts=config.num_local_experts)",
        "num_local_experts", "num_experts_per_tok", _W1_W3_W2, ("block_sparse_moe.gate.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_DENSE_I),
    "minimax": VllmExpectation(
        "MiniMaxForCausalLM",
        "minimax_text_01.py @01c91c00 :: MiniMaxText01MoE.__init__ (gate ReplicatedLinear(hidden, num_experts), "
        "FusedMoE(num_experts, top_k, intermediate_size)) built from config.num_local_experts/"
        "num_experts_per_tok/intermediate_size; load_weights (block_sparse_moe.experts.{i}.w1/w2/w3, "
        "range(config.num_local_experts)); registry: MiniMaxForCausalLM -> MiniMaxText01ForCausalLM",
        "num_local_experts", "num_experts_per_tok", _W1_W3_W2, ("block_sparse_moe.gate.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_DENSE_I,
        config_gaps=("attn_type_list",)),  # transformers' MiniMaxConfig writes layer_types instead
    "minimax_m2": VllmExpectation(
        "MiniMaxM2ForCausalLM",
        "minimax_m2.py @01d99586 :: MiniMaxM2MoE.__init__ (e_score_correction_bias "
        "Parameter(config.num_local_experts) on the block iff config.use_routing_bias, gate "
        "ReplicatedLinear(hidden, num_local_experts), FusedMoE(num_local_experts, num_experts_per_tok, "
        "intermediate_size, scoring_func=config.scoring_func)); MiniMaxM2DecoderLayer.block_sparse_moe; "
        "MiniMaxM2Model.get_expert_mapping (w1/w2/w3, num_experts=config.num_local_experts)",
        "num_local_experts", "num_experts_per_tok", _W1_W3_W2,
        ("block_sparse_moe.gate.weight", "block_sparse_moe.e_score_correction_bias"),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_DENSE_I,
        config_gaps=("use_routing_bias", "scoring_func", "rotary_dim")),  # without use_routing_bias: no bias
    "phimoe": VllmExpectation(
        "PhiMoEForCausalLM",
        "phimoe.py @01524004 :: PhiMoEDecoderLayer.__init__ (block_sparse_moe = PhiMoE(num_experts="
        "config.num_local_experts, top_k=config.num_experts_per_tok, intermediate_size=config."
        "intermediate_size), gate ReplicatedLinear(hidden, num_experts)); PhiMoEModel.get_expert_mapping "
        "(w1/w2/w3, num_local_experts)",
        "num_local_experts", "num_experts_per_tok", _W1_W3_W2, ("block_sparse_moe.gate.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_DENSE_I,
        transformers_architecture="PhimoeForCausalLM"),
    "hunyuan_v1_moe": VllmExpectation(
        "HunYuanMoEV1ForCausalLM",
        "hunyuan_v1.py @00f8d445 :: HunYuanSparseMoeBlock.__init__ (gate ReplicatedLinear(hidden, "
        "config.num_experts), top_k config.moe_topk, intermediate moe_intermediate_size if set else "
        "intermediate_size, shared_mlp iff config.use_mixed_mlp_moe); HunYuanModel.load_weights "
        "('mlp.gate.wg.' -> 'mlp.gate.'), get_expert_mapping (gate_proj/down_proj/up_proj, num_experts)",
        "num_experts", "moe_topk", _PER_EXPERT_MLP, ("mlp.gate.wg.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=("moe_intermediate_size", "intermediate_size"),
        shared_keys=_shared("mlp.shared_mlp"), config_gaps=("use_mixed_mlp_moe", "num_shared_expert")),
    "hy_v3": VllmExpectation(
        "HYV3ForCausalLM",
        "hy_v3.py @055e47c2 :: HYV3MoEFused.__init__ (gate GateLinear(hidden, config.num_experts), "
        "expert_bias Parameter(num_experts) on the block, shared_mlp (expert_hidden_dim * num_shared_experts), "
        "FusedMoEFactory(num_experts, top_k=num_experts_per_tok, intermediate_size=config.expert_hidden_dim)); "
        "HYV3Model.load_weights ('router.gate.' -> 'gate.'), get_expert_mapping (gate/down/up_proj); "
        "HYV3DecoderLayer raises without config.first_k_dense_replace",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.router.gate.weight", "mlp.expert_bias"),
        expert_shapes=_MLP_SHAPES, intermediate_keys=("expert_hidden_dim",),
        shared_keys=_shared("mlp.shared_mlp"),
        # transformers' HYV3Config writes moe_intermediate_size and mlp_layer_types instead
        config_gaps=("expert_hidden_dim", "first_k_dense_replace", "route_norm")),
    "deepseek_v2": VllmExpectation(
        "DeepseekV2ForCausalLM",
        "deepseek_v2.py :: DeepseekV2MoE.__init__ (GateLinear(hidden, config.n_routed_experts), "
        "FusedMoE(num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok, "
        "num_expert_group=n_group, topk_group=topk_group)); load_weights (gate_proj/down_proj/up_proj)",
        "n_routed_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.gate.weight",),
        group_keys=("n_group", "topk_group"), expert_shapes=_MLP_SHAPES, intermediate_keys=_MOE_I,
        shared_keys=_shared("mlp.shared_experts")),
    "deepseek_v3": VllmExpectation(
        "DeepseekV3ForCausalLM",
        "deepseek_v2.py :: DeepseekV2MoE.__init__ (as DeepSeek-V2, plus gate.e_score_correction_bias "
        "Parameter(n_routed_experts) when topk_method == 'noaux_tc')",
        **_DEEPSEEK_MOE,
        shared_keys=_shared("mlp.shared_experts")),
    "deepseek_v32": VllmExpectation(
        "DeepseekV32ForCausalLM",
        "registry.py (vllm-project/vllm, _TEXT_GENERATION_MODELS): DeepseekV32ForCausalLM -> "
        "deepseek_v2.py DeepseekV3ForCausalLM, so DeepseekV2MoE as for DeepSeek-V3",
        **_DEEPSEEK_MOE,
        shared_keys=_shared("mlp.shared_experts")),
    "glm4_moe": VllmExpectation(
        "Glm4MoeForCausalLM",
        "glm4_moe.py @002d6073 :: Glm4MoE.__init__ (gate nn.Linear(hidden, config.n_routed_experts), "
        "gate.e_score_correction_bias Parameter(n_routed_experts), shared_experts (moe_intermediate_size * "
        "n_shared_experts), FusedMoEFactory(n_routed_experts, num_experts_per_tok, moe_intermediate_size, "
        "num_expert_group=n_group, topk_group=topk_group)); Glm4MoeModel.load_weights (AutoWeightsLoader, "
        "FusedMoE default gate_proj/up_proj/down_proj)",
        **_DEEPSEEK_MOE,
        shared_keys=_shared("mlp.shared_experts")),
    "glm4_moe_lite": VllmExpectation(
        "Glm4MoeLiteForCausalLM",
        "glm4_moe_lite.py @055e47c2 :: Glm4MoeLite(Glm4MoE) (as GLM-4-MoE), Glm4MoeLiteDecoderLayer (MoE iff "
        "layer >= first_k_dense_replace and layer % moe_layer_freq == 0), Glm4MoeLiteModel.load_weights "
        "(gate_proj/down_proj/up_proj, num_experts=config.n_routed_experts)",
        **_DEEPSEEK_MOE,
        shared_keys=_shared("mlp.shared_experts")),
    "dots1": VllmExpectation(
        "Dots1ForCausalLM",
        "dots1.py @00bd1493 :: Dots1MoE.__init__ (gate ReplicatedLinear(hidden, config.n_routed_experts), "
        "gate.e_score_correction_bias iff config.topk_method == 'noaux_tc', shared_experts, "
        "SharedFusedMoE(n_routed_experts, num_experts_per_tok, moe_intermediate_size, n_group, topk_group, "
        "scoring_func=config.scoring_func)); Dots1Model.get_expert_mapping (gate/down/up_proj)",
        **_DEEPSEEK_MOE,
        shared_keys=_shared("mlp.shared_experts"),
        config_gaps=("topk_method", "scoring_func", "moe_layer_freq")),  # no topk_method: no bias parameter
    "solar_open": VllmExpectation(
        "SolarOpenForCausalLM",
        "solar_open.py @5ac0eaec :: SolarOpenMoE.__init__ (gate nn.Linear(hidden, config.n_routed_experts), "
        "gate.e_score_correction_bias, shared_experts (moe_intermediate_size * n_shared_experts), "
        "SharedFusedMoE(n_routed_experts, num_experts_per_tok, moe_intermediate_size, n_group, topk_group)); "
        "SolarOpenModel.get_expert_mapping (gate/down/up_proj); every layer MoE",
        **_DEEPSEEK_MOE,
        shared_keys=_shared("mlp.shared_experts")),
    "mimo_v2_flash": VllmExpectation(
        "MiMoV2FlashForCausalLM",
        "mimo_v2.py @055e47c2 (mimo_v2_flash.py in older trees) :: MiMoV2MoE.__init__ (gate nn.Linear(hidden, "
        "config.n_routed_experts), gate.e_score_correction_bias, FusedMoEFactory(n_routed_experts, "
        "num_experts_per_tok, moe_intermediate_size, num_expert_group=n_group, topk_group)); no shared expert; "
        "MiMoV2FlashDecoderLayer.is_moe_layer reads config.moe_layer_freq[i]",
        **_DEEPSEEK_MOE,
        # transformers' MiMoV2FlashConfig writes mlp_layer_types/layer_types/rms_norm_eps instead
        config_gaps=("moe_layer_freq", "hybrid_layer_pattern", "layernorm_epsilon")),
    "kimi_linear": VllmExpectation(
        "KimiLinearForCausalLM",
        "kimi_linear.py @01d99586 :: KimiMoE.__init__ (gate ReplicatedLinear(hidden, config.num_experts), "
        "gate.e_score_correction_bias, FusedMoE(num_experts, top_k=config.num_experts_per_token, "
        "moe_intermediate_size, num_expert_group, topk_group), shared_experts (moe_intermediate_size * "
        "num_shared_experts)); KimiDecoderLayer.block_sparse_moe; KimiLinearModel.load_weights (w1/w2/w3, "
        "num_experts=config.num_experts)",
        "num_experts", "num_experts_per_token", _W1_W3_W2,
        ("block_sparse_moe.gate.weight", "block_sparse_moe.gate.e_score_correction_bias"),
        group_keys=("num_expert_group", "topk_group"), expert_shapes=_MLP_SHAPES, intermediate_keys=_MOE_I,
        shared_keys=_shared("block_sparse_moe.shared_experts")),
    "exaone_moe": VllmExpectation(
        "ExaoneMoEForCausalLM",
        "exaone_moe.py @055e47c2 :: ExaoneMoe.__init__ (gate ReplicatedLinear(hidden, config.num_experts), "
        "e_score_correction_bias Parameter(num_experts) on the block, shared_experts, FusedMoEFactory("
        "num_experts, num_experts_per_tok, moe_intermediate_size, num_expert_group=n_group, topk_group)); "
        "ExaoneMoeForCausalLM.hf_to_vllm_mapper (FusedMoE default gate/up/down_proj); MoE iff "
        "mlp_layer_types[i] == 'sparse'; registry.py key ExaoneMoEForCausalLM",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.gate.weight", "mlp.e_score_correction_bias"),
        group_keys=("n_group", "topk_group"), expert_shapes=_MLP_SHAPES, intermediate_keys=_MOE_I,
        shared_keys=_shared("mlp.shared_experts"), transformers_architecture="ExaoneMoeForCausalLM"),
    "kolibri1": VllmExpectation(
        "Kolibri1ForCausalLM",
        "kolibri1.py @685269b9 :: Kolibri1SparseMoeBlock.__init__ (gate GateLinear(hidden, config.num_experts), "
        "gate.e_score_correction_bias, shared_experts Qwen3MoeMLP(shared_expert_intermediate_size), "
        "FusedMoEFactory(num_experts, num_experts_per_tok, moe_intermediate_size)); Kolibri1Model."
        "hf_to_vllm_mapper ('.moe.router.expert_bias' -> '.mlp.gate.e_score_correction_bias'), Qwen3-MoE "
        "expert names",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.gate.weight", "moe.router.expert_bias"),
        also_count_keys=("num_local_experts",),  # transformers' Kolibri1Config: num_experts -> num_local_experts
        expert_shapes=_MLP_SHAPES, intermediate_keys=_MOE_I, shared_keys=_shared("mlp.shared_experts")),
    "afmoe": VllmExpectation(
        "AfmoeForCausalLM",
        "afmoe.py @055e47c2 :: AfmoeMoE.__init__ (shared_experts (moe_intermediate_size * num_shared_experts), "
        "FusedMoEFactory(config.num_experts, num_experts_per_tok, moe_intermediate_size, "
        "num_expert_group=config.n_group, topk_group=config.topk_group, e_score_correction_bias=expert_bias)); "
        "AfmoeForCausalLM.hf_to_vllm_mapper ('.router.gate.weight' -> '.gate.weight'); MoE iff "
        "layer >= num_dense_layers",
        "num_experts", "num_experts_per_tok", _PER_EXPERT_MLP, ("mlp.router.gate.weight", "mlp.expert_bias"),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_MOE_I, shared_keys=_shared("mlp.shared_experts"),
        config_gaps=("n_group", "topk_group")),  # vLLM routes in groups; premoe's AFMoE adapter has no group_keys
    "lfm2_moe": VllmExpectation(
        "Lfm2MoeForCausalLM",
        "lfm2_moe.py @030ea52e :: Lfm2MoeSparseMoeBlock.__init__ (gate ReplicatedLinear(hidden, "
        "config.num_experts), gate.e_score_correction_bias iff use_expert_bias, FusedMoEFactory(num_experts, "
        "num_experts_per_tok, moe_intermediate_size, ckpt_names=('w1', 'w2', 'w3'))); Lfm2MoeModel."
        "hf_to_vllm_mapper ('expert_bias' -> 'gate.e_score_correction_bias'); layer attribute feed_forward",
        "num_experts", "num_experts_per_tok", _mlp("feed_forward", "w1", "w3", "w2"),
        ("feed_forward.gate.weight", "feed_forward.expert_bias"), expert_shapes=_MLP_SHAPES,
        intermediate_keys=_MOE_I),
    "jamba": VllmExpectation(
        "JambaForCausalLM",
        "jamba.py @002b4cf8 :: JambaMoE.__init__ (router ReplicatedLinear(hidden, config.num_experts), "
        "FusedMoE(num_experts, num_experts_per_tok, intermediate_size)); layer attribute feed_forward (MoE iff "
        "config.layers_num_experts[i] > 1); JambaModel.get_expert_mapping (gate/down/up_proj, num_experts)",
        "num_experts", "num_experts_per_tok", _mlp("feed_forward"), ("feed_forward.router.weight",),
        expert_shapes=_MLP_SHAPES, intermediate_keys=_DENSE_I),
    "ernie4_5_moe": VllmExpectation(
        "Ernie4_5_MoeForCausalLM",
        "ernie45_moe.py @0028a751 :: Ernie4_5_MoeMoE.__init__ (gate ReplicatedLinear(hidden, "
        "config.moe_num_experts), gate.e_score_correction_bias Parameter(moe_num_experts), FusedMoE("
        "moe_num_experts, top_k=config.moe_k, moe_intermediate_size), shared_experts); load_weights "
        "(moe_statics.e_score_correction_bias -> gate.e_score_correction_bias, its (1, E) squeezed), "
        "get_expert_mapping (gate/down/up_proj, moe_num_experts)",
        "moe_num_experts", "moe_k", _PER_EXPERT_MLP, ("mlp.gate.weight",),
        router_cols=("mlp.moe_statics.e_score_correction_bias",), expert_shapes=_MLP_SHAPES,
        intermediate_keys=_MOE_I, shared_keys=_shared("mlp.shared_experts")),
    "granitemoe": VllmExpectation(
        "GraniteMoeForCausalLM",
        "granitemoe.py @045e2000 :: GraniteMoeDecoderLayer (block_sparse_moe = GraniteMoeMoE(num_experts="
        "config.num_local_experts, top_k=num_experts_per_tok, intermediate_size)); GraniteMoeForCausalLM."
        "load_weights (input_linear (E, 2I, H) chunked per expert into w1/w3, output_linear into w2, "
        "router.layer -> gate)", **_GRANITE),
    "granitemoeshared": VllmExpectation(
        "GraniteMoeSharedForCausalLM",
        "granitemoeshared.py @055e47c2 :: GraniteMoeSharedDecoderLayer (block_sparse_moe + shared_mlp), "
        "GraniteMoeSharedModel.load_weights = GraniteMoeModel.load_weights (granitemoe.py's mapping)",
        shared_keys=_GRANITE_SHARED, **_GRANITE),
    "granitemoehybrid": VllmExpectation(
        "GraniteMoeHybridForCausalLM",
        "granitemoehybrid.py @0195c9ec :: GraniteMoeHybridModel.load_weights (block_sparse_moe.input_linear/"
        "output_linear per expert into w1/w3/w2, router.layer -> gate), shared_mlp",
        shared_keys=_GRANITE_SHARED, **_GRANITE),
    "llama4_text": VllmExpectation(
        "Llama4ForCausalLM",
        "llama4.py @0121c95e :: Llama4MoE.__init__ (router ReplicatedLinear(hidden, config.num_local_experts), "
        "FusedMoE(num_local_experts, num_experts_per_tok, intermediate_size), shared_expert); "
        "Llama4Model.load_moe_expert_weights (fused experts.gate_up_proj chunked on the last dim and "
        "transposed, experts.down_proj); MoE iff (i + 1) % interleave_moe_layer_step == 0",
        "num_local_experts", "num_experts_per_tok",
        ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"), ("feed_forward.router.weight",),
        fused=True, expert_shapes=(("E", "H", "2I"), ("E", "I", "H")), intermediate_keys=_DENSE_I,
        shared_keys=_shared("feed_forward.shared_expert")),
    "gpt_oss": VllmExpectation(
        "GptOssForCausalLM",
        "gpt_oss.py :: MLPBlock.__init__ (router Linear(hidden, config.num_local_experts) with bias, "
        "FusedMoE(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok)); "
        "GptOssForCausalLM.hf_to_vllm_mapper (.gate_up_proj -> w13_weight, .down_proj -> w2_weight, "
        ".gate_up_proj_bias -> w13_bias, .down_proj_bias -> w2_bias)",
        "num_local_experts", "num_experts_per_tok",
        ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj",
         "mlp.experts.down_proj_bias"), ("mlp.router.weight", "mlp.router.bias"), fused=True,
        expert_shapes=(("E", "H", "2I"), ("E", "2I"), ("E", "I", "H"), ("E", "H")), intermediate_keys=_DENSE_I),
}

#: families with no vLLM model, and why (every family premoe supports has one in vLLM's tree today)
NO_VLLM: dict[str, str] = {}
