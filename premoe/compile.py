"""Compile a plan into a smaller checkpoint by streaming surgery on the safetensors shards.

A safetensors file is an 8-byte header length, a JSON header, then raw bytes.
Pruning experts only ever drops whole tensors (per-expert keys) or whole rows
of dim 0 (fused experts, router weights and biases) — and a row of dim 0 is a
contiguous byte range. So compiling copies byte ranges from each input shard
into an output shard with a new header: no tensor is deserialised, memory
stays at one copy buffer per copy thread whatever the model size, and every
dtype (FP8 and its scales included) is preserved bit for bit. Copying the
kept bytes where they lie runs at 0.55-0.6x a ``cp`` of as many bytes from
each shard's start on a 1 GB checkpoint of 64 MB tensors
(``bench/bench_compile.py``); with tens of thousands of small tensors the
Python work per tensor dominates (``bench/bench_rehearsal.py``).

Plan → check → write (STYLE.md §6):

1. :func:`plan_writes` lists every output tensor (source key and shard, rows
   kept, new key and shape, bytes) and the new config; ``--dry-run`` prints it;
2. checks, before anything is written: every shard header is well formed
   (:func:`premoe.checkpoint.read_header`), the plan belongs to this model,
   counts respect top-k and groups, every MoE layer on disk is covered, the
   output fits on its disk;
3. shard by shard into a temp dir beside ``out`` (same shard split; each
   shard laid out and its header checked while threads copy the bytes of the
   ones before, :func:`_write_shards`), then the other files, the index and
   ``config.json`` last, and the headers checked against the written config
   (:func:`check_compiled`'s checks, on the encoded headers rather than
   re-read ones), all while the threads copy; then each file's size is
   checked against its header, then one rename.

Multi-token-prediction (MTP) layers — DeepSeek-V3/R1's ``model.layers.61.*``,
GLM-4.5's ``model.layers.92.*`` — sit in the shards after the last decoder
layer; transformers skips them, vLLM and SGLang read them for speculative
decoding with the config's expert count. ``mtp="drop"`` (the default) leaves
them out and sets the config's count to 0; ``mtp="prune"`` keeps them, each
cut to the experts kept in the last MoE decoder layer (:data:`MTP_RULE`).

Example::

    plan = Plan.load("python-50.json")
    report = compile_checkpoint("testbed", plan, "python-50/")
    print(report.summary())
    model = AutoModelForCausalLM.from_pretrained("python-50/")   # a vanilla checkpoint
"""
from __future__ import annotations

import errno
import functools
import json
import math
import mmap
import os
import shutil
import struct
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Container, Iterator, NamedTuple, Sequence

from premoe import __version__
from premoe.checkpoint import DTYPE_BYTES, INDEX, check_layout, encode_header, gc_paused, read_index, shard_files
from premoe.checkpoint import headers as read_headers
from premoe.checkpoint import tensor_shards, tensors
from premoe.errors import CheckpointError, DiskSpaceError, InputError, OutputExistsError, PlanError
from premoe.plan import Plan, format_ranges

FORMAT = "premoe-compiled/1"
EXPORTS = ("auto", "padded", "compact")
MTP_CHOICES = ("drop", "prune")
MTP_RULE = ("each MTP layer keeps the experts kept in the last MoE decoder layer: no profile covers an MTP layer "
            "(transformers never runs it) and the last decoder layer, whose output it reads, is the nearest "
            "measured one")
# Files of the source that would misdescribe the compiled model: its card (premoe writes a new README.md) and
# training artefacts (plots, logs, trainer state).
_NOT_COPIED = {"README.md": "replaced by a model card of the compiled checkpoint",
               "card.json": "the source model's own card data"}
_ARTEFACT_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".log")
_ARTEFACT_NAMES = ("training.json", "trainer_state.json", "training_args.json", "all_results.json",
                   "train_results.json", "eval_results.json")
# Files that hold weights in another format: copying them would ship the unpruned model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_WEIGHT_INDEXES = (INDEX, "pytorch_model.bin.index.json")
_CHUNK = 64 << 20  # bytes per copy call; also the read buffer where in-kernel copies are unavailable
_KERNEL_RUN = 64 << 10  # runs this long or longer are copied in the kernel; shorter ones gathered (_copy_runs)
_IOV_MAX = 1024  # buffers per writev (Linux's IOV_MAX)
_JOB_BYTES = 32 << 20  # bytes of a shard one copy thread takes at a time
_MAX_COPY_THREADS = 8  # copy threads at most: more rarely move bytes faster


