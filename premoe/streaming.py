"""Checkpoints larger than memory, one decoder layer at a time: the streaming profile, and the machinery under it.

:class:`LayerRunner` runs token windows through a checkpoint layer by layer
(the profile here, ``premoe verify --stream``); :func:`load_pruned` builds a
pruned model layer by layer (the expert bank). What follows describes the
profile.

The model is built as a skeleton whose parameters live on the ``meta``
device (no memory). Every calibration window goes through the embeddings
first; then, for each decoder layer in turn, only that layer's tensors are
read from the safetensors shards (in fp32, through transformers' own key
conversion, e.g. per-expert keys fused into ``experts.gate_up_proj``), the
hidden states of *all* windows run through it with a
:class:`~premoe.capture.RouterCapture` on its router, and the layer goes back
to ``meta``. Peak memory is about 1.7 times one layer's fp32 weights
(transformers' key conversion briefly holds stacked copies of the experts)
plus the hidden states, which move to a scratch file when they would not fit
beside the layer (bench/bench_profile.py stream measures this).

What each decoder layer receives besides the hidden states (attention masks,
rotary position embeddings, position ids) is recorded from the model's own
forward pass with the layers replaced by recorders, so no family's mask or
rotary code is copied here, and families whose layers get different masks
(sliding-window layers) are handled by the model itself. These inputs stay
in memory, one copy per distinct window shape.

The result equals :func:`premoe.profile.profile_model` on the same tokens
(fp32) to rounding. Example::

    profile = profile_streaming("big-moe/", parse_sources(["code=code.jsonl"]), ["peu", "frequency"],
                                ProfileParams(max_tokens=8192), workdir="/scratch")
    profile.save("profiles/big-moe")
"""
from __future__ import annotations

import contextlib
import errno
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from premoe import checkpoint, malloc
from premoe.adapters.base import layer_index
from premoe.capture import DomainStats, RouterCapture
from premoe.data import Source, token_windows
from premoe.errors import CheckpointError, DiskSpaceError, InputError, UnsupportedModelError
from premoe.profile import Profile, ProfileParams, assemble_profile, check_sources, resolve_scorers

_CHUNK = 1 << 30  # bytes per pwrite call (Linux moves at most ~2 GiB per call)
_ELSEWHERE = "point --workdir at another directory"  # the fix when the scratch file of hidden states has no room
_SYNC_LOAD = "HF_DEACTIVATE_ASYNC_LOAD"  # read by transformers' convert_and_load_state_dict_in_model
_SCALE_SUFFIX = "_scale_inv"  # FP8 checkpoints (DeepSeek-V3/R1, Kimi-K2, GLM-4.5-FP8): "<name>.weight_scale_inv"
_FORWARD_SHARE = 0.25  # a forward's own memory may take at most this share of the largest layer's (forward_batch)


@dataclass
class _Batch:
    """One forward batch of calibration windows and what the model's forward passes each layer for it."""

    domain: str
    start: int  # first row of this batch in the hidden-state store
    shape: tuple[int, int]  # (windows, seq)
    layer_inputs: list[tuple[tuple, dict]]  # per decoder layer: (extra positional args, keyword args)

    @property
    def rows(self) -> int:
        return self.shape[0] * self.shape[1]


