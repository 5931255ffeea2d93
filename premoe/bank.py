"""Expert bank: a resident pruned model whose M expert slots per layer are refilled from disk per request.

The resident model is the original pruned in memory to M experts per layer
(:func:`~premoe.adapters.base.prune_in_memory`), so it *is* a compiled
specialist of whatever it holds. A swap to another kept set reads only the
experts it does not hold yet, each straight into the slot of an expert that
leaves: slots are **unordered** (slot i holds some kept expert together with
its own router row, bias and correction-bias entries), so experts that stay
are never moved. A MoE layer's output does not depend on the order of its
experts, so the model equals the compiled specialist (whose experts are in
ascending order) up to float summation order (tests/test_bank.py: 1e-5).

Where the bytes come from:

* **a slot cache** (default when the checkpoint's dtype differs from the
  resident one, e.g. bf16 on disk, fp32 on CPU): at start the bank writes
  every expert once, in the resident dtype, as one contiguous record per
  (layer, expert) laid out exactly like a slot (fused expert rows, router
  row, biases). A swap then brings each record into the slot's own memory
  without conversion or staging copy: one ``preadv`` per expert, or, for
  slot slices of ``map_from`` bytes or more (1 MiB; real experts are tens
  of MB), a *mapping* of the cache's pages over the slice
  (:mod:`premoe.pagemap`: no bytes copied, and the resident experts' memory
  is the page cache's rather than a second copy) — below that size a read
  is faster (``bench/bench_swap_sizes.py``). ``bench/bench_serve.py``
  measures swaps against plain reads. The cache costs disk (all experts in
  the resident dtype, in a temp file removed with the bank) and one pass
  over the experts at start;
* **the checkpoint** (``cache=None``): shards are memory-mapped and each
  expert tensor is a zero-copy view; a swap converts it into its slot.

Where each on-disk tensor goes in memory is the adapter's knowledge
(:meth:`~premoe.adapters.base.MoEAdapter.memory_place`). Retrieval needs the
first layer's *full* router (the resident one has M rows), so the bank keeps
a copy of it from before pruning.

Example::

    bank = ExpertBank("testbed", store.kept("python", 16))
    report = bank.swap(store.kept("de", 16))
    report.experts, report.bytes, report.seconds     # experts read, bytes read, wall time
"""
from __future__ import annotations

import copy
import mmap
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from premoe import pagemap
from premoe.adapters import get_adapter
from premoe.checkpoint import TensorInfo, read_header, tensors, torch_dtype
from premoe.errors import CheckpointError, InputError, PlanError, UnsupportedModelError
from premoe.fileio import nameless_file
from premoe.modeling import resolve_model_path, transformers_config

# what a swap can widen into fp32 slots (FP8 weights need their block scales: dequantize first)
_READABLE = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


@dataclass
class SwapReport:
    experts: int  # experts read from disk
    bytes: int  # bytes read from disk
    seconds: float
    moved: int = 0  # experts moved between slots in memory (always 0: slots are unordered)

    def as_dict(self) -> dict:
        return {"experts": self.experts, "bytes": self.bytes, "seconds": round(self.seconds, 6), "moved": self.moved}