class TensorWrite(NamedTuple):  # a NamedTuple, not a frozen dataclass: one per written tensor (~45k), 5x cheaper
    """One tensor of the output checkpoint and where its bytes come from."""

    key: str  # key in the output (per-expert keys renumbered)
    source: str  # key in the input
    shard: str  # shard file name, the same in input and output
    dtype: str  # safetensors dtype, unchanged
    shape: tuple[int, ...]  # output shape
    rows: tuple[int, ...] | None  # experts kept along `axis` (original indices); None: the whole tensor
    span: tuple[int, int]  # byte range of the source tensor in its shard's data section
    source_shape: tuple[int, ...] = ()
    axis: int = 0  # the (non-negative) axis that indexes experts, when sliced

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Source byte ranges to copy, in output order; adjacent ranges merged.

        Slicing along ``axis`` keeps, for every index of the axes before it,
        the kept experts' contiguous blocks of the axes after it; for the usual
        axis 0 that is one block per kept expert.
        """
        begin, end = self.span
        if self.rows is None:
            return [(begin, end)]
        outer = math.prod(self.source_shape[: self.axis])
        count = self.source_shape[self.axis]
        block = (end - begin) // (outer * count)  # bytes of one expert's slice for one outer index
        ranges: list[tuple[int, int]] = []
        for o in range(outer):
            for r in self.rows:
                start = begin + (o * count + r) * block
                if ranges and ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], start + block)
                else:
                    ranges.append((start, start + block))
        return ranges

    @property
    def nbytes(self) -> int:
        if self.rows is None:
            return self.span[1] - self.span[0]
        return sum(end - begin for begin, end in self.ranges)


class ShardLayout(NamedTuple):
    """One output shard as :func:`_shard_layout` lays it out."""

    header: bytes  # the encoded JSON header, padded (without the 8-byte length)
    entries: dict[str, dict]  # key -> {"dtype", "shape", "data_offsets"}: what ``header`` encodes, less metadata
    runs: list[tuple[int, int]]  # source byte ranges of the data section to copy, in output order
    data_bytes: int


@dataclass(frozen=True)
class MtpChoice:
    """What a compile does with the multi-token-prediction layers stored after the last decoder layer."""

    mode: str  # "drop" or "prune"
    found: tuple[int, ...]  # MTP layers on disk (layer indices ≥ num_hidden_layers)
    declared: int  # the count the source config declares
    config_keys: tuple[str, ...]  # config fields holding the count; () = the family has no MTP layers
    kept: dict[int, list[int]] = field(default_factory=dict)  # MTP layer -> original experts kept (prune)
    source_layer: int | None = None  # the decoder layer whose kept experts the MTP layers copy (prune)

    @property
    def written(self) -> int:
        """MTP layers the output holds, which its config declares."""
        return len(self.found) if self.mode == "prune" else 0

    def describe(self) -> str | None:
        """One line for the dry run; None for families without MTP layers."""
        if not self.config_keys:
            return None
        count = f"{self.config_keys[0]} {self.declared} -> {self.written}"
        if not self.found:
            return f"mtp: no MTP layer in the shards; config {count}"
        layers = ", ".join(map(str, self.found))
        if self.mode == "drop":
            return (f"mtp: drop layer(s) {layers} (config {count}: vLLM/SGLang then serve without the speculative "
                    "layer; --mtp prune keeps it)")
        experts = self.kept[self.found[0]]
        return (f"mtp: prune layer(s) {layers} to layer {self.source_layer}'s kept experts {format_ranges(experts)} -> "
                f"experts 0..{len(experts) - 1} (config {count}); rule: {MTP_RULE}")

    def to_json(self) -> dict:
        return {"mode": self.mode, "layers_found": list(self.found), "declared": self.declared,
                "written": self.written, "config_keys": list(self.config_keys),
                "kept_experts": {str(layer): v for layer, v in self.kept.items()}, "source_layer": self.source_layer,
                "rule": MTP_RULE if self.kept else None}


@dataclass
class WritePlan:
    """Everything a compile will write, computed before writing: what ``--dry-run`` shows."""

    model_path: Path
    out: Path
    family: str
    export: str  # "uniform", "padded" (a global plan padded to its largest layer) or "compact"
    num_experts: int  # per layer in the original
    kept: dict[int, list[int]]  # decoder layer -> original experts the output holds, ascending
    writes: list[TensorWrite]
    dropped: list[str]  # source keys not written
    bytes_before: int  # tensor bytes of the input
    data_start: dict[str, int]  # shard -> byte offset of its data section
    shard_metadata: dict[str, dict]  # shard -> its "__metadata__"
    indexed: bool  # the input has model.safetensors.index.json (so does the output)
    index_metadata: dict  # the input index's "metadata", which the output's keeps (total_size rewritten)
    config: dict  # the output config.json
    files: list[str]  # other files copied unchanged (tokenizer, generation config, ...)
    skipped: list[str]  # entries not copied: other weight formats, directories
    free_bytes: int  # free space on the output's file system
    mtp: MtpChoice | None = None
    notes: list[str] = field(default_factory=list)
    card: str = ""  # README.md of the output: a model card of the compiled checkpoint (premoe.modelcard)
    force: bool = False  # --force: replace an existing output (one that appears while writing, too)
    laid_out: dict[str, ShardLayout] = field(default_factory=dict, repr=False)  # each_layout's, by shard

    @functools.cached_property  # asked for by the card, the index, the dry run and the summary
    def bytes_after(self) -> int:
        return sum(w.nbytes for w in self.writes)

    @functools.cached_property
    def file_bytes(self) -> int:
        """The .safetensors files' exact size on disk, headers included: what a ``--budget-gb`` promise measures."""
        return sum(8 + len(layout.header) + layout.data_bytes for layout in self.layouts.values())

    @property
    def layouts(self) -> dict[str, ShardLayout]:
        """Every output shard's header and copy runs, computed once for the budget check and the write."""
        return dict(self.each_layout())

    def each_layout(self) -> Iterator[tuple[str, ShardLayout]]:
        """:attr:`layouts` one shard at a time, each computed when first asked for: the writer lays out a shard while
        its threads copy the ones before."""
        for shard, writes in self.shards().items():
            if shard not in self.laid_out:
                self.laid_out[shard] = _shard_layout(writes, self.shard_metadata[shard])
            yield shard, self.laid_out[shard]

    @property
    def largest_tensor(self) -> int:
        return max((w.nbytes for w in self.writes), default=0)

    def shards(self) -> dict[str, list[TensorWrite]]:
        """Output shards and their tensors, in the input's shard order (grouped once: the layouts, the dry run and
        the written-file checks all ask)."""
        return self._by_shard

    @functools.cached_property
    def _by_shard(self) -> dict[str, list[TensorWrite]]:
        grouped: dict[str, list[TensorWrite]] = {}
        for write in self.writes:
            grouped.setdefault(write.shard, []).append(write)
        return grouped

    def describe(self) -> str:
        """The dry-run report: kept experts, tensors, sizes before/after, memory and disk needed."""
        sliced = sum(w.rows is not None for w in self.writes)
        lines = [f"compile {self.model_path} ({self.family}) -> {self.out}  [export: {self.export}]"]
        for layer, experts in self.kept.items():
            lines.append(f"  layer {layer:>3}: keep {len(experts):>3}/{self.num_experts}  {format_ranges(experts)}"
                         f"  -> experts 0..{len(experts) - 1}")
        lines += [
            f"  tensors: {len(self.writes)} written ({sliced} sliced by rows), {len(self.dropped)} dropped, "
            f"in {len(self.shards())} shard(s)",
            f"  size: {_size(self.bytes_before)} -> {_size(self.bytes_after)} "
            f"({self.bytes_after / max(self.bytes_before, 1):.1%})",
            f"  memory needed: one {_CHUNK >> 20} MiB copy buffer per copy thread at most (byte-range copies, in the "
            f"kernel where the file system allows; the largest tensor, "
            f"{_size(self.largest_tensor)}, is never loaded)",
            f"  disk: needs {_size(self.bytes_after)} beside {self.out}, {_size(self.free_bytes)} free",
            f"  other files copied: {', '.join(self.files) or 'none'}",
            "  model card: README.md written by premoe (base model, kept experts, sizes, provenance)",
        ]
        mtp = self.mtp.describe() if self.mtp else None
        lines += [f"  {mtp}"] if mtp else []
        lines += [f"  not copied: {s}" for s in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "model": str(self.model_path), "out": str(self.out), "family": self.family, "export": self.export,
            "num_experts": self.num_experts, "kept": {str(k): v for k, v in self.kept.items()},
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "largest_tensor": self.largest_tensor,
            "tensors_written": len(self.writes), "tensors_sliced": sum(w.rows is not None for w in self.writes),
            "tensors_dropped": len(self.dropped), "shards": sorted(self.shards()), "files": self.files,
            "skipped": self.skipped, "free_bytes": self.free_bytes, "notes": self.notes,
            "mtp": self.mtp.to_json() if self.mtp else None,
        }


