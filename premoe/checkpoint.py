"""Read safetensors checkpoints without loading them: shard index, headers, tensor sizes.

Compile, memory budgets and streaming all need to know what is in a
checkpoint before touching weights; a safetensors header is 8 bytes of
length plus JSON, so all of this is cheap even for a 700B model.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from premoe.errors import CheckpointError, MissingFileError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shard: str  # file name inside the checkpoint directory
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the shard's data section

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def shard_files(path: Path) -> list[str]:
    """The safetensors files of a checkpoint, in index order."""
    if (path / INDEX).exists():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    if (path / SINGLE).exists():
        return [SINGLE]
    raise MissingFileError(f"{path} has neither {INDEX} nor {SINGLE}; premoe reads safetensors checkpoints")


def read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file and the offset where its data starts."""
    if not file.exists():
        raise MissingFileError(f"shard {file} is missing; the checkpoint is incomplete (re-download it)")
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file} is truncated: no safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise CheckpointError(f"{file} is not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file} has a corrupt safetensors header ({e.msg})") from e
    return header, 8 + length


def tensors(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, by key, checked against the shard sizes."""
    found: dict[str, TensorInfo] = {}
    for shard in shard_files(path):
        header, data_start = read_header(path / shard)
        size = (path / shard).stat().st_size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise CheckpointError(f"{path / shard} is truncated: tensor {key} ends at byte {data_start + end}, "
                                      f"file has {size}")
            found[key] = TensorInfo(key, shard, info["dtype"], tuple(info["shape"]), (begin, end))
    if (path / INDEX).exists():
        missing = set(json.loads((path / INDEX).read_text())["weight_map"]) - set(found)
        if missing:
            raise CheckpointError(f"{path / INDEX} lists {len(missing)} tensors no shard holds, e.g. {sorted(missing)[0]}")
    return found


@dataclass(frozen=True)
class SizeBreakdown:
    total_bytes: int
    base_bytes: int  # everything that is not a routed expert (attention, embeddings, shared experts, routers)
    expert_bytes: dict[int, int]  # decoder layer -> bytes of ONE routed expert in that layer (incl. its router row)
    num_experts: int

    def bytes_with(self, kept_per_layer: dict[int, int]) -> int:
        return self.base_bytes + sum(self.expert_bytes[l] * n for l, n in kept_per_layer.items())


def size_breakdown(path: Path, adapter, num_experts: int) -> SizeBreakdown:
    """How the checkpoint's bytes split between routed experts and the rest."""
    per_layer: dict[int, int] = {}
    total = 0
    for info in tensors(path).values():
        total += info.nbytes
        kind = adapter.classify_key(info.key)
        if kind is None:
            continue
        layer = kind[1]
        per_layer[layer] = per_layer.get(layer, 0) + info.nbytes
    expert_bytes = {l: b // num_experts for l, b in per_layer.items()}
    return SizeBreakdown(total, total - sum(per_layer.values()), expert_bytes, num_experts)
