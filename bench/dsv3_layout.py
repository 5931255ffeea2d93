"""DeepSeek-V3's on-disk layout at toy width: the scale rehearsal's checkpoint (issue 16).

Writes a checkpoint with the release's config.json fields and tensor names —
61 decoder layers (the first 3 dense), 256 routed + 1 shared expert per MoE
layer, top-8 in 8 groups of which 4 are used, sigmoid scores with a
correction bias, MLA attention, the multi-token-prediction layer 61
(``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.{norm,head}``,
``embed_tokens`` beside a full MoE decoder layer) and a
``model.safetensors.index.json`` over 163 shards named like the release's
(``model-00001-of-000163.safetensors``) — with hidden and expert widths in
the low hundreds, so 61 x 256 experts fit this disk (~0.8 GB bf16).

Two variants: bf16 (what transformers and premoe's streaming profile load),
and FP8 as released: every projection ``F8_E4M3`` with a ``weight_scale_inv``
(F32, one scale per 128 x 128 block, dequantised weight = fp8 x scale) and the
release's ``quantization_config``; router weights, norms, embeddings, heads and
``eh_proj`` stay bf16, the correction bias F32, as in the release's index.

Weights are random from a seed (N(0, 0.02); router rows wider so routing is
decisive; norms 1), so logits are finite. Every parameter of the layout is an
argument, so tests write a 5-layer version with the same names and shard count,
and ``--variant`` writes layouts nobody tuned for (keys shuffled inside shards,
experts of a layer scattered round-robin over shards).

Run from the repository root::

    OMP_NUM_THREADS=1 python bench/dsv3_layout.py /work/tmp/dsv3-bf16
    OMP_NUM_THREADS=1 python bench/dsv3_layout.py /work/tmp/dsv3-fp8 --fp8
    OMP_NUM_THREADS=1 python bench/dsv3_layout.py /work/tmp/dsv3-small --layers 5 --variant scattered
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# config.json of deepseek-ai/DeepSeek-V3 as released (widths and vocabulary replaced by Layout's)
RELEASE_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [128, 128]}
BLOCK = 128  # FP8 scale block (weight_block_size)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
VARIANTS = ("release", "scattered")


@dataclass(frozen=True)
class Layout:
    """The checkpoint to write. Defaults: DeepSeek-V3's counts at toy width."""

    layers: int = 61  # decoder layers (num_hidden_layers), the MTP layer comes after them
    experts: int = 256  # routed experts per MoE layer
    shards: int = 163  # safetensors files
    hidden: int = 128  # hidden_size (7168 released)
    moe_intermediate: int = 64  # per-expert MLP width (2048)
    intermediate: int = 384  # dense-layer MLP width (18432)
    heads: int = 4  # attention heads (128)
    q_lora_rank: int = 96  # (1536)
    kv_lora_rank: int = 64  # (512)
    qk_rope_head_dim: int = 16  # (64)
    qk_nope_head_dim: int = 32  # (128)
    v_head_dim: int = 32  # (128)
    vocab: int = 320  # the tiny tokenizer's (129280)
    first_dense: int = 3  # first_k_dense_replace
    top_k: int = 8
    n_group: int = 8
    topk_group: int = 4
    mtp: int = 1  # num_nextn_predict_layers
    fp8: bool = False
    model_type: str = "deepseek_v3"  # "kimi_k2": Kimi-K2's config.json names its own type for the same modules
    variant: str = "release"  # "release": keys in model order, cut into shards by size; "scattered": see module doc
    seed: int = 0

    def config(self) -> dict:
        """config.json: the release's fields with this layout's counts and widths."""
        config = {**RELEASE_CONFIG, "num_hidden_layers": self.layers, "n_routed_experts": self.experts,
                  "hidden_size": self.hidden, "moe_intermediate_size": self.moe_intermediate,
                  "intermediate_size": self.intermediate, "num_attention_heads": self.heads,
                  "num_key_value_heads": self.heads, "q_lora_rank": self.q_lora_rank,
                  "kv_lora_rank": self.kv_lora_rank, "qk_rope_head_dim": self.qk_rope_head_dim,
                  "qk_nope_head_dim": self.qk_nope_head_dim, "v_head_dim": self.v_head_dim, "vocab_size": self.vocab,
                  "first_k_dense_replace": self.first_dense, "num_experts_per_tok": self.top_k,
                  "n_group": self.n_group, "topk_group": self.topk_group, "num_nextn_predict_layers": self.mtp,
                  "max_position_embeddings": 4096, "model_type": self.model_type}
        if self.fp8:
            config["quantization_config"] = dict(QUANTIZATION_CONFIG)
        return dict(sorted(config.items()))

    def check(self) -> None:
        """Refuse layouts that would not be a valid DeepSeek-V3 or would misalign the hand-written shards."""
        widths = {k: v for k, v in asdict(self).items() if k in ("hidden", "moe_intermediate", "intermediate",
                                                                  "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
                                                                  "qk_nope_head_dim", "v_head_dim", "vocab")}
        odd = {k: v for k, v in widths.items() if v % 8}
        if odd:
            raise ValueError(f"widths must be multiples of 8 (tensor bytes stay 8-aligned): {odd}")
        if self.experts % self.n_group or self.top_k > self.topk_group * self.experts // self.n_group:
            raise ValueError(f"{self.experts} experts in {self.n_group} groups cannot route top-{self.top_k}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not 0 <= self.first_dense < self.layers:
            raise ValueError(f"first_dense {self.first_dense} must leave MoE layers among {self.layers}")


# --------------------------------------------------------------------------- names and shapes


def layer_tensors(layout: Layout, layer: int) -> dict[str, tuple[int, ...]]:
    """One decoder layer's tensors, on-disk names and shapes, in the release's order of sub-modules."""
    p, h = f"model.layers.{layer}.", layout.hidden
    qk = layout.qk_nope_head_dim + layout.qk_rope_head_dim
    shapes = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_a_proj.weight": (layout.q_lora_rank, h),
        p + "self_attn.q_a_layernorm.weight": (layout.q_lora_rank,),
        p + "self_attn.q_b_proj.weight": (layout.heads * qk, layout.q_lora_rank),
        p + "self_attn.kv_a_proj_with_mqa.weight": (layout.kv_lora_rank + layout.qk_rope_head_dim, h),
        p + "self_attn.kv_a_layernorm.weight": (layout.kv_lora_rank,),
        p + "self_attn.kv_b_proj.weight": (layout.heads * (layout.qk_nope_head_dim + layout.v_head_dim),
                                           layout.kv_lora_rank),
        p + "self_attn.o_proj.weight": (h, layout.heads * layout.v_head_dim),
        p + "post_attention_layernorm.weight": (h,),
    }
    if layer < layout.first_dense:
        shapes.update(_mlp(p + "mlp.", h, layout.intermediate))
        return shapes
    shapes[p + "mlp.gate.weight"] = (layout.experts, h)
    shapes[p + "mlp.gate.e_score_correction_bias"] = (layout.experts,)
    for e in range(layout.experts):
        shapes.update(_mlp(f"{p}mlp.experts.{e}.", h, layout.moe_intermediate))
    shapes.update(_mlp(p + "mlp.shared_experts.", h, layout.moe_intermediate * RELEASE_CONFIG["n_shared_experts"]))
    return shapes