@dataclass
class CompileReport:
    """What a compile did (or, for a dry run, would do)."""

    plan: WritePlan
    written: bool  # False for a dry run
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.written:
            return self.plan.describe() + "\n  dry run: nothing written"
        rate = self.plan.bytes_after / max(self.seconds, 1e-9)
        return (f"wrote {self.plan.out}: {_size(self.plan.bytes_before)} -> {_size(self.plan.bytes_after)} "
                f"({self.plan.bytes_after / max(self.plan.bytes_before, 1):.1%}), export {self.plan.export}, "
                f"{len(self.plan.writes)} tensors in {self.seconds:.1f} s ({rate / 1e6:.0f} MB/s)"
                + "".join(f"\n  note: {n}" for n in self.plan.notes))

    def to_json(self) -> dict:
        return {**self.plan.to_json(), "written": self.written, "seconds": round(self.seconds, 3)}


# --------------------------------------------------------------------------- plan + check


def compile_checkpoint(model: str | Path, plan: Plan, out: str | Path, *, force: bool = False, export: str = "auto",
                       mtp: str = "drop", base_model: str | None = None, dry_run: bool = False,
                       progress: bool = True, threads: int | None = None) -> CompileReport:
    """Write ``out``: the checkpoint of ``model`` holding only the experts ``plan`` keeps.

    ``export`` matters for plans with different counts per layer (global
    ranking): ``padded`` (the default for ``auto``) tops every layer up to the
    largest count with its next-best experts, so any loader reads it;
    ``compact`` writes the real counts and needs :func:`load_compact`.
    ``mtp`` says what becomes of multi-token-prediction layers: ``drop``
    (default) or ``prune`` (see the module docstring). ``base_model`` is the
    source's Hub id for the model card's metadata (premoe.modelcard).
    ``threads`` copy bytes at once (default: the usable cores, at most 8).

    >>> print(compile_checkpoint("testbed", Plan.load("python-50.json"), "python-50/").summary())
    wrote python-50: 62.01 MB -> 36.28 MB (58.5%), export uniform, 219 tensors in 0.1 s (480 MB/s)
    """
    threads = copy_threads(threads)  # a bad count is refused before any work
    write_plan = plan_writes(model, plan, out, force=force, export=export, mtp=mtp, base_model=base_model)
    if dry_run:
        return CompileReport(write_plan, written=False)
    started = time.time()
    write_checkpoint(write_plan, progress=progress, threads=threads)
    return CompileReport(write_plan, written=True, seconds=time.time() - started)


def plan_writes(model: str | Path, plan: Plan, out: str | Path, *, force: bool = False,
                export: str = "auto", mtp: str = "drop", base_model: str | None = None) -> WritePlan:
    """Every check and every output tensor of a compile, without writing anything."""
    with gc_paused():  # tens of thousands of small acyclic objects (DeepSeek-V3: ~45k tensors, ~90k FP8)
        return _plan_writes(model, plan, out, force=force, export=export, mtp=mtp, base_model=base_model)


def _plan_writes(model: str | Path, plan: Plan, out: str | Path, *, force: bool, export: str, mtp: str,
                 base_model: str | None) -> WritePlan:
    from premoe.adapters import get_adapter
    from premoe.modelcard import is_hub_id
    from premoe.modeling import model_identity, read_config, resolve_model_path

    if base_model is not None and not is_hub_id(base_model):
        raise InputError(f"--base-model {base_model!r} is not a Hugging Face Hub id; give OWNER/NAME, e.g. "
                         "Qwen/Qwen3-30B-A3B, or omit it")
    path = resolve_model_path(model)
    out = Path(out)
    if out.resolve() == path.resolve():
        raise InputError(f"--out {out} is the model directory itself; write the compiled checkpoint elsewhere")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    identity = model_identity(model)
    plan.check_model(identity)
    config = read_config(path)
    adapter = get_adapter(config)
    export, kept = _export_kept(plan, export, adapter.groups(config)[0])
    if plan.num_experts != adapter.num_experts(config):
        raise PlanError(f"the plan is for {plan.num_experts} experts per layer, {path} has {adapter.num_experts(config)}")
    adapter.check_kept(config, kept)  # distinct, ≥ top-k, the same count in every routing group
    index = read_index(path)  # read once (DeepSeek-V3's maps ~90k tensors)
    headers = read_headers(path, index)  # every header checked, read once; raises on missing/truncated/corrupt shards
    located = tensor_shards(path, headers, index)  # no tensor in two shards; the index agrees
    mtp_keys = adapter.mtp_layers(located, config)
    mtp_choice = _mtp_choice(mtp, adapter, config, mtp_keys, kept)
    mtp_dropped = sorted(mtp_keys) if mtp == "drop" else []
    writes, dropped = _tensor_writes(headers, mtp_keys if mtp == "drop" else {}, adapter,
                                     {**kept, **mtp_choice.kept}, plan.num_experts)
    files, skipped = _other_files(path, set(headers))
    new_config = _new_config(config, adapter, plan, kept, export, identity, mtp_choice)
    notes = list(plan.notes)
    if export == "compact":
        notes.append("compact export: layers hold different expert counts; load it with premoe.compile.load_compact "
                     "(from_pretrained and vLLM expect one count per config)")
    write_plan = WritePlan(
        model_path=path, out=out, family=adapter.name, export=export, num_experts=plan.num_experts, kept=kept,
        writes=writes, dropped=dropped + mtp_dropped, bytes_before=_tensor_bytes(path, headers),
        data_start={s: start for s, (_, start) in headers.items()},
        shard_metadata={s: header.get("__metadata__") or {} for s, (header, _) in headers.items()},
        indexed=index is not None, index_metadata=(index or {}).get("metadata", {}), config=new_config, files=files,
        skipped=skipped, free_bytes=shutil.disk_usage(_existing_parent(out)).free, mtp=mtp_choice, notes=notes,
        force=force,
    )
    _check_budget(write_plan, plan.request.get("budget_gb"), mtp)
    from premoe.modelcard import compiled_card

    write_plan.card = compiled_card(write_plan, plan, base_model)
    needed = write_plan.bytes_after + sum((path / f).stat().st_size for f in files)
    if needed > write_plan.free_bytes:
        raise DiskSpaceError(f"the compiled checkpoint needs {_size(needed)} but {_existing_parent(out)} has "
                             f"{_size(write_plan.free_bytes)} free; free some space or pass --out on another disk")
    return write_plan