@dataclass(frozen=True)
class _Place:
    """Where an on-disk tensor goes in memory: chunk ``part`` of ``parts`` of a slot's slice along ``axis``."""

    tensor: torch.Tensor  # the resident tensor, one slice per slot along ``axis``
    axis: int
    part: int
    parts: int

    def slot(self, slot: int) -> torch.Tensor:
        """A view of one slot's slice (a scalar for bias vectors)."""
        return self.tensor.select(self.axis, slot)

    def write(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``value`` into this place's chunk of ``target`` (a slot slice, or a scratch of its shape)."""
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
    """A resident model with M expert slots per MoE layer, swappable in place from disk.

    ``kept`` ({layer: [original experts]}, the same count in every layer)
    is what the model holds at start. ``loaded`` is an optional unpruned
    model already in memory (it is pruned in place). ``cache``: ``"auto"``
    writes a slot cache in the resident dtype (a temp file) when the
    checkpoint's expert dtype differs from it, a path writes it there, and
    ``None`` always reads the checkpoint. ``map_from``: slot slices of at
    least this many bytes (whole pages) are mapped from the cache where the
    system can (Linux 5.14+), smaller ones read; ``None`` reads them all.
    The model is built pruned, one decoder layer at a time
    (:func:`premoe.streaming.load_pruned`), unless ``loaded`` is given.
    """

    def __init__(self, model: str | Path, kept: Mapping[int, Sequence[int]], loaded=None,
                 cache: str | Path | None = "auto", map_from: int | None = pagemap.MAP_FROM):
        self.path = resolve_model_path(model)
        # the unpruned config: what kept sets are checked against (a loaded model's is pruned with it)
        self.config = copy.deepcopy(loaded.config) if loaded is not None else transformers_config(self.path)
        self.adapter = get_adapter(self.config)
        self.num_experts = self.adapter.num_experts(self.config)
        stored = tensors(self.path)
        self._check_readable(stored)  # before the minutes a large model takes to load
        self.model, start, self.full_router = self._resident(loaded, kept)
        self.layers = {l.index: l for l in self.adapter.moe_layers(self.model)}
        self._moe_indices = sorted(self.layers)
        start = {l: start[l] for l in self._moe_indices}
        self.slots: dict[int, list[int]] = {l: list(v) for l, v in start.items()}  # layer -> expert in each slot
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}  # shard -> (mapping, data start)
        self._experts: dict[int, dict[int, list[_Source]]] = {l: {} for l in self.layers}  # per-expert tensors
        self._rows: dict[int, list[_Source]] = {l: [] for l in self.layers}  # tensors with a slice per expert
        for info in stored.values():
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
        self.cache = None
        self.map_from = map_from if map_from is not None and pagemap.available() else None
        if self._wants_cache(cache):  # slices to map first, in page-aligned memory
            self._slots = {l: self._rehome(places) for l, places in self._slots.items()}
            self.cache = _SlotCache.create(self, cache, pages=self._maps_any())
        self._targets = {l: [self._slot_targets(places, i) for i in range(len(self.slots[l]))]
                         for l, places in self._slots.items()} if self.cache is not None else {}  # per slot, made once
        self._checked: dict[tuple, dict[int, list[int]]] = {}
        self.totals = SwapReport(0, 0, 0.0)

    def _check_readable(self, stored: dict[str, TensorInfo]) -> None:
        """Refuse expert or router tensors a swap cannot widen into its slots (FP8 needs its block scales)."""
        for info in stored.values():
            if info.dtype not in _READABLE and self.adapter.classify_key(info.key) is not None:
                raise UnsupportedModelError(f"{self.path}: tensor {info.key} is {info.dtype}; the expert bank reads "
                                            f"{', '.join(_READABLE)} checkpoints (dequantize it first)")

    def _resident(self, loaded, kept) -> tuple[torch.nn.Module, dict[int, list[int]], torch.nn.Module]:
        """The pruned resident model, the kept sets, and the first MoE router from before pruning.

        Retrieval routes layer 1 through every expert, so its full router is
        copied before that layer is pruned.
        """
        from premoe.adapters.base import prune_in_memory
        from premoe.streaming import load_pruned

        if loaded is not None:
            layers = self.adapter.moe_layers(loaded)
            self._moe_indices = [l.index for l in layers]
            start = self._check(kept)
            router = copy.deepcopy(layers[0].router)
            return prune_in_memory(loaded, self.adapter, start), start, router
        start = self._check(kept, layers=sorted(kept))  # load_pruned names the MoE layers kept leaves out
        first = []

        def keep_first_router(layer) -> None:
            if not first:
                first.append(copy.deepcopy(layer.router))

        return load_pruned(self.path, start, on_layer=keep_first_router), start, first[0]

    @property
    def kept(self) -> dict[int, list[int]]:
        """{layer: the experts held, ascending} (slot order is internal)."""
        return {l: sorted(v) for l, v in self.slots.items()}

    @property
    def experts_per_layer(self) -> int:
        return len(next(iter(self.slots.values())))

    def expert_bytes(self, layer: int, expert: int) -> int:
        """Bytes a swap reads for one expert of ``layer``: its record in the cache, or its tensors and router rows."""
        if self.cache is not None:
            return self.cache.record_bytes[layer]
        return sum(s.expert_bytes() for s in [*self._experts[layer].get(expert, []), *self._rows[layer]])

    def byte_ranges(self, kept: Mapping[int, Sequence[int]]) -> list[tuple[Path, int, int]]:
        """(file, offset, length) of every range a swap to ``kept`` reads: to compare with plain reads.

        The file of a temporary slot cache has no name on disk: its ranges name ``/proc/self/fd/N``, which this
        process (only) can open.
        """
        ranges = []
        for layer, experts in kept.items():
            for expert in sorted(set(experts) - set(self.slots[layer])):
                if self.cache is not None:
                    ranges.append((self.cache.openable, self.cache.offset(layer, expert),
                                   self.cache.record_bytes[layer]))
                    continue
                for source in [*self._experts[layer].get(expert, []), *self._rows[layer]]:
                    info, length = source.info, source.expert_bytes()
                    within = 0 if source.per_expert else expert * length  # a slice's leading dims are 1
                    ranges.append((self.path / info.shard, self._maps[info.shard][1] + info.offsets[0] + within,
                                   length))
        return ranges

    @torch.no_grad()
    def swap(self, kept: Mapping[int, Sequence[int]]) -> SwapReport:
        """Make the resident model hold ``kept``, reading only experts it does not hold yet, into freed slots."""
        started = time.perf_counter()
        key = tuple((l, tuple(kept[l])) for l in sorted(kept))
        target = self._checked.get(key)
        if target is None:  # validated once per distinct kept set: a server cycles through a few
            if len(self._checked) >= 64:
                self._checked.clear()
            target = self._checked[key] = self._check(kept, self.experts_per_layer)
        report = SwapReport(0, 0, 0.0)
        for layer, new in target.items():
            slots = self.slots[layer]
            wanted = set(new)
            free = [i for i, e in enumerate(slots) if e not in wanted]  # leaving experts (or -1 after a failure)
            entering = sorted(wanted - set(slots))
            for slot, expert in zip(free, entering):
                slots[slot] = -1  # unknown until read: a failed swap reloads this slot next time
                report.bytes += self._load(layer, expert, slot)
                slots[slot] = expert
                report.experts += 1
        report.seconds = time.perf_counter() - started
        self.totals = SwapReport(self.totals.experts + report.experts, self.totals.bytes + report.bytes,
                                 self.totals.seconds + report.seconds)
        return report

    def close(self) -> None:
        """Close the slot cache now, freeing a temporary one's space (else freed when the bank is collected)."""
        if self.cache is not None:
            self.cache.close()

    def _load(self, layer: int, expert: int, slot: int) -> int:
        """Bring one expert (tensors and router rows) into ``slot``; returns bytes read."""
        if self.cache is not None:
            return self.cache.read(layer, expert, self._targets[layer][slot])
        self._assemble(layer, expert, lambda place: place.slot(slot))
        return self.expert_bytes(layer, expert)

    def _assemble(self, layer: int, expert: int, target) -> None:
        """Write expert ``expert``'s on-disk tensors into ``target(place)`` (a slot slice or a scratch)."""
        for source in self._experts[layer].get(expert, []):  # per-expert tensors: the whole tensor
            source.place.write(target(source.place), source.disk)
        for source in self._rows[layer]:  # fused experts, router weight and biases: the expert's slice
            source.place.write(target(source.place), source.disk.select(source.place.axis, expert))

    def _wants_cache(self, cache) -> bool:
        if cache is None:
            return False
        if cache != "auto":
            return True
        resident = {p.tensor.dtype for places in self._slots.values() for p in places}
        on_disk = {s.disk.dtype for layer in self._rows.values() for s in layer}
        on_disk |= {s.disk.dtype for layer in self._experts.values() for ss in layer.values() for s in ss}
        return on_disk != resident

    def _check(self, kept: Mapping[int, Sequence[int]], slots: int | None = None,
               layers: Sequence[int] | None = None) -> dict[int, list[int]]:
        """{layer: sorted experts}: every MoE layer (or ``layers``), one count everywhere (the slots are fixed), routable."""
        layers = self._moe_indices if layers is None else layers
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
        if info.shard not in self._maps:
            with open(self.path / info.shard, "rb") as f:  # private mapping: never written, so never copied
                self._maps[info.shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), read_header(
                    self.path / info.shard)[1]
        mapping, data_start = self._maps[info.shard]
        dtype = torch_dtype(info.dtype)
        disk = torch.frombuffer(mapping, dtype=dtype, count=info.nbytes // dtype.itemsize,
                                offset=data_start + info.offsets[0]).view(info.shape)  # no copy
        owner, _, attr = path.rpartition(".")
        tensor = getattr(self.layers[layer].block.get_submodule(owner), attr)
        axis = 0 if per_expert else self.adapter.expert_axis(info.shape)
        return _Source(info, disk, _Place(tensor, axis, part, parts), per_expert)

    @property
    def remapped(self) -> bool:
        """Whether swaps map some slot slices from the cache (rather than read every byte)."""
        return self.cache is not None and self._maps_any()

    def _maps_any(self) -> bool:
        return any(self._remaps(p) for places in self._slots.values() for p in places)

    def _rehome(self, places: list[_Place]) -> list[_Place]:
        """Move tensors whose slot slices are to be mapped into page-aligned memory; those places first."""
        for place in places:
            if self._worth_mapping(place):
                place.tensor.data = pagemap.page_aligned_copy(place.tensor.data)
        return sorted(places, key=lambda place: not self._remaps(place))

    def _worth_mapping(self, place: _Place) -> bool:
        """Slots along dim 0 of ``map_from`` bytes or more, in whole pages (where they start is :meth:`_rehome`'s)."""
        nbytes = place.slot(0).numel() * place.tensor.element_size()
        return self.map_from is not None and place.axis == 0 and nbytes >= self.map_from and nbytes % pagemap.PAGE == 0

    def _remaps(self, place: _Place) -> bool:
        return self._worth_mapping(place) and pagemap.remappable(place.slot(0))

    def _slot_targets(self, places: list[_Place], slot: int) -> tuple[list[torch.Tensor], list[memoryview]]:
        """What a swap fills in ``slot``: the slices it maps (they come first in a record), byte views of the rest."""
        return ([p.slot(slot) for p in places if self._remaps(p)],
                [_bytes_view(p.slot(slot)) for p in places if not self._remaps(p)])

    def _slot_places(self, layer: int) -> list[_Place]:
        """Every resident tensor with one slice per slot in ``layer`` (fused experts, router rows), once each."""
        sources = [*self._rows[layer], *next(iter(self._experts[layer].values()), [])]
        found = {id(s.place.tensor): s.place for s in sources}
        for place in found.values():
            if place.tensor.shape[place.axis] != len(self.slots[layer]):
                raise CheckpointError(f"layer {layer}: resident tensor of shape {tuple(place.tensor.shape)} does not "
                                      f"have {len(self.slots[layer])} experts on axis {place.axis} after pruning")
        return list(found.values())