def _mlp(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (width, hidden), prefix + "up_proj.weight": (width, hidden),
            prefix + "down_proj.weight": (hidden, width)}


def mtp_tensors(layout: Layout, layer: int) -> dict[str, tuple[int, ...]]:
    """The multi-token-prediction layer: a full MoE decoder layer plus its own norms, projection, embedding, head."""
    p, h = f"model.layers.{layer}.", layout.hidden
    extra = {p + "embed_tokens.weight": (layout.vocab, h), p + "enorm.weight": (h,), p + "hnorm.weight": (h,),
             p + "eh_proj.weight": (h, 2 * h), p + "shared_head.norm.weight": (h,),
             p + "shared_head.head.weight": (layout.vocab, h)}
    body = layer_tensors(replace(layout, first_dense=0), layer)  # always an MoE layer
    return {**extra, **body}


def all_tensors(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every bf16-variant tensor in model order: embeddings, layers, final norm and head, then the MTP layers."""
    shapes = {"model.embed_tokens.weight": (layout.vocab, layout.hidden)}
    for layer in range(layout.layers):
        shapes.update(layer_tensors(layout, layer))
    shapes["model.norm.weight"] = (layout.hidden,)
    shapes["lm_head.weight"] = (layout.vocab, layout.hidden)
    for layer in range(layout.layers, layout.layers + layout.mtp):
        shapes.update(mtp_tensors(layout, layer))
    return shapes


def quantized(key: str) -> bool:
    """Whether the FP8 release stores ``key`` as F8_E4M3 with a block scale: every projection except router/eh_proj."""
    return key.endswith("_proj.weight") and not key.endswith("eh_proj.weight")


# --------------------------------------------------------------------------- values


def _value(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random tensor for ``key``: norms 1, correction bias small F32, router rows wide, the rest N(0, 0.02)."""
    if key.endswith("e_score_correction_bias"):
        return (torch.randn(shape, generator=gen) * 0.1).float()
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 0.5 if key.endswith("mlp.gate.weight") else 0.02
    return (torch.randn(shape, generator=gen) * std).bfloat16()


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 block FP8 as DeepSeek ships it: fp8 weight (rows, cols), F32 scale_inv (⌈rows/128⌉, ⌈cols/128⌉).

    Dequantised weight = fp8 x scale_inv of its block (DeepSeek's ``weight_dequant``).
    """
    rows, cols = weight.shape
    br, bc = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(br * BLOCK, bc * BLOCK)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(br, BLOCK, bc, BLOCK)  # (row blocks, 128, col blocks, 128)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # (row blocks, col blocks)
    q = (blocks / scale[:, None, :, None]).view(br * BLOCK, bc * BLOCK)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def tensor_values(layout: Layout):
    """Yield (key, tensor) of the checkpoint in model order; FP8 weights are followed by their scale."""
    gen = torch.Generator().manual_seed(layout.seed)
    for key, shape in all_tensors(layout).items():
        value = _value(key, shape, gen)
        if layout.fp8 and quantized(key):
            q, scale = quantize_fp8(value)
            yield key, q
            yield key + "_scale_inv", scale
        else:
            yield key, value


# --------------------------------------------------------------------------- writing


_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def shard_name(number: int, total: int) -> str:
    """The release's shard names: five digits, then six for the total (``model-00001-of-000163.safetensors``)."""
    return f"model-{number:05d}-of-{total:06d}.safetensors"


def _assign_shards(layout: Layout, sizes: dict[str, int]) -> dict[str, int]:
    """Key -> shard index. "release": model order cut into equal byte runs (a layer's experts straddle
    shard ends); "scattered": each layer's experts dealt round-robin over every shard, the rest by bytes."""
    total = sum(sizes.values())
    target = total / layout.shards
    assigned, run = {}, 0
    for key, size in sizes.items():
        assigned[key] = min(int(run / target), layout.shards - 1)
        run += size
    if layout.variant == "scattered":
        rng = random.Random(layout.seed)
        offset = {}
        for key in sizes:
            parts = key.split(".")
            if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
                layer, expert = int(parts[2]), int(parts[parts.index("experts") + 1])
                start = offset.setdefault(layer, rng.randrange(layout.shards))
                assigned[key] = (start + expert) % layout.shards
    return assigned


def write_shard(file: Path, tensors: list[tuple[str, torch.Tensor]], shuffle: random.Random | None) -> None:
    """A safetensors file with the tensors in the given order (or shuffled): JSON header, 8-aligned data start."""
    if shuffle is not None:
        tensors = list(tensors)
        shuffle.shuffle(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, value in tensors:
        nbytes = value.numel() * value.element_size()
        header[key] = {"dtype": _DTYPES[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, value in tensors:
            f.write(value.contiguous().view(torch.uint8).numpy().tobytes())


def write(layout: Layout, out: str | Path, force: bool = False) -> Path:
    """Write the checkpoint of ``layout`` into ``out`` (through a temp dir, renamed at the end); returns ``out``.

    Memory: one shard's tensors at a time (tensors are generated in model
    order and shards fill in that order, except the "scattered" variant,
    which holds the whole checkpoint — use it at test sizes).
    """
    layout.check()
    out = Path(out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists; pass force=True / --force to replace it")
        shutil.rmtree(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes = {}
    for key, shape in all_tensors(layout).items():
        size = math.prod(shape) * (1 if layout.fp8 and quantized(key) else 4 if key.endswith("bias") else 2)
        sizes[key] = size
    assigned = _assign_shards(layout, sizes)
    shuffle = random.Random(layout.seed + 1) if layout.variant == "scattered" else None
    pending: dict[int, list[tuple[str, torch.Tensor]]] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for key, value in tensor_values(layout):
        shard = assigned[key.removesuffix("_scale_inv")]
        pending.setdefault(shard, []).append((key, value))
        weight_map[key] = shard_name(shard + 1, layout.shards)
        total += value.numel() * value.element_size()
        if layout.variant == "release":
            for done in [s for s in pending if s < shard]:  # model order: earlier shards are complete
                write_shard(tmp / shard_name(done + 1, layout.shards), pending.pop(done), None)
    for shard, tensors in pending.items():
        write_shard(tmp / shard_name(shard + 1, layout.shards), tensors, shuffle)
    for missing in set(range(layout.shards)) - {int(n[6:11]) - 1 for n in weight_map.values()}:
        raise ValueError(f"shard {missing + 1} would be empty: use fewer shards than tensors")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(layout.config(), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"_from_model_config": True, "bos_token_id": 0,
                                                             "eos_token_id": 1, "do_sample": True,
                                                             "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")
    _save_tokenizer(tmp)
    (tmp / "dsv3_layout.json").write_text(json.dumps(asdict(layout), indent=2) + "\n")  # how it was made
    tmp.rename(out)
    return out


def _save_tokenizer(path: Path) -> None:
    """The tiny byte-level BPE of tests/tiny.py (the release's 129k vocabulary would not be toy width)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    tiny.tiny_tokenizer().save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="checkpoint directory to write (e.g. under /work/tmp)")
    defaults = Layout()
    for name in ("layers", "experts", "shards", "hidden", "moe_intermediate", "intermediate", "first_dense", "mtp",
                 "top_k", "n_group", "topk_group", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--fp8", action="store_true", help="FP8 e4m3 weights with 128x128 block scales")
    parser.add_argument("--variant", choices=VARIANTS, default="release")
    parser.add_argument("--model-type", default="deepseek_v3",
                        help="config.json's model_type (kimi_k2 with --experts 384 --n-group 1 --topk-group 1 "
                             "--first-dense 1 --mtp 0 is Kimi-K2's layout)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if args.out.exists() and not args.force:  # one line, as premoe's own commands say it
        parser.error(f"{args.out} exists; pass --force to replace it")
    fields = {k: v for k, v in vars(args).items() if k not in ("out", "force")}
    started = time.perf_counter()
    out = write(Layout(**fields), args.out, force=args.force)
    disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    tensors = len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    print(f"wrote {out}: {tensors} tensors, {len(list(out.glob('*.safetensors')))} shards, {disk / 1e6:.0f} MB, "
          f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