def _check_budget(write_plan: WritePlan, budget_gb: float | None, mtp: str) -> None:
    """Keep a plan's ``--budget-gb`` promise: refuse a compile whose .safetensors files would exceed it, saying why."""
    if budget_gb is None:
        return
    budget = budget_gb * 1e9
    got = write_plan.file_bytes
    if got <= budget:
        write_plan.notes.append(f"budget {budget_gb:g} GB kept: the .safetensors files take {got / 1e9:.6f} GB")
        return
    if mtp == "prune" and write_plan.mtp and write_plan.mtp.written:
        fix = "pass --mtp drop (the plan's budget counts no MTP layer)"
    elif write_plan.export == "padded":
        fix = ("pass --export compact (load it with premoe.compile.load_compact), or make the plan again with this "
               "premoe, whose budget counts the padding")
    else:
        fix = "make the plan again with this premoe (its budget counts what compile writes)"
    raise PlanError(f"the plan was made for --budget-gb {budget_gb:g} but this compile would write "
                    f"{got / 1e9:.6f} GB of .safetensors (export {write_plan.export}, --mtp {mtp}); {fix}")


def _export_kept(plan: Plan, export: str, n_group: int = 1) -> tuple[str, dict[int, list[int]]]:
    """Which experts the output holds: the plan's, or padded to one count per layer."""
    if export not in EXPORTS:
        raise InputError(f"--export must be one of {', '.join(EXPORTS)}, got {export!r}")
    if plan.uniform:
        return "uniform", {layer: sorted(v) for layer, v in plan.kept.items()}
    if export == "compact":
        return "compact", {layer: sorted(v) for layer, v in plan.kept.items()}
    return "padded", plan.padded(n_group).kept


def _mtp_choice(mode: str, adapter, config: dict, mtp_keys: dict[str, int], kept: dict[int, list[int]]) -> MtpChoice:
    """Find the MTP layers on disk (``mtp_keys``: their tensors, by key) and, for ``prune``, the experts each keeps
    (:data:`MTP_RULE`)."""
    if mode not in MTP_CHOICES:
        raise InputError(f"--mtp must be one of {', '.join(MTP_CHOICES)}, got {mode!r}")
    found = sorted(set(mtp_keys.values()))
    first = adapter.num_hidden_layers(config)
    if found != list(range(first, first + len(found))):
        raise CheckpointError(f"the shards hold MTP layers {found}; expected consecutive layers from "
                              f"num_hidden_layers = {first}: the checkpoint is incomplete or not this model")
    choice = MtpChoice(mode, tuple(found), adapter.mtp_declared(config), adapter.mtp_count_keys)
    if mode == "drop" or not found:
        return choice
    source = max(kept)  # the last MoE decoder layer
    return MtpChoice(mode, tuple(found), choice.declared, choice.config_keys,
                     {layer: list(kept[source]) for layer in found}, source)


def _tensor_writes(headers: dict[str, tuple[dict, int]], left_out: Container[str], adapter,
                   kept: dict[int, list[int]], num_experts: int) -> tuple[list[TensorWrite], list[str]]:
    """Map every input tensor (by shard, then key) to its output — kept, renamed, sliced by rows — or to the dropped
    list; tensors in ``left_out`` (dropped MTP layers) are neither."""
    writes: list[TensorWrite] = []
    dropped: list[str] = []
    renumber = {layer: {e: i for i, e in enumerate(experts)} for layer, experts in kept.items()}
    seen_experts: dict[int, set[int]] = {layer: set() for layer in kept}
    routers: set[int] = set()  # layers with tensors sliced along experts (router, fused experts)
    layouts: dict[int, dict[int, dict[str, tuple]]] = {}  # layer -> expert -> tensor name -> (dtype, shape)
    for shard, (header, _) in headers.items():
        keys = sorted(header.keys() - left_out - {"__metadata__"})
        kinds = adapter.classify_keys(keys)
        for key in keys:
            info = header[key]
            kind = kinds.get(key)
            if kind is None:
                writes.append(TensorWrite(key, key, shard, info["dtype"], tuple(info["shape"]), None,
                                          tuple(info["data_offsets"])))
                continue
            what, layer, expert = kind
            if layer not in kept:
                raise CheckpointError(f"tensor {key} belongs to MoE layer {layer}, which the plan does not cover "
                                      f"(it covers {sorted(kept)}); was the plan made for this checkpoint?")
            if what == "expert":
                seen_experts[layer].add(expert)
                template = adapter.rename_expert_key(key, expert, -1)  # the same name for every expert
                layouts.setdefault(layer, {}).setdefault(expert, {})[template] = (info["dtype"], tuple(info["shape"]))
                if expert not in renumber[layer]:
                    dropped.append(key)
                    continue
                new_key = adapter.rename_expert_key(key, expert, renumber[layer][expert])
                writes.append(TensorWrite(new_key, key, shard, info["dtype"], tuple(info["shape"]), None,
                                          tuple(info["data_offsets"])))
                continue
            writes.append(_rows_write(key, shard, info, kept[layer], adapter.expert_axis(info["shape"]), num_experts))
            routers.add(layer)
    for layer, found in seen_experts.items():
        if layer not in routers:
            raise CheckpointError(f"no router tensor of MoE layer {layer} found in the checkpoint; the "
                                  f"{adapter.name} adapter's on-disk names do not match these shards")
        if found and found != set(range(num_experts)):  # per-expert layout: every expert must be there
            absent = sorted(set(range(num_experts)) - found)
            raise CheckpointError(f"layer {layer}: the checkpoint's expert tensors cover experts {sorted(found)[:4]}..., "
                                  f"not 0..{num_experts - 1} (missing {absent[:8]}); it is incomplete or not this model")
    for layer, experts in layouts.items():
        _check_same_layout(layer, experts)
    return writes, dropped