@torch.no_grad()
def profile_streaming(model: str | Path, sources: Sequence[Source], scorers: Sequence[str] | None = None,
                      params: ProfileParams | None = None, workdir: str | Path | None = None, progress: bool = True,
                      memory_budget: int | None = None) -> Profile:
    """Profile ``model`` reading one decoder layer at a time from its shards (see module docstring).

    ``workdir`` holds the scratch file of hidden states when they exceed
    ``memory_budget`` bytes (default: the largest decoder layer's fp32 size,
    so the hidden states never cost more than the layer itself; 0 forces the
    file). Text only: ``params.generate`` needs the whole model in memory.
    """
    from premoe.modeling import check_context, load_tokenizer, model_identity, read_config
    from premoe.progress import bar

    params = params or ProfileParams()
    check_context(read_config(model), params.seq_len)
    if params.generate:
        raise InputError("generating continuations needs the whole model in memory; profile without --stream, "
                         "or set --generate 0")
    check_sources(sources)
    specs = resolve_scorers(scorers)
    identity = model_identity(model)
    started = time.time()
    tokenizer = load_tokenizer(model)
    windows = {s.name: token_windows(s.texts, tokenizer, params.seq_len, params.max_tokens) for s in sources}
    rows = sum(w.numel() for w in windows.values())
    with LayerRunner(model, windows, params.batch_size, params.device, workdir, memory_budget) as runner:
        per_layer: dict[str, list[DomainStats]] = {s.name: [] for s in sources}
        with bar(len(runner.layers) * rows, "profile (streaming)", "tok", enabled=progress, unit_scale=True) as shown:
            for index in range(len(runner.layers)):
                with runner.layer(index):
                    capture = (RouterCapture(runner.net, runner.adapter, specs, layers=[index])
                               if index in runner.moe else None)
                    with capture or contextlib.nullcontext():
                        for batch, last_of_domain in _with_domain_ends(runner.batches):
                            runner.run(index, batch, capture=capture)
                            shown.update(batch.rows)
                            if capture and last_of_domain:
                                per_layer[batch.domain].append(capture.reset())
        hidden = "file" if runner.stores[0].path else "memory"
    domains = {name: _stack_layers(rows_) for name, rows_ in per_layer.items()}
    return assemble_profile(identity, runner.adapter, runner.config, list(runner.moe.values()), specs, domains, params,
                            sources, started, mode="streaming", hidden_states=hidden)


