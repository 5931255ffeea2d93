"""Expert bank: a resident pruned model whose M expert slots per layer are refilled from disk per request.

The full checkpoint stays on disk. Its shards are memory-mapped and every
expert tensor is a zero-copy view into the mapping, so a swap reads exactly
the bytes of the experts it brings in (from the page cache or the disk) and
converts them straight into their resident slots: one pass, no staging copy.

The resident model is the original pruned in memory to M experts per layer,
so it is the compiled specialist of whatever it currently holds: slot i of a
layer holds the i-th smallest kept original expert index (the order a
compiled checkpoint has). A swap keeps that invariant: experts that stay
move between slots in memory, only new ones are read (fused expert rows,
router weight rows, router bias and correction-bias entries). Where each
on-disk tensor goes in memory is the adapter's knowledge
(:meth:`~premoe.adapters.base.MoEAdapter.memory_place`).

Retrieval needs the first layer's *full* router (the resident one has M
rows), so the bank keeps a copy of it from before pruning.

Example::

    bank = ExpertBank("testbed", store.kept("python", 16))
    report = bank.swap(store.kept("de", 16))
    report.experts, report.bytes, report.seconds     # experts read, bytes read, wall time
"""
from __future__ import annotations

import copy
import mmap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from premoe.adapters import get_adapter
from premoe.checkpoint import TensorInfo, read_header, tensors
from premoe.errors import CheckpointError, InputError, PlanError, UnsupportedModelError
from premoe.modeling import load_model, resolve_model_path

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


@dataclass
class SwapReport:
    experts: int  # experts read from disk
    bytes: int  # bytes read from disk
    seconds: float
    moved: int = 0  # experts that stayed resident but changed slot (memory copies, no disk read)

    def as_dict(self) -> dict:
        return {"experts": self.experts, "bytes": self.bytes, "seconds": round(self.seconds, 6), "moved": self.moved}


@dataclass(frozen=True)
class _Place:
    """Where an on-disk tensor goes in memory: chunk ``part`` of ``parts`` of a slot's slice along ``axis``."""

    tensor: torch.Tensor  # the resident tensor, one slice per slot along ``axis``
    axis: int
    part: int
    parts: int

    def write(self, slot: int, value: torch.Tensor) -> None:
        target = self.tensor.select(self.axis, slot)  # a view: one expert's slice (a scalar for bias vectors)
        (target.chunk(self.parts, dim=0)[self.part] if self.parts > 1 else target).copy_(value)


@dataclass(frozen=True)
class _Source:
    """One expert or router tensor on disk: its header entry, a view of its mapped bytes, its place in memory."""

    info: TensorInfo
    disk: torch.Tensor  # zero-copy view into the mapped shard, the on-disk shape and dtype
    place: _Place
    per_expert: bool  # one expert's whole tensor; else a tensor with one slice per expert along place.axis

    def expert_bytes(self) -> int:
        """Bytes one expert reads from this tensor: all of it, or its slice."""
        return self.info.nbytes if self.per_expert else self.info.nbytes // self.info.shape[self.place.axis]