def _check_same_layout(layer: int, experts: dict[int, dict[str, tuple]]) -> None:
    """Every expert of a per-expert layer must hold the same tensors with the same dtype and shape.

    A shard missing one projection of one expert, or holding it cut short, would otherwise be copied into a
    checkpoint that only fails when loaded (or, for a dropped expert, never).
    """
    for name in sorted(set().union(*experts.values())):
        absent = [e for e in sorted(experts) if name not in experts[e]]
        if absent:
            key = name.replace(".-1.", f".{absent[0]}.", 1)
            raise CheckpointError(f"layer {layer}: tensor {key} is missing from the shards though the other "
                                  "experts have it; the checkpoint is incomplete (re-download it)")
        counts = Counter(tensors[name] for tensors in experts.values())  # (dtype, shape) of each expert's
        if len(counts) > 1:
            usual = counts.most_common(1)[0][0]
            odd = next(e for e, tensors in sorted(experts.items()) if tensors[name] != usual)
            key = name.replace(".-1.", f".{odd}.", 1)
            raise CheckpointError(f"layer {layer}: tensor {key} is {_described(experts[odd][name])} but the other "
                                  f"experts' are {_described(usual)}; the checkpoint is corrupt (re-download it)")


def _described(entry: tuple[str, tuple[int, ...]]) -> str:
    dtype, shape = entry
    return f"{dtype} {list(shape)}"


def _rows_write(key: str, shard: str, info: dict, rows: list[int], axis: int, num_experts: int) -> TensorWrite:
    """The write of a tensor indexing experts along ``axis`` (router, correction bias, fused experts): ``rows`` kept."""
    shape = tuple(info["shape"])
    if not shape or shape[axis] != num_experts:
        raise CheckpointError(f"tensor {key} has shape {list(shape)}; expected {num_experts} experts "
                              f"on axis {axis} for a router or fused-experts tensor")
    return TensorWrite(key, key, shard, info["dtype"], (*shape[:axis], len(rows), *shape[axis + 1 :]), tuple(rows),
                       tuple(info["data_offsets"]), shape, axis)


def _tensor_bytes(path: Path, headers: dict[str, tuple[dict, int]]) -> int:
    """Bytes of every tensor in the shards: their data sections, which read_header checked the tensors tile exactly."""
    return sum((path / shard).stat().st_size - start for shard, (_, start) in headers.items())


def _new_config(config: dict, adapter, plan: Plan, kept: dict[int, list[int]], export: str, source: dict,
                mtp: MtpChoice) -> dict:
    """config.json of the output: expert and MTP counts rewritten, plus a ``premoe`` block saying what was kept."""
    counts = {layer: len(v) for layer, v in kept.items()}
    new = dict(config)
    updates = adapter.config_updates(config, max(counts.values()))
    if mtp.config_keys:
        updates = _merge(updates, adapter.mtp_config_updates(config, mtp.written))
    for key, value in updates.items():
        new[key] = {**new[key], **value} if isinstance(value, dict) else value  # nested: text_config
    new["premoe"] = {
        "format": FORMAT,
        "premoe_version": __version__,
        "source": source,
        "num_experts_original": plan.num_experts,
        "export": export,
        "experts_per_layer": {str(layer): n for layer, n in counts.items()},
        "kept_experts": {str(layer): v for layer, v in kept.items()},
        "plan_kept_experts": {str(layer): sorted(v) for layer, v in plan.kept.items()},
        "target": plan.target,
        "scorer": plan.request.get("scorer"),
        "request": plan.request,
        "profile": plan.profile,
        "mtp": mtp.to_json(),
    }
    return new