class _SlotCache:
    """Every expert of every MoE layer in the resident dtype, one contiguous slot-shaped record per (layer, expert).

    A record is the concatenation of the expert's slices of the layer's slot
    places, in the bank's place order, so one ``preadv`` fills a slot. With
    ``pages`` every record starts on a page and the slices to map come first,
    so each of them can be mapped into its slot (:mod:`premoe.pagemap`) and
    one ``preadv`` reads the rest (router row, biases, small slices).
    """

    def __init__(self, path: Path, layout: dict[int, list[tuple[int, bool]]], stride: dict[int, int],
                 base: dict[int, int], temporary: bool, fd: int | None = None):
        self.path, self.layout, self.stride, self.base, self.temporary = path, layout, stride, base, temporary
        self.record_bytes = {l: sum(size for size, _ in parts) for l, parts in layout.items()}  # brought per expert
        self._mapped = {l: [size for size, mapped in parts if mapped] for l, parts in layout.items()}
        self._read = {l: sum(size for size, mapped in parts if not mapped) for l, parts in layout.items()}
        self.fd = os.open(path, os.O_RDONLY) if fd is None else fd
        self.openable = Path(f"/proc/self/fd/{self.fd}") if temporary else path  # a temporary one has no name

    @classmethod
    @torch.no_grad()
    def create(cls, bank: ExpertBank, where, pages: bool = False) -> _SlotCache:
        """Write the cache: for each layer and expert, assemble the slot in a scratch and append its bytes."""
        temporary = where == "auto"
        fd = None
        if temporary:
            fd, path = nameless_file("premoe-bank-", ".slots")  # nothing stays on disk however serve ends
        else:
            path = Path(where)
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            layout, stride, base = cls._write(bank, path, fd, pages)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        cache = cls(path, layout, stride, base, temporary, fd)
        if temporary:
            weakref.finalize(bank, cache.close)
        return cache

    @staticmethod
    def _write(bank: ExpertBank, path: Path, fd: int | None, pages: bool) -> tuple[dict, dict, dict]:
        """Every (layer, expert) record, assembled in a scratch slot, appended to ``path`` (or ``fd``)."""
        layout, stride, base, offset = {}, {}, {}, 0
        with open(path, "wb") if fd is None else open(fd, "wb", closefd=False) as f:
            for layer, places in bank._slots.items():
                scratch = [torch.empty_like(place.slot(0)) for place in places]
                by_tensor = {id(place.tensor): s for place, s in zip(places, scratch)}
                layout[layer] = [(s.numel() * s.element_size(), bank._remaps(p)) for p, s in zip(places, scratch)]
                size = sum(n for n, _ in layout[layer])
                stride[layer] = -(-size // pagemap.PAGE) * pagemap.PAGE if pages else size
                padding = bytes(stride[layer] - size)
                base[layer] = offset
                for expert in range(bank.num_experts):
                    bank._assemble(layer, expert, lambda place, into=by_tensor: into[id(place.tensor)])
                    f.writelines([*(_bytes_view(s) for s in scratch), padding])
                offset += stride[layer] * bank.num_experts
        return layout, stride, base

    def offset(self, layer: int, expert: int) -> int:
        return self.base[layer] + expert * self.stride[layer]

    def read(self, layer: int, expert: int, targets: tuple[list[torch.Tensor], list[memoryview]]) -> int:
        """Bring the record of (layer, expert) into a slot: map its leading slices, read the rest; bytes brought."""
        start = self.base[layer] + expert * self.stride[layer]
        mapped, views = targets
        for size, target in zip(self._mapped[layer], mapped):
            try:
                pagemap.map_into(target, self.fd, start)
            except OSError:  # a file system that cannot map (the slice is zeroed memory now): read it instead
                if os.preadv(self.fd, [_bytes_view(target)], start) != size:
                    raise
            start += size
        done = os.preadv(self.fd, views, start) if views else 0
        if done != self._read[layer]:
            raise CheckpointError(f"{self.path}: short read of layer {layer} expert {expert} "
                                  f"({done} of {self._read[layer]} bytes); the slot cache is damaged")
        return self.record_bytes[layer]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # a temporary cache has no name on disk: closing it frees its space
            self.fd = -1


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's memory (no copy)."""
    if not tensor.is_contiguous():
        raise CheckpointError("a slot slice is not contiguous in memory; the slot cache needs contiguous slots")
    flat = tensor.as_strided((tensor.numel(),), (1,))  # contiguous: the same memory, any size-1 dims' strides aside
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