class ExpertBank:
    """A resident model with M expert slots per MoE layer, swappable in place from the checkpoint on disk.

    ``kept`` ({layer: [original experts]}, the same count in every layer)
    is what the model holds at start. ``loaded`` is an optional unpruned
    model already in memory (it is pruned in place).
    """

    def __init__(self, model: str | Path, kept: Mapping[int, Sequence[int]], loaded=None):
        from premoe.adapters.base import prune_in_memory

        self.path = resolve_model_path(model)
        self.model = loaded if loaded is not None else load_model(self.path)
        self.adapter = get_adapter(self.model.config)
        self.config = copy.deepcopy(self.model.config)  # the unpruned config: what kept sets are checked against
        layers = self.adapter.moe_layers(self.model)
        self.num_experts = layers[0].num_experts
        self.kept = self._check(kept)
        self.full_router = copy.deepcopy(layers[0].router)  # retrieval routes layer 1 through every expert
        prune_in_memory(self.model, self.adapter, self.kept)
        self.layers = {l.index: l for l in self.adapter.moe_layers(self.model)}
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}  # shard -> (mapping, data start)
        self._experts: dict[int, dict[int, list[_Source]]] = {l: {} for l in self.layers}  # per-expert tensors
        self._rows: dict[int, list[_Source]] = {l: [] for l in self.layers}  # tensors with a slice per expert
        for info in tensors(self.path).values():
            kind = self.adapter.classify_key(info.key)
            if kind is None or kind[1] not in self.layers:
                continue
            source = self._source(kind[1], info, per_expert=kind[0] == "expert")
            if kind[0] == "expert":
                self._experts[kind[1]].setdefault(kind[2], []).append(source)
            else:
                self._rows[kind[1]].append(source)
        for layer, experts in self._experts.items():
            if not self.adapter.fused_on_disk and len(experts) != self.num_experts:
                raise CheckpointError(f"{self.path}: layer {layer} has per-expert tensors for {len(experts)} of "
                                      f"{self.num_experts} experts on disk; the checkpoint is incomplete")
        self._slots = {l: self._slot_places(l) for l in self.layers}
        self.totals = SwapReport(0, 0, 0.0)

    @property
    def experts_per_layer(self) -> int:
        return len(next(iter(self.kept.values())))

    def expert_bytes(self, layer: int, expert: int) -> int:
        """Bytes a swap reads for one expert of ``layer``: its tensors and its router rows."""
        return sum(s.expert_bytes() for s in [*self._experts[layer].get(expert, []), *self._rows[layer]])

    def byte_ranges(self, kept: Mapping[int, Sequence[int]]) -> list[tuple[str, int, int, torch.dtype]]:
        """(shard, file offset, length, dtype) of every range a swap to ``kept`` reads: to compare with plain reads."""
        ranges = []
        for layer, experts in kept.items():
            for expert in sorted(set(experts) - set(self.kept[layer])):
                for source in [*self._experts[layer].get(expert, []), *self._rows[layer]]:
                    info, length = source.info, source.expert_bytes()
                    within = 0 if source.per_expert else expert * length  # a slice's leading dims are 1
                    ranges.append((info.shard, self._maps[info.shard][1] + info.offsets[0] + within, length,
                                   source.disk.dtype))
        return ranges

    @torch.no_grad()
    def swap(self, kept: Mapping[int, Sequence[int]]) -> SwapReport:
        """Make the resident model hold ``kept``, reading only experts it does not hold yet."""
        started = time.perf_counter()
        target = self._check(kept, self.experts_per_layer)
        report = SwapReport(0, 0, 0.0)
        for layer, new in target.items():
            old = self.kept[layer]
            if new == old:
                continue
            slot_of = {e: i for i, e in enumerate(old)}
            moves = [(slot_of[e], i) for i, e in enumerate(new) if e in slot_of and slot_of[e] != i]
            self.kept[layer] = [-1] * len(new)  # unknown until the layer is complete: a failed swap reloads it all
            for source, dest in _in_place_order(moves):
                for place in self._slots[layer]:
                    place.tensor.select(place.axis, dest).copy_(place.tensor.select(place.axis, source))
            for slot, expert in enumerate(new):
                if expert not in slot_of:
                    report.bytes += self._load(layer, expert, slot)
                    report.experts += 1
            report.moved += len(moves)
            self.kept[layer] = new
        report.seconds = time.perf_counter() - started
        self.totals = SwapReport(self.totals.experts + report.experts, self.totals.bytes + report.bytes,
                                 self.totals.seconds + report.seconds, self.totals.moved + report.moved)
        return report

    def _load(self, layer: int, expert: int, slot: int) -> int:
        """Copy one expert's tensors and router rows from the mapped shards into ``slot``; returns bytes read."""
        for source in self._experts[layer].get(expert, []):  # per-expert tensors: the whole tensor
            source.place.write(slot, source.disk)
        for source in self._rows[layer]:  # fused experts, router weight and biases: the expert's slice
            source.place.write(slot, source.disk.select(source.place.axis, expert))
        return self.expert_bytes(layer, expert)

    def _check(self, kept: Mapping[int, Sequence[int]], slots: int | None = None) -> dict[int, list[int]]:
        """{layer: sorted experts}: every MoE layer, one count everywhere (the slots are fixed), routable."""
        layers = [l.index for l in self.adapter.moe_layers(self.model)]
        missing = sorted(set(layers) - set(kept))
        if missing:
            raise InputError(f"the expert set names no experts for MoE layers {missing}")
        self.adapter.check_kept(self.config, {l: kept[l] for l in layers})
        out = {l: sorted(int(e) for e in kept[l]) for l in layers}
        counts = {len(v) for v in out.values()} | ({slots} if slots else set())
        if len(counts) != 1:
            raise PlanError(f"the bank holds one number of experts in every layer, got counts {sorted(counts)}; "
                            "pad the plan (Plan.padded())")
        return out

    def _source(self, layer: int, info: TensorInfo, per_expert: bool) -> _Source:
        """Map ``info``'s bytes and find its place in memory (the expert axis is read off the unpruned disk shape)."""
        try:
            path, part, parts = self.adapter.memory_place(info.key)
        except KeyError as e:
            raise UnsupportedModelError(f"{self.path}: {e.args[0]}") from e
        if info.dtype not in _TORCH_DTYPES:
            raise UnsupportedModelError(f"{self.path}: tensor {info.key} is {info.dtype}; the expert bank reads "
                                        f"{', '.join(_TORCH_DTYPES)} checkpoints (dequantize it first)")
        if info.shard not in self._maps:
            with open(self.path / info.shard, "rb") as f:  # private mapping: never written, so never copied
                self._maps[info.shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), read_header(
                    self.path / info.shard)[1]
        mapping, data_start = self._maps[info.shard]
        dtype = _TORCH_DTYPES[info.dtype]
        disk = torch.frombuffer(mapping, dtype=dtype, count=info.nbytes // dtype.itemsize,
                                offset=data_start + info.offsets[0]).view(info.shape)  # no copy
        owner, _, attr = path.rpartition(".")
        tensor = getattr(self.layers[layer].block.get_submodule(owner), attr)
        axis = 0 if per_expert else self.adapter.expert_axis(info.shape)
        return _Source(info, disk, _Place(tensor, axis, part, parts), per_expert)

    def _slot_places(self, layer: int) -> list[_Place]:
        """Every resident tensor with one slice per slot in ``layer`` (fused experts, router rows), once each."""
        sources = [*self._rows[layer], *next(iter(self._experts[layer].values()), [])]
        found = {id(s.place.tensor): s.place for s in sources}
        for place in found.values():
            if place.tensor.shape[place.axis] != len(self.kept[layer]):
                raise CheckpointError(f"layer {layer}: resident tensor of shape {tuple(place.tensor.shape)} does not "
                                      f"have {len(self.kept[layer])} experts on axis {place.axis} after pruning")
        return list(found.values())


def _in_place_order(moves: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Order (source slot, dest slot) moves so each is one copy that overwrites nothing still to be moved.

    Experts that stay keep their relative order (old and new slots are both
    sorted by expert index), so they only shift: left movers in increasing
    slot order never land on an unmoved expert, nor do right movers in
    decreasing order, and a right mover never lands on a left mover's source.
    """
    left = sorted((m for m in moves if m[1] < m[0]), key=lambda m: m[1])
    right = sorted((m for m in moves if m[1] > m[0]), key=lambda m: -m[1])
    return right + left