def _merge(a: dict, b: dict) -> dict:
    """``a`` updated by ``b``, nested dicts (``text_config``) merged rather than replaced."""
    merged = dict(a)
    for key, value in b.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _other_files(path: Path, shards: set[str]) -> tuple[list[str], list[str]]:
    """Top-level files to copy (tokenizer, generation config, license, ...) and what is left behind, with why.

    Left behind: other weight formats, directories, the source's card and its training artefacts.
    """
    files, skipped = [], []
    for entry in sorted(path.iterdir()):
        if entry.name in shards or entry.name in ("config.json", INDEX):
            continue
        if entry.is_dir():
            skipped.append(f"{entry.name}/ (directory)")
        elif entry.name in _NOT_COPIED:
            skipped.append(f"{entry.name} ({_NOT_COPIED[entry.name]})")
        elif (entry.name.lower().endswith(_ARTEFACT_SUFFIXES) or entry.name in _ARTEFACT_NAMES
              or entry.name.startswith("events.out.tfevents")):
            skipped.append(f"{entry.name} (a training artefact of the source)")
        elif entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name in _WEIGHT_INDEXES:
            skipped.append(f"{entry.name} (weights outside the safetensors index would not be pruned)")
        else:
            files.append(entry.name)
    return files, skipped


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _size(nbytes: int) -> str:
    """Bytes for people: '1.23 GB', '456.00 kB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


# --------------------------------------------------------------------------- write


def write_checkpoint(plan: WritePlan, progress: bool = True, threads: int | None = None) -> Path:
    """Carry out a :class:`WritePlan`: shards, other files, index, config.json, then one rename.

    ``threads`` copy the shards' bytes at once (default: the usable cores, at most :data:`_MAX_COPY_THREADS`).
    """
    from premoe.fileio import write_dir
    from premoe.progress import bar

    def write(tmp: Path) -> None:
        with gc_paused():  # header JSON of tens of thousands of tensors, in and out
            _write_all(tmp)

    def _write_all(tmp: Path) -> None:
        with bar(plan.bytes_after, "compile", "B", enabled=progress, unit_scale=True) as shown:
            _write_shards(plan, tmp, copy_threads(threads), shown.update, meanwhile=lambda: _write_rest(plan, tmp))
        _check_sizes(tmp, plan)  # raising here removes the temp dir: no output that disagrees with its headers

    return write_dir(plan.out, write, mark=False, force=plan.force)  # config.json's premoe block marks it


def copy_threads(threads: int | None = None) -> int:
    """How many threads a compile copies with: ``threads``, or by default the usable cores, at most 8."""
    if threads is None:
        from premoe.threads import usable_cpus

        return min(_MAX_COPY_THREADS, usable_cpus())
    if threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    return threads


def check_compiled(path: str | Path) -> None:
    """Check a compiled checkpoint's shards against its own config.json; raise :class:`CheckpointError` if they differ.

    Re-reads every header (fully validated) and checks, for every MoE layer
    the ``premoe`` block names (MTP layers included): per-expert tensors
    number exactly 0..M-1, every router / bias / fused tensor has M rows, M
    is the config's count (or the compact export's per-layer count); no
    expert tensor of another layer; the MTP layers on disk are as many as the
    config declares; the index lists exactly the tensors written.

    >>> check_compiled("python-50/")      # silent when the checkpoint agrees with its config
    """
    path = Path(path)
    index = read_index(path)
    found = tensors(path, index=index)
    _check_against_config(path, {key: info.shape for key, info in found.items()},
                          None if index is None else index["weight_map"].keys())


def _write_rest(plan: WritePlan, tmp: Path) -> None:
    """Everything but the shards' bytes, while the copy threads write those: the other files, the model card, the
    index, config.json last; then :func:`check_compiled`'s checks of the written config.json against the headers
    compile encoded (each checked as read_header checks a shard as it was laid out, :func:`_write_shards`), without
    reading back and parsing the headers and the index just encoded (at DeepSeek-V3's ~90k tensors, most of a
    toy-width compile's time)."""
    for name in plan.files:
        shutil.copy2(plan.model_path / name, tmp / name)
    (tmp / "README.md").write_text(plan.card)
    if plan.indexed:
        _write_index(plan, tmp / INDEX)
    (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    shapes = {key: entry["shape"] for layout in plan.layouts.values() for key, entry in layout.entries.items()}
    _check_against_config(tmp, shapes, shapes.keys() if plan.indexed else None)


def _check_sizes(path: Path, plan: WritePlan) -> None:
    """Each written shard is exactly its header and data section long: a copy cut short or run long shows."""
    for shard, layout in plan.layouts.items():
        file = path / shard
        size, expected = file.stat().st_size, 8 + len(layout.header) + layout.data_bytes
        if size != expected:
            raise CheckpointError(f"{file} holds {size} bytes where its header and data take {expected}: a copy was "
                                  "cut short or ran long (was the source shard changed while compiling?)")


def _check_against_config(path: Path, shapes: dict[str, Sequence[int]], indexed: Collection[str] | None) -> None:
    """The checks of :func:`check_compiled`, given every tensor's shape and the keys the index lists (None: none)."""
    from premoe.adapters import get_adapter
    from premoe.modeling import read_config

    config = read_config(path)
    info = compiled_info(path)
    adapter = get_adapter(config)
    try:
        expected = {int(layer): int(n) for layer, n in info["experts_per_layer"].items()}
        mtp_kept = (info.get("mtp") or {}).get("kept_experts") or {}
        expected.update({int(layer): len(v) for layer, v in mtp_kept.items()})
        compact = info["export"] == "compact"
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}/config.json has a malformed 'premoe' block ({e!r}); recompile it") from e
    count = adapter.num_experts(config)
    wrong = {layer: n for layer, n in expected.items() if n != count and not compact}
    if wrong or max(expected.values(), default=count) != count:
        raise CheckpointError(f"{path}/config.json declares {count} experts per layer but the plan wrote "
                              f"{wrong or expected}; the compiled checkpoint is inconsistent")
    experts: dict[int, set[int]] = {layer: set() for layer in expected}
    rows: set[int] = set()
    for key, (what, layer, expert) in adapter.classify_keys(shapes).items():
        shape = shapes[key]
        if layer not in expected:
            raise CheckpointError(f"{path}: {key} belongs to MoE layer {layer}, which config.json does not cover")
        if what == "expert":
            experts[layer].add(expert)
            continue
        axis = adapter.expert_axis(shape)
        if not shape or shape[axis] != expected[layer]:
            raise CheckpointError(f"{path}: {key} has shape {list(shape)}; config.json says layer {layer} "
                                  f"holds {expected[layer]} experts (axis {axis})")
        rows.add(layer)
    for layer, n in expected.items():
        if layer not in rows:
            raise CheckpointError(f"{path}: MoE layer {layer} has no router tensor")
        if experts[layer] and experts[layer] != set(range(n)):
            raise CheckpointError(f"{path}: layer {layer} holds experts {sorted(experts[layer])}, not 0..{n - 1}")
    mtp_layers = set(adapter.mtp_layers(shapes, config).values())
    if len(mtp_layers) != adapter.mtp_declared(config):
        raise CheckpointError(f"{path}: config.json declares {adapter.mtp_declared(config)} MTP layers, the shards "
                              f"hold {len(mtp_layers)}")
    if indexed is not None and indexed != shapes.keys():
        raise CheckpointError(f"{path}/{INDEX} does not list exactly the tensors the shards hold")


def _write_index(plan: WritePlan, file: Path) -> None:
    metadata = {**plan.index_metadata, "total_size": plan.bytes_after}
    weight_map = dict(sorted((w.key, w.shard) for w in plan.writes))
    file.write_text(_dumps_index(metadata, weight_map) + "\n")


def _dumps_index(metadata: dict, weight_map: dict[str, str]) -> str:
    """``json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2)``, the long map by the C encoder.

    ``indent`` makes json use its pure-Python encoder: 0.2 s for DeepSeek-V3's
    ~90k entries. A flat str -> str map indented is the compact encoding with
    the item separator carrying the newline and indent, so the C encoder
    writes the same text.
    """
    head = json.dumps({"metadata": metadata}, indent=2)[:-2]  # without the closing "\n}"
    if not weight_map:
        return head + ',\n  "weight_map": {}\n}'
    body = json.dumps(weight_map, separators=(",\n    ", ": "))[1:-1]
    return head + ',\n  "weight_map": {\n    ' + body + "\n  }\n}"


def _shard_layout(writes: list[TensorWrite], metadata: dict) -> ShardLayout:
    """One output shard's header and the source byte ranges to copy after it, in order.

    Tensors keep their source order within each dtype width, widest first (as
    safetensors lays them out), so every tensor stays aligned to its element
    size and the kept bytes of neighbouring tensors merge into long copies.
    """
    ordered = sorted(writes, key=lambda w: (-DTYPE_BYTES.get(w.dtype, 1), w.span[0]))
    entries: dict[str, dict] = {}
    offset = 0
    runs: list[tuple[int, int]] = []  # source byte ranges (data section), in output order, adjacent ones merged
    for w in ordered:
        nbytes = w.nbytes
        entries[w.key] = {"dtype": w.dtype, "shape": list(w.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        for begin, end in ((w.span,) if w.rows is None else w.ranges):
            if runs and runs[-1][1] == begin:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((begin, end))
    return ShardLayout(encode_header(entries, metadata), entries, runs, offset)


class _CopyJob(NamedTuple):
    """A part of one output shard's data section: source byte ranges and where each lands in the output file."""

    source: Path
    dest: Path
    runs: list[tuple[int, int, int]]  # (source begin, source end, output offset): absolute file offsets


def _write_shards(plan: WritePlan, tmp: Path, threads: int, advance: Callable[[int], object],
                  meanwhile: Callable[[], object] = lambda: None) -> None:
    """Every output shard: its header, then its kept byte ranges, copied by ``threads`` threads at once; the main
    thread runs ``meanwhile`` once every part is handed out, then waits for the copies.

    Each run's place in its output file is known from the layout, so every
    copy is positional (``copy_file_range`` and ``pwritev`` with both
    offsets) and a thread may take any part of any shard: 3 shards keep as
    many threads busy as 163. Threads suffice because the copies are
    syscalls, which release the GIL; ``cp`` copies with one. The first part
    that fails stops the rest: no more shards are laid out, the parts not
    started are skipped, and the running ones (each at most
    :data:`_JOB_BYTES`) finish before the error goes up; so does an
    interrupt of the waiting main thread.
    """
    lock = threading.Lock()

    def counted(n: int) -> None:  # the progress bar is updated from every thread
        with lock:
            advance(n)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="premoe-copy") if threads > 1 else None
    started: list[Future] = []
    failed = threading.Event()  # set by the first part that raises: stop laying out and submitting

    def part(job: _CopyJob) -> None:
        if failed.is_set():
            return
        try:
            _run_job(job, counted)
        except BaseException:
            failed.set()
            raise

    try:
        for shard, layout in plan.each_layout():  # laid out while the threads copy the shards before
            if failed.is_set():
                break
            file = tmp / shard
            check_layout(file, layout.entries, layout.data_bytes)  # the header encoded tiles the data it heads
            head = struct.pack("<Q", len(layout.header)) + layout.header
            file.write_bytes(head)
            for job in _copy_jobs(plan.model_path / shard, file, layout.runs, plan.data_start[shard], len(head)):
                if pool is None:
                    _run_job(job, advance)
                else:
                    started.append(pool.submit(part, job))
        if not failed.is_set():
            meanwhile()
        done, _ = wait(started, return_when=FIRST_EXCEPTION)  # the first error, not the first part's turn
        for future in done:
            future.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _copy_jobs(source: Path, dest: Path, runs: list[tuple[int, int]], data_start: int,
               out: int) -> list[_CopyJob]:
    """Cut one shard's runs (source ranges within its data section, which starts at byte ``data_start``; in output
    order from byte ``out``) into jobs of about :data:`_JOB_BYTES` each, splitting runs longer than that."""
    jobs: list[_CopyJob] = []
    current: list[tuple[int, int, int]] = []
    size = 0
    for begin, end in runs:
        begin, end = data_start + begin, data_start + end
        while begin < end:
            piece = min(end, begin + _JOB_BYTES - size)
            current.append((begin, piece, out))
            size += piece - begin
            out += piece - begin
            begin = piece
            if size >= _JOB_BYTES:
                jobs.append(_CopyJob(source, dest, current))
                current, size = [], 0
    if current:
        jobs.append(_CopyJob(source, dest, current))
    return jobs


def _run_job(job: _CopyJob, advance: Callable[[int], object]) -> None:
    src = os.open(job.source, os.O_RDONLY)
    try:
        dst = os.open(job.dest, os.O_WRONLY)
        try:
            _copy_runs(src, dst, job.runs, job.source, advance)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_runs(src: int, dst: int, runs: list[tuple[int, int, int]], name: Path,
               advance: Callable[[int], object]) -> None:
    """Copy the byte ranges ``runs`` of ``src`` to their offsets in ``dst``, with syscalls that scale with bytes,
    not runs.

    ``runs`` are (source begin, source end, output offset), each starting in
    the output where the one before ends. A run of at least
    :data:`_KERNEL_RUN` bytes is copied in the kernel (``copy_file_range``,
    as ``cp`` does). Shorter runs — a toy-width expert, an FP8 block scale, a
    run cut short by a dropped neighbour — are gathered into one ``pwritev``
    per mapped window of at most :data:`_CHUNK` source bytes and
    :data:`_IOV_MAX` runs. The DeepSeek-V3 FP8 layout at toy width keeps ~50k
    runs of ~4 kB (weights and their scales interleave on disk, and the
    output puts the wider dtype first): one kernel call each took 2-3x as
    long as copying the same bytes in one call per shard.
    """
    size = os.fstat(src).st_size
    pending: list[tuple[int, int]] = []  # short runs waiting for one pwritev
    low = high = at = 0  # the source window they span; where the first lands
    for begin, end, out in runs:
        if end > size:
            raise CheckpointError(f"{name} ends at byte {size}, before byte {end} of a kept tensor; the shard is "
                                  "truncated")
        if end - begin >= _KERNEL_RUN:
            _gather(src, dst, pending, low, high, at, advance)
            pending = []
            _copy_range(src, dst, begin, end - begin, out, name, advance)
            continue
        if pending and (len(pending) == _IOV_MAX or max(high, end) - min(low, begin) > _CHUNK):
            _gather(src, dst, pending, low, high, at, advance)
            pending = []
        if pending:
            low, high = min(low, begin), max(high, end)
        else:
            low, high, at = begin, end, out
        pending.append((begin, end))
    _gather(src, dst, pending, low, high, at, advance)


def _gather(src: int, dst: int, runs: list[tuple[int, int]], low: int, high: int, out: int,
            advance: Callable[[int], object]) -> None:
    """Write ``runs`` (all inside source bytes [low, high)) one after another to ``dst`` from byte ``out``, from one
    read-only map of that window."""
    if not runs:
        return
    start = low - low % mmap.ALLOCATIONGRANULARITY  # a map must start on the granularity
    window = mmap.mmap(src, high - start, access=mmap.ACCESS_READ, offset=start)
    try:
        with memoryview(window) as view:
            parts = [view[begin - start : end - start] for begin, end in runs]
            try:
                _pwritev_all(dst, parts, out)
            finally:
                for part in parts:  # the map cannot close while a slice of it is alive
                    part.release()
    finally:
        window.close()
    advance(sum(end - begin for begin, end in runs))


def _pwritev_all(fd: int, parts: list[memoryview], offset: int) -> None:
    """Write ``parts`` in order from ``offset`` with one ``pwritev``, finishing a short write (or no pwritev) with
    plain ones."""
    done = os.pwritev(fd, parts, offset) if hasattr(os, "pwritev") else 0
    offset += done
    for part in parts:
        if done >= len(part):
            done -= len(part)
            continue
        rest, done = part[done:], 0
        while rest:
            n = os.pwrite(fd, rest, offset)
            rest, offset = rest[n:], offset + n


def _copy_range(src: int, dst: int, offset: int, count: int, out: int, name: Path,
                advance: Callable[[int], object]) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` to byte ``out`` of ``dst``: in the kernel where it can, else via
    a buffer."""
    while count:
        try:
            n = os.copy_file_range(src, dst, min(count, _CHUNK), offset, out)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = _buffered_copy(src, dst, offset, min(count, _CHUNK), out)
        if n == 0:
            raise CheckpointError(f"{name} ended at byte {offset} while copying; the shard is truncated")
        offset += n
        out += n
        count -= n
        advance(n)


def _buffered_copy(src: int, dst: int, offset: int, count: int, out: int) -> int:
    data = memoryview(os.pread(src, count, offset))
    written = 0
    while written < len(data):
        written += os.pwrite(dst, data[written:], out + written)
    return written


# --------------------------------------------------------------------------- compact loading


def compiled_info(path: str | Path) -> dict:
    """The ``premoe`` block of a compiled checkpoint's config.json (kept experts, source, export)."""
    from premoe.modeling import read_config

    info = read_config(path).get("premoe")
    if not info:
        raise CheckpointError(f"{path}/config.json has no 'premoe' block; it was not written by `premoe compile`")
    source, kept, counts = (info.get(k) if isinstance(info, dict) else None
                            for k in ("source", "kept_experts", "experts_per_layer"))
    if not (isinstance(source, dict) and all(isinstance(source.get(k), str) for k in ("name", "config_hash"))
            and _layer_table(kept, lambda v: isinstance(v, list) and all(type(e) is int and e >= 0 for e in v))
            and _layer_table(counts, lambda v: type(v) is int and v > 0) and isinstance(info.get("export"), str)):
        raise CheckpointError(f"{path}/config.json has a malformed 'premoe' block (expected source.name/config_hash, "
                              "kept_experts, experts_per_layer and export as `premoe compile` writes them); recompile "
                              "the checkpoint")
    problem = _block_problem(info)
    if problem:
        raise CheckpointError(f"{path}/config.json: the 'premoe' block {problem}; recompile the checkpoint")
    return info


def _block_problem(info: dict) -> str | None:
    """What makes a well-typed ``premoe`` block inconsistent (verify would crash or mis-route on it), or None."""
    if info.get("format", FORMAT) != FORMAT:
        return f"has format {info['format']!r}, not {FORMAT} (a newer premoe wrote it?)"
    total, kept, counts = info.get("num_experts_original"), info["kept_experts"], info["experts_per_layer"]
    if type(total) is not int or total < 1:
        return f"has num_experts_original {total!r}, expected a positive integer"
    if info["export"] not in ("uniform", "padded", "compact"):
        return f"has export {info['export']!r}, expected uniform, padded or compact"
    if kept.keys() != counts.keys():
        return f"lists kept experts for layers {sorted(kept, key=int)} but counts for {sorted(counts, key=int)}"
    for layer, experts in kept.items():
        if len(set(experts)) != len(experts) or len(experts) != counts[layer] or max(experts, default=0) >= total:
            return (f"keeps experts {experts} in layer {layer}: expected {counts[layer]} distinct indices "
                    f"below {total}")
    return None


def _layer_table(table, valid: Callable[[object], bool]) -> bool:
    """Whether ``table`` maps decimal layer indices to values ``valid`` accepts (a compiled config's tables)."""
    return isinstance(table, dict) and all(isinstance(k, str) and k.isascii() and k.isdigit() and valid(v)
                                           for k, v in table.items())


def kept_experts(path: str | Path) -> dict[int, list[int]]:
    """Decoder layer -> original indices of the experts a compiled checkpoint holds."""
    return {int(layer): v for layer, v in compiled_info(path)["kept_experts"].items()}


def load_compact(path: str | Path, dtype=None):
    """Load a ``--export compact`` checkpoint, whose layers hold different expert counts.

    Vanilla loaders read one expert count from config.json (the largest, here).
    This pads every smaller layer to it in memory — copies of its expert 0,
    zero router rows — lets transformers build and convert the model as
    usual, then prunes each layer to its real count with
    :func:`premoe.adapters.base.prune_in_memory`, so the padding never routes.
    Peak memory is the model at the largest count.

    >>> model = load_compact("python-global/")      # fp32, eval mode
    """
    import torch
    from safetensors.torch import load_file
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from premoe.adapters import get_adapter
    from premoe.adapters.base import prune_in_memory
    from premoe.modeling import resolve_model_path, transformers_config
    from premoe.progress import loading

    path = resolve_model_path(path)
    counts = {int(layer): n for layer, n in compiled_info(path)["experts_per_layer"].items()}
    config = transformers_config(path)
    adapter = get_adapter(config)
    largest = max(counts.values())
    state: dict[str, torch.Tensor] = {}
    for shard in shard_files(path):
        state.update(load_file(str(path / shard)))
    for key in list(state):
        kind = adapter.classify_key(key)
        if kind is None or kind[1] not in counts or counts[kind[1]] == largest:  # MTP layers: not loaded
            continue
        what, layer, expert = kind
        if what == "expert" and expert == 0:
            for e in range(counts[layer], largest):
                state[adapter.rename_expert_key(key, 0, e)] = state[key]
        elif what == "rows":
            rows = state[key]  # experts along one axis
            axis = adapter.expert_axis(rows.shape)
            pad = list(rows.shape)
            pad[axis] = largest - counts[layer]
            state[key] = torch.cat([rows, rows.new_zeros(pad)], dim=axis)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with loading(path):  # transformers' bar only for a long load on a terminal (premoe.progress)
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype or torch.float32)
    prune_in_memory(model, adapter, {layer: list(range(n)) for layer, n in counts.items()})
    return model.eval()