class LayerRunner:
    """Token windows run through a checkpoint one decoder layer at a time, never the whole model in memory.

    The windows are embedded once (what each layer receives besides the
    hidden states is recorded from the model's own forward, see the module
    docstring); ``streams`` copies of their hidden states are kept, so one
    loaded layer can serve several passes (verify runs the original with and
    without restricted routing). Use as a context manager (it owns scratch
    files)::

        with LayerRunner("big-moe/", {"code": ids}, batch_size=8) as runner:
            for index in range(len(runner.layers)):
                with runner.layer(index):
                    for batch in runner.batches:
                        runner.run(index, batch)
            with runner.head():
                logits = runner.logits(runner.batches[0])      # (batch, seq, vocab)

    ``memory_budget``: bytes one stream's hidden states may take in memory
    before they go to a scratch file in ``workdir`` (default: the largest
    decoder layer's fp32 size).
    """

    def __init__(self, model: str | Path, windows: dict[str, torch.Tensor], batch_size: int = 8, device: str = "cpu",
                 workdir: str | Path | None = None, memory_budget: int | None = None, streams: int = 1):
        self.device = device
        self.path, self.config, self.net, self.adapter, self.moe, self.layers, self.loader = _open(model, device)
        rows = sum(w.numel() for w in windows.values())
        largest = max(map(self.loader.layer_bytes, range(len(self.layers))))
        budget = largest if memory_budget is None else memory_budget
        seq_len = max((w.shape[-1] for w in windows.values()), default=1)
        batch_size = forward_batch(batch_size, seq_len, forward_bytes_per_token(self.config, self.adapter), largest)
        self._files = contextlib.ExitStack()
        try:  # __exit__ never runs for a constructor that raises: close the scratch files here
            self.stores = [self._files.enter_context(_HiddenStore(rows, self.config.hidden_size, budget, workdir))
                           for _ in range(streams)]
            with self.loader.loaded(self.loader.prelude_keys(), self.net.get_input_embeddings(),
                                    "the input embeddings"):
                self.batches = _embed(self.net, self.layers, windows, batch_size, device, self.stores[0])
            for store in self.stores[1:]:
                for batch in self.batches:
                    store.write(batch.start, self.stores[0].read(batch.start, batch.rows))
        except BaseException:
            self._files.close()
            raise

    def __enter__(self) -> LayerRunner:
        return self

    def __exit__(self, *exc) -> None:
        self._files.close()

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` loaded (fp32) for the block, back on ``meta`` after it."""
        with self.loader.loaded(self.loader.layer_keys(index), self.layers[index], f"decoder layer {index}"):
            yield self.layers[index]

    def run(self, index: int, batch: _Batch, stream: int = 0, capture: RouterCapture | None = None) -> None:
        """One batch's hidden states of ``stream`` through loaded layer ``index``, in place."""
        _run_layer(self.layers[index], index, batch, self.stores[stream], capture, self.device)

    @contextlib.contextmanager
    def head(self) -> Iterator[None]:
        """Everything outside the decoder layers loaded (embeddings, final norm, output head), for :meth:`logits`."""
        keys = self.loader.by_layer.get(None, [])
        with self.loader.loaded(keys, self.net.get_input_embeddings(), "the embeddings and output head"):
            if getattr(self.config, "tie_word_embeddings", False):
                self.net.tie_weights()
            yield

    def logits(self, batch: _Batch, stream: int = 0) -> torch.Tensor:
        """(batch, seq, vocab) logits of a batch whose hidden states went through every layer (inside :meth:`head`).

        The model's own forward computes them (final norm, head, any logit
        scaling) with every decoder layer replaced by one that returns the
        stored hidden states.
        """
        hidden = self.stores[stream].read(batch.start, batch.rows).to(self.device).view(*batch.shape, -1)
        originals = list(self.layers)
        try:
            for i in range(len(self.layers)):
                self.layers[i] = _Replay(hidden)
            ids = torch.zeros(batch.shape, dtype=torch.long, device=self.device)  # (batch, seq): replaced anyway
            return self.net(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns the given hidden states, whatever it receives."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.hidden


def load_pruned(model: str | Path, kept: dict[int, Sequence[int]], on_layer=None, device: str = "cpu") -> nn.Module:
    """The model holding only the ``kept`` experts of each MoE layer, built one decoder layer at a time.

    Each decoder layer is read whole (fp32, the same conversion as the
    profile) and pruned at once with
    :func:`~premoe.adapters.base.prune_in_memory`, so the peak is the pruned
    model plus one unpruned layer, never the whole checkpoint: what the expert
    bank needs to serve a model larger than memory. ``on_layer(moe_layer)``
    sees each MoE layer before it is pruned (the bank copies the first
    router). The result equals ``prune_in_memory(load_model(model), adapter,
    kept)`` exactly (tests/test_bank.py).
    """
    from premoe.adapters.base import prune_in_memory

    path, config, net, adapter, moe, layers, loader = _open(model, device)
    missing = sorted(set(moe) - set(kept))
    if missing:
        raise InputError(f"the expert set names no experts for MoE layers {missing}")
    adapter.check_kept(config, {index: kept[index] for index in moe})
    loader.load(loader.by_layer.get(None, []))  # embeddings, final norm, output head
    for index in range(len(layers)):
        loader.load(loader.layer_keys(index))
        if index in moe:
            if on_layer is not None:
                on_layer(moe[index])
            prune_in_memory(net, adapter, {index: kept[index]})  # this layer only: the others are not loaded yet
            malloc.trim_heap()
    if getattr(config, "tie_word_embeddings", False):
        net.tie_weights()
    prune_in_memory(net, adapter, {})  # no slicing left: sets the config's expert count, now one for every layer
    absent = [name for name, p in net.named_parameters() if p.is_meta]
    if absent:
        raise CheckpointError(f"{path} lacks tensor {absent[0]} ({len(absent)} missing); the checkpoint is incomplete")
    return net.eval()


# --------------------------------------------------------------------------- the model


def _open(model: str | Path, device: str) -> tuple:
    """(path, config, skeleton, adapter, {index: MoE layer}, decoder layers, loader) of a checkpoint, nothing loaded."""
    from premoe.adapters import get_adapter
    from premoe.modeling import resolve_model_path, transformers_config

    path = resolve_model_path(model)
    config = transformers_config(path)
    net = _skeleton(config)
    adapter = get_adapter(config, net)
    moe = {layer.index: layer for layer in adapter.moe_layers(net)}
    if not moe:
        raise UnsupportedModelError(f"{path} has no MoE layers premoe can find; is it a Mixture-of-Experts model?")
    layers = _decoder_layers(net, next(iter(moe.values())))
    loader = _Loader(net, path, checkpoint.tensors(path), len(layers), device, _weight_block(config), adapter, moe)
    malloc.return_freed_memory()
    return path, config, net, adapter, moe, layers, loader


def _skeleton(config) -> nn.Module:
    """The model with every parameter on ``meta``; buffers (rotary frequencies) are real, they are computed, not stored."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return net.eval()


def _decoder_layers(net: nn.Module, moe_layer) -> nn.ModuleList:
    """The decoder-layer list, found from a router's name, e.g. ``model.layers.3.mlp.gate`` -> ``model.layers``."""
    name = moe_layer.router_name[: moe_layer.router_name.index(f"layers.{moe_layer.index}.")] + "layers"
    layers = net.get_submodule(name)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{name} of {type(net).__name__} is not a list of decoder layers; "
                                    "streaming needs the usual transformers layout")
    return layers


class _Loader:
    """Loads subsets of checkpoint tensors into the skeleton and sends them back to ``meta``."""

    def __init__(self, net: nn.Module, path: Path, stored: dict[str, checkpoint.TensorInfo], num_layers: int,
                 device: str, block: tuple[int, int] | None = None, adapter=None, moe: dict | None = None):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.net, self.path, self.stored, self.device, self.block = net, path, stored, device, block
        self.adapter, self.moe = adapter, moe or {}  # per-expert tensors of these MoE layers are placed directly
        self.weight_mapping = get_model_conversion_mapping(net)  # the family's on-disk -> in-memory key rules
        self.by_layer: dict[int | None, list[str]] = {}  # decoder layer (None: outside the layers) -> keys
        for key in stored:
            self.by_layer.setdefault(layer_index(key), []).append(key)
        missing = sorted(set(range(num_layers)) - set(self.by_layer))
        if missing:
            raise CheckpointError(f"{path} holds no tensor of decoder layer {missing[0]} ({len(missing)} layers "
                                  "missing); the checkpoint is incomplete")

    def _block_size(self, key: str) -> tuple[int, int]:
        if self.block is None:
            raise CheckpointError(f"{self.path}: tensor {key} has a block scale ({key}{_SCALE_SUFFIX}) but "
                                  "config.json's quantization_config gives no weight_block_size; is this an FP8 "
                                  "checkpoint?")
        return self.block

    def layer_keys(self, index: int) -> list[str]:
        return self.by_layer[index]

    def layer_bytes(self, index: int) -> int:
        """fp32 bytes of decoder layer ``index``."""
        return sum(4 * torch.Size(self.stored[k].shape).numel() for k in self.by_layer[index])

    def prelude_keys(self) -> list[str]:
        """Tensors outside the decoder layers, except the output head (the profile never needs logits)."""
        head = self.net.get_output_embeddings()
        head_name = next((n for n, m in self.net.named_modules() if m is head), None)
        return [k for k in self.by_layer.get(None, []) if not (head_name and k.startswith(head_name + "."))]

    @contextlib.contextmanager
    def loaded(self, keys: list[str], module: nn.Module, what: str) -> Iterator[None]:
        """Tensors ``keys`` materialised in fp32 for the duration of the block; ``module`` must be complete."""
        before = {n for n, p in self.net.named_parameters() if p.is_meta}
        try:
            self.load(keys)
            missing = [n for n, p in module.named_parameters() if p.is_meta]
            if missing:
                raise CheckpointError(f"{self.path} lacks tensor {missing[0]} of {what} ({len(missing)} missing); "
                                      "the checkpoint is incomplete")
            yield
        finally:
            for name, p in list(self.net.named_parameters()):
                if name in before and not p.is_meta:  # back to meta: frees the weights
                    owner, _, attr = name.rpartition(".")
                    setattr(self.net.get_submodule(owner), attr, nn.Parameter(p.to("meta"), requires_grad=False))
            malloc.trim_heap()

    def load(self, keys: list[str]) -> None:
        """Materialise tensors ``keys`` in fp32 for good (:meth:`loaded` sends them back to ``meta`` after)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        config = LoadStateDictConfig(dtype=torch.float32, weight_mapping=self.weight_mapping,
                                     device_map={"": self.device})
        shards = sorted({self.stored[k].shard for k in keys})
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers shows one bar per call
        # one tensor at a time: with transformers' reader threads every tensor of the layer is read at once
        # and held beside the converted (fused) copies, ~2.7x the layer at peak instead of ~1.6x
        sync = os.environ.get(_SYNC_LOAD)
        os.environ[_SYNC_LOAD] = "1"
        try:
            with contextlib.ExitStack() as stack:
                files = {shard: stack.enter_context(_Shard(self.path / shard)) for shard in shards}
                rest = self._place_experts(keys, files)
                state = {k: self._lazy(k, files) for k in rest
                         if not (k.endswith(_SCALE_SUFFIX) and k.removesuffix(_SCALE_SUFFIX) in self.stored)}
                info, _ = convert_and_load_state_dict_in_model(self.net, state, config)
        finally:
            if sync is None:
                os.environ.pop(_SYNC_LOAD, None)
            else:
                os.environ[_SYNC_LOAD] = sync
            if bars:
                hf_logging.enable_progress_bar()
        if info.mismatched_keys:
            name, got, expected = sorted(info.mismatched_keys)[0]
            raise CheckpointError(f"{self.path}: tensor {name} has shape {tuple(got)}, the config expects "
                                  f"{tuple(expected)}; config.json and the weights disagree")
        if info.conversion_errors:
            raise CheckpointError(f"{self.path}: could not convert {', '.join(sorted(info.conversion_errors))}")


    def _lazy(self, key: str, files: dict):
        """Tensor ``key`` as a lazy slice (read when indexed), dequantised when it has an FP8 block scale."""
        info = self.stored[key]
        weight = _Stored(files[info.shard], info)
        scale = self.stored.get(key + _SCALE_SUFFIX)
        if scale is None:
            return weight
        return _BlockDequantized(weight, _Stored(files[scale.shard], scale), self._block_size(key))

    def _place_experts(self, keys: list[str], files: dict) -> list[str]:
        """Write per-expert tensors straight into their fused parameters; return the keys left to transformers.

        transformers' conversion reads every expert of a layer, then stacks
        and concatenates them into ``experts.gate_up_proj`` / ``down_proj``:
        the layer plus two transient copies (RSS +2.2x the layer's fp32 bytes
        at peak on DeepSeek-V3's layout). Here each fused parameter is
        allocated once and filled one expert at a time, where the adapter says
        each on-disk tensor goes (the expert bank's map), so the peak is the
        layer plus one expert.
        """
        targets: dict[tuple[int, str], list[tuple[str, int, int, int]]] = {}
        rest = []
        for key in keys:
            kind = self.adapter.classify_key(key) if self.adapter else None
            place = None
            if kind and kind[0] == "expert" and kind[1] in self.moe and self.moe[kind[1]].block is not None:
                with contextlib.suppress(KeyError):  # scales and unknown names: read with / by transformers
                    place = self.adapter.memory_place(key)
            if place is None:
                rest.append(key)
                continue
            path, part, parts = place
            targets.setdefault((kind[1], path), []).append((key, kind[2], part, parts))
        for (layer, path), entries in targets.items():
            self._fill(self.moe[layer].block, path, entries, files)
        return rest

    def _fill(self, block: nn.Module, path: str, entries: list[tuple[str, int, int, int]], files: dict) -> None:
        """Allocate fused parameter ``path`` of ``block`` (experts, ...) in fp32 and copy each expert's tensors in."""
        owner, _, attr = path.rpartition(".")
        module = block.get_submodule(owner) if owner else block
        shape = getattr(module, attr).shape  # (experts, ...) on meta
        fused = torch.empty(shape, dtype=torch.float32, device=self.device)
        filled = set()
        for key, expert, part, parts in entries:
            slot = fused.select(0, expert)
            target = slot.chunk(parts, dim=0)[part] if parts > 1 else slot
            value = self._lazy(key, files)[...]  # (rows, cols) as stored
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{self.path}: tensor {key} has shape {tuple(value.shape)}, the config expects "
                                      f"{tuple(target.shape)}; config.json and the weights disagree")
            target.copy_(value)
            filled.add((expert, part))
        parts = entries[0][3]
        if len(filled) != shape[0] * parts:
            raise CheckpointError(f"{self.path}: {len(filled)} of the {shape[0] * parts} expert tensors that make up "
                                  f"{path} are on disk; the checkpoint is incomplete")
        setattr(module, attr, nn.Parameter(fused, requires_grad=False))


def _weight_block(config) -> tuple[int, int] | None:
    """FP8 block size of a block-quantised checkpoint (``quantization_config.weight_block_size``), else None."""
    quantization = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    block = quantization.get("weight_block_size")
    return tuple(block) if block else None


class _Shard:
    """An open shard whose tensors are read at the offsets its (already checked) header gave.

    Not ``safetensors.safe_open``: that parses the header again on every
    open (a 15k-tensor shard: +9 MB and 0.09 s each time a layer loads), and
    not a memory map, whose pages would count as this process's memory.
    """

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self) -> _Shard:
        self.fd = os.open(self.file, os.O_RDONLY)
        (length,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.data_start = 8 + length
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


class _Stored:
    """One tensor of an open shard, read (pread, its own dtype) when transformers' loader slices it."""

    def __init__(self, shard: _Shard, info: checkpoint.TensorInfo):
        self.shard, self.info = shard, info

    def __getitem__(self, index) -> torch.Tensor:
        tensor = torch.empty(self.info.shape, dtype=checkpoint.torch_dtype(self.info.dtype))
        checkpoint.read_into(self.shard.fd, tensor, self.shard.data_start + self.info.offsets[0],
                             f"{self.shard.file} ({self.info.key})")
        return tensor[index]


class _BlockDequantized:
    """An FP8 weight and its block scales read lazily, dequantised when transformers' loader slices it.

    DeepSeek-style FP8 stores ``weight`` (rows, cols) as float8 and
    ``weight_scale_inv`` (ceil(rows/b0), ceil(cols/b1)) in F32; the real weight
    is their product block by block. The skeleton is built without a
    quantiser, so without this the loader would cast the raw float8 values
    and silently profile a model whose weights are off by the scales.
    """

    def __init__(self, weight, scale, block: tuple[int, int]):
        self.weight, self.scale, self.block = weight, scale, block

    def __getitem__(self, index) -> torch.Tensor:
        weight = self.weight[...].float()  # (rows, cols)
        scale = self.scale[...].float()  # (row blocks, col blocks)
        rows, cols = weight.shape
        expanded = scale.repeat_interleave(self.block[0], 0)[:rows].repeat_interleave(self.block[1], 1)[:, :cols]
        return (weight * expanded)[index]  # (rows, cols)


# --------------------------------------------------------------------------- the passes


class _InputsRecorded(Exception):
    """Ends the recording forward pass after the last decoder layer's inputs."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: keeps what the model's forward passes it, returns the hidden states unchanged."""

    def __init__(self, last: bool, inputs: list, embedded: list):
        super().__init__()
        self.last, self.inputs, self.embedded = last, inputs, embedded

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.embedded:
            self.embedded.append(hidden_states)  # the first layer's input: the embeddings
        self.inputs.append((args, kwargs))
        if self.last:
            raise _InputsRecorded
        return hidden_states


def forward_bytes_per_token(config, adapter) -> int:
    """What one token costs while a decoder layer runs, beyond the layer's weights: an estimate from the config.

    transformers' MoE blocks build a one-hot expert mask of every token's
    top-k choices as int64 ((tokens, top_k, experts) and its permuted copy,
    8 bytes each) and the usual per-token activations (a few dozen fp32
    vectors of the hidden size). Measured on the DeepSeek-V3 layout at toy
    width (hidden 128, 256 experts, top-8; bench/bench_rehearsal.py profile
    rows): peak above the layer grew by ~34 kB per token of a forward; this
    gives 16 * 8 * 256 + 64 * 128 = 40 kB.
    """
    return 16 * adapter.num_experts(config) * adapter.top_k(config) + 64 * config.hidden_size


def forward_batch(batch_size: int, seq_len: int, token_bytes: int, layer_bytes: int) -> int:
    """Windows per forward: ``batch_size``, fewer where the memory a forward needs for its tokens would pass
    :data:`_FORWARD_SHARE` of the largest layer's weights (at least one window).

    Streaming holds one layer at a time; what the forward allocates for its
    tokens comes on top, beside a part that does not grow with tokens (about
    half a layer at toy width: loading, the attention's own tensors). On
    DeepSeek-V3 with 512-token windows the tokens' part is 2 GB beside an
    11 GB layer and the cap does not bind (4096-token windows: one a forward,
    not 16 GB for 8); on the toy-width DeepSeek-V3 layout 8 windows of 128
    tokens a forward took the peak to 2.7x the layer, 2 windows to 1.8-2.0x,
    one window to 1.5-1.7x (bench/results/rehearsal.md), hence a quarter, not
    a half. The profile does not depend on how windows are batched.
    """
    fits = int(_FORWARD_SHARE * layer_bytes) // max(1, token_bytes * seq_len)
    return max(1, min(batch_size, fits))


def _embed(net: nn.Module, layers: nn.ModuleList, windows: dict[str, torch.Tensor], batch_size: int, device: str,
           store: _HiddenStore) -> list[_Batch]:
    """Run every window through the embeddings into ``store`` and record each layer's other inputs."""
    originals = list(layers)
    batches, start = [], 0
    try:
        for domain, domain_windows in windows.items():
            for first in range(0, domain_windows.shape[0], batch_size):
                input_ids = domain_windows[first : first + batch_size].to(device)  # (batch, seq)
                inputs, embedded = [], []
                for i in range(len(layers)):
                    layers[i] = _Recorder(i == len(layers) - 1, inputs, embedded)
                with contextlib.suppress(_InputsRecorded):
                    net(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
                store.write(start, embedded[0].reshape(input_ids.numel(), -1))  # (batch * seq, hidden)
                if batches:  # equal windows get equal masks and rotary tables: keep one copy, not one per batch
                    inputs = [old if _same(old, new) else new for old, new in zip(batches[-1].layer_inputs, inputs)]
                batches.append(_Batch(domain, start, tuple(input_ids.shape), inputs))
                start += input_ids.numel()
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return batches


def _same(a, b) -> bool:
    """Whether two recorded layer inputs (nested tuples / dicts of tensors and plain values) are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (isinstance(a, (bool, int, float, str)) and type(a) is type(b) and a == b)


def _run_layer(layer: nn.Module, index: int, batch: _Batch, store: "_HiddenStore", capture: RouterCapture | None,
               device: str) -> None:
    """Hidden states of one batch through one decoder layer, in place in the store."""
    hidden = store.read(batch.start, batch.rows).to(device).view(*batch.shape, -1)  # (batch, seq, hidden)
    args, kwargs = batch.layer_inputs[index]
    with capture.batch(torch.ones(batch.shape)) if capture else contextlib.nullcontext():
        out = layer(hidden, *args, **kwargs)  # (batch, seq, hidden)
    store.write(batch.start, out.reshape(batch.rows, -1))


def _with_domain_ends(batches: list[_Batch]) -> Iterator[tuple[_Batch, bool]]:
    for i, batch in enumerate(batches):
        yield batch, i == len(batches) - 1 or batches[i + 1].domain != batch.domain


def _stack_layers(rows: list[DomainStats]) -> DomainStats:
    """One domain's per-layer stats (each (1, experts)) as one (moe_layers, experts) DomainStats."""
    tokens = {r.tokens for r in rows}
    if len(tokens) != 1:
        raise RuntimeError(f"layers saw different token counts {sorted(tokens)}")  # a bug, not a user error
    return DomainStats(tokens.pop(), {n: torch.cat([r.sums[n] for r in rows]) for n in rows[0].sums},
                       torch.cat([r.routed for r in rows]))


# --------------------------------------------------------------------------- hidden states


class _HiddenStore:
    """Hidden states of every calibration token between two layers: (rows, width) fp32, in memory or in a file.

    The file is read and written with pread/pwrite rather than mapped, so its
    pages stay in the page cache and never count as this process's memory.
    """

    def __init__(self, rows: int, width: int, budget: int, workdir: str | Path | None):
        self.width = width
        self.path: Path | None = None
        if 4 * rows * width <= budget:
            self.memory = torch.empty(rows, width)  # (tokens, hidden)
            return
        from premoe.fileio import check_space, nameless_file

        directory = Path(workdir if workdir is not None else tempfile.gettempdir())
        # checked up front: the file is sparse, so ftruncate below would not notice a disk too small for it
        check_space(directory / "premoe-hidden-states.f32", 4 * rows * width, elsewhere=_ELSEWHERE)
        directory.mkdir(parents=True, exist_ok=True)
        self.fd, self.path = nameless_file("premoe-hidden-", ".f32", directory)
        os.ftruncate(self.fd, 4 * rows * width)

    def __enter__(self) -> "_HiddenStore":
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            os.close(self.fd)

    def read(self, start: int, count: int) -> torch.Tensor:
        if self.path is None:
            return self.memory[start : start + count]
        out = torch.empty(count, self.width)  # (count, hidden)
        checkpoint.read_into(self.fd, out, 4 * start * self.width, f"scratch file {self.path}")
        return out

    def write(self, start: int, values: torch.Tensor) -> None:
        values = values.detach().float().cpu()
        if self.path is None:
            self.memory[start : start + values.shape[0]] = values
            return
        view, offset = memoryview(values.contiguous().numpy()).cast("B"), 4 * start * self.width
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done : done + _CHUNK], offset + done)
            except OSError as e:  # the disk filled up after the check (another process wrote to it)
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise DiskSpaceError(f"the scratch file of hidden states {self.path} filled its disk "
                                     f"({os.fstat(self.fd).st_size / 1e6:.1f} MB when complete); {_ELSEWHERE} on "
                                     "a disk with that much free") from e
