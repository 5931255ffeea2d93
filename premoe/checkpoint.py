"""Read safetensors checkpoints without loading them: shard index, headers, tensor sizes.

Compile, memory budgets and streaming all need to know what is in a
checkpoint before touching weights; a safetensors header is 8 bytes of
length plus JSON, so all of this is cheap even for a 700B model.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from premoe.errors import CheckpointError, MissingFileError

_CHUNK = 1 << 30  # bytes per pread call (Linux moves at most ~2 GiB per call)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}


class TensorInfo(NamedTuple):  # a NamedTuple, not a frozen dataclass: made per tensor (~90k), 4x cheaper
    """Where one tensor of a checkpoint lives and what it is, from its shard's header."""

    key: str
    shard: str  # file name inside the checkpoint directory
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the shard's data section

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype string; CheckpointError for one torch cannot hold."""
    import torch

    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "U16": "uint16", "U32": "uint32", "U64": "uint64",
             "C64": "complex64"}
    dtype = getattr(torch, names.get(name, ""), None)
    if dtype is None:
        raise CheckpointError(f"tensors of dtype {name} cannot be read into torch {torch.__version__}")
    return dtype


def read_into(fd: int, tensor, offset: int, name: str) -> None:
    """Fill contiguous ``tensor`` with the file's bytes at ``offset`` (pread in chunks); CheckpointError if short."""
    import torch

    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, any dtype
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done: done + _CHUNK]], offset + done)
        if got <= 0:
            raise CheckpointError(f"{name}: the file ends {len(view) - done} bytes early; it is truncated")
        done += got


def shard_files(path: Path, index: dict | None = None) -> list[str]:
    """The safetensors files of a checkpoint, in index order (plain file names inside ``path``).

    ``index``: the checkpoint's index from :func:`read_index`, when the caller has read it already.
    """
    index = index if index is not None else read_index(path)
    if index is not None:
        return sorted(set(index["weight_map"].values()))
    if (path / SINGLE).exists():
        return [SINGLE]
    if any(path.glob("pytorch_model*.bin")):
        raise MissingFileError(f"{path} holds PyTorch .bin weights, not safetensors, which premoe reads (by byte "
                               "range, without unpickling); convert it once: python -c \"from transformers import "
                               f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}-st')\" "
                               f"and pass {path}-st")
    raise MissingFileError(f"{path} has neither {INDEX} nor {SINGLE}; premoe reads safetensors checkpoints")


def read_index(path: Path) -> dict | None:
    """``model.safetensors.index.json`` of ``path``, checked, or None for a single-file checkpoint.

    Its weight_map must map tensor names to plain shard file names beside the
    index. DeepSeek-V3's maps ~90k tensors (0.1 s to parse): read it once and
    pass it to :func:`headers` and :func:`tensors`.
    """
    file = path / INDEX
    if not file.exists():
        return None
    try:
        index = json.loads(file.read_text())
        weight_map = index.get("weight_map")
    except (ValueError, AttributeError, RecursionError) as e:  # ValueError: bad JSON or encoding
        raise CheckpointError(f"{file} is not a JSON object with a weight_map; the checkpoint is corrupt") from e
    if not isinstance(weight_map, dict) or not (_STR.issuperset(map(type, weight_map))
                                                and _STR.issuperset(map(type, weight_map.values()))):
        raise CheckpointError(f"{file}: weight_map must map tensor names to shard file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", "..") or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{file} names shard {shard!r}; expected a .safetensors file name beside the index")
    return index


_STR = frozenset({str})  # JSON strings parse to the type str


def read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file and the offset where its data starts, fully checked.

    No reader may trust a corrupt or hostile shard, so beyond parsing this
    checks what the safetensors format promises: a header length within the
    file, a JSON object without duplicate keys, a known dtype, a shape of
    non-negative ints and byte offsets that match dtype × shape, and tensors
    that tile the data section exactly (in bounds, no overlap, no gap, no
    trailing bytes). Any violation is one :class:`CheckpointError` naming the
    shard and the tensor.

    >>> header, data_start = read_header(Path("testbed/model.safetensors"))
    """
    if not file.exists():
        raise MissingFileError(f"shard {file} is missing; the checkpoint is incomplete (re-download it)")
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file} is truncated: no safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            raise CheckpointError(f"{file} is not a safetensors file (header length {length})")
        if length > size - 8:
            raise CheckpointError(f"{file} is truncated: its header claims {length} bytes, the file has {size}")
        text = f.read(length)
    try:
        string = text.decode()  # strict UTF-8, as the format says (json.loads of bytes would take UTF-16, a BOM)
        parsed = json.loads(string, parse_constant=_not_json)
        if type(parsed) is dict and not _unique_keys(text, parsed):
            parsed = json.loads(string, object_pairs_hook=tuple)  # objects as (key, value) pairs: duplicates visible
        if "\\u" in string:  # an escaped half of a UTF-16 pair parses to a lone surrogate: no character, refused
            json.dumps(parsed, ensure_ascii=False).encode()  # by safetensors; UnicodeEncodeError names it here
    except UnicodeEncodeError as e:
        raise CheckpointError(f"{file} has a corrupt safetensors header (a \\u escape of an unpaired UTF-16 "
                              "surrogate)") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file} has a corrupt safetensors header ({getattr(e, 'msg', e)})") from e
    if type(parsed) not in (dict, tuple):
        raise CheckpointError(f"{file} has a corrupt safetensors header (a JSON {type(parsed).__name__}, "
                              "not an object)")
    header = parsed if type(parsed) is dict else _object(file, parsed)
    check_layout(file, header, size - 8 - length)
    return header, 8 + length


def _not_json(name: str):
    """json's ``parse_constant``: NaN and Infinity are Python's extension of JSON, which safetensors refuses."""
    raise ValueError(f"{name} is not JSON")


def _unique_keys(text: bytes, header: dict) -> bool:
    """Whether the JSON ``text`` that parsed to ``header`` holds no key twice, known from counts alone.

    Every member of a JSON object carries one colon outside strings, so
    ``text`` has at least as many colons as members, and at least as many
    members as the parsed dicts keep (a repeated key keeps one). When the
    members kept by the header and its entries (all objects) number exactly
    the colons, nothing was repeated and nothing deeper holds members. False
    sends the header to the pairs parse (colons inside strings, nested
    objects, a null or non-object entry), which names a duplicate or finds none.
    """
    values = header.values()
    return _DICT.issuperset(map(type, values)) and len(header) + sum(map(len, values)) == text.count(b":")


_DICT = frozenset({dict})


_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_INT = frozenset({int})  # shapes and offsets hold JSON integers only (bool is a subclass of int, not the type int)


def _object(file: Path, pairs: tuple) -> dict:
    """A JSON object parsed as (key, value) pairs, as a dict; a key given twice is a corrupt header.

    Parsing objects as pairs (a C-level hook) and building the dicts here
    costs a third less than a Python duplicate-checking hook per object,
    which is most of the header time at DeepSeek-V3's ~90k tensor entries.
    """
    found = dict(pairs)
    if len(found) != len(pairs):
        keys = [k for k, _ in pairs]
        raise CheckpointError(f"{file} has a corrupt safetensors header "
                              f"(duplicate key {next(k for k in keys if keys.count(k) > 1)!r})")
    return found


def _count(value) -> bool:
    return type(value) is int and value >= 0  # bool is a subclass of int, not the type int


def check_layout(file: Path, header: dict, data_bytes: int) -> None:
    """Every tensor entry well formed, and the entries tiling ``data_bytes`` exactly.

    ``header`` holds each entry as a dict, or as the (key, value) pairs of
    :func:`read_header`'s duplicate-naming parse, which become dicts in place;
    compile checks the headers it writes with it too. The common case — a well-formed
    entry — is checked in one expression; anything else goes to
    :func:`_check_entry`, which names what is wrong. Entries listed in data
    order (as premoe and most writers list them) tile by one comparison
    each; others are sorted by offset first.
    """
    chained = 0  # where the next entry starts while the entries so far follow each other in data order, else -1
    for key, info in header.items():
        if type(info) is tuple:  # a JSON object, as pairs (_object inlined: this loop runs per tensor)
            pairs, info = info, dict(info)
            if len(info) != len(pairs):
                _object(file, pairs)  # raises, naming the duplicate key
            header[key] = info
        if key == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise CheckpointError(f"{file}: __metadata__ must map strings to strings; the header is corrupt")
            continue
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            begin, end = offsets
            ok = (type(dtype) is str and dtype in DTYPE_BYTES and type(shape) is list and type(offsets) is list
                  and type(begin) is int and type(end) is int and 0 <= begin <= end
                  and (not shape or (_INT.issuperset(map(type, shape)) and min(shape) >= 0)))
        except (TypeError, KeyError, ValueError):  # not a dict, a field missing, offsets not a pair
            ok = False
        if not ok:
            _check_entry(f"{file}: tensor {key}", info)
        needed = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != needed:
            raise CheckpointError(f"{file}: tensor {key} spans {end - begin} bytes but {dtype} {shape} needs "
                                  f"{needed}; the header is corrupt")
        if not needed and _overflows(shape):
            raise CheckpointError(f"{file}: tensor {key} has shape {shape}, whose element count overflows 64 bits; "
                                  "the header is corrupt")
        if end > data_bytes:
            raise CheckpointError(f"{file} is truncated: tensor {key} ends at byte {end} of the data section, "
                                  f"which has {data_bytes}")
        chained = end if begin == chained else -1
    if chained == data_bytes:
        return
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], key) for key, info in header.items()
                   if key != "__metadata__")
    end = 0
    for begin, stop, key in spans:
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves a gap after byte {end}"
            raise CheckpointError(f"{file}: tensor {key} starts at data byte {begin} and {what}; the shard is corrupt")
        end = stop
    if end != data_bytes:
        raise CheckpointError(f"{file}: its tensors cover {end} of its {data_bytes} data bytes (trailing bytes); "
                              "the shard is corrupt")


def _overflows(shape: list) -> bool:
    """Whether safetensors refuses the shape of an empty tensor: a dimension of 64 bits or more, or the dimensions
    before its first 0 multiplying to that (it multiplies them in order, checking each product)."""
    return max(shape) >> 64 > 0 or math.prod(shape[: shape.index(0)]) >> 64 > 0


def _check_entry(where: str, info) -> None:
    """Raise the :class:`CheckpointError` that names what is wrong with a tensor entry :func:`check_layout` refused."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} has no dtype/shape/data_offsets entry; the header is corrupt")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{where} has dtype {dtype!r}; premoe reads {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(map(_count, shape)):
        raise CheckpointError(f"{where} has shape {shape!r}; expected a list of non-negative ints")
    raise CheckpointError(f"{where} has data_offsets {offsets!r}; expected [begin, end] with 0 ≤ begin ≤ end")


def headers(path: Path, index: dict | None = None) -> dict[str, tuple[dict, int]]:
    """Every shard's checked header and data start, by shard file name: read once, pass to :func:`tensors`.

    ``index``: the checkpoint's index from :func:`read_index`, when the caller has read it already.
    """
    with gc_paused():
        return {shard: read_header(path / shard) for shard in shard_files(path, index)}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building many small acyclic objects.

    A 163-shard DeepSeek-V3 header set is ~90k JSON objects; their allocation
    triggers full collections that walk every live object (torch and
    transformers hold millions): half the parse time, measured. Parsed
    headers hold no cycles, so nothing is left for the collector.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tensors(path: Path, read: dict[str, tuple[dict, int]] | None = None,
            index: dict | None = None) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, by key, from fully checked headers that agree with the index.

    ``read``: the shards' headers from :func:`headers` when the caller needs
    them too (a 163-shard checkpoint's headers hold ~90k entries: parse once);
    ``index``: its index from :func:`read_index`, likewise.
    """
    index = index if index is not None else read_index(path)
    read = read if read is not None else headers(path, index)
    tensor_shards(path, read, index)
    with gc_paused():
        return {key: TensorInfo(key, shard, info["dtype"], tuple(info["shape"]), tuple(info["data_offsets"]))
                for shard, (header, _) in read.items() for key, info in header.items() if key != "__metadata__"}


def tensor_shards(path: Path, read: dict[str, tuple[dict, int]], index: dict | None) -> dict[str, str]:
    """Tensor -> the shard holding it, checked: no tensor in two shards, every tensor the index lists where it says.

    ``read`` and ``index`` as :func:`headers` and :func:`read_index` give them.
    Built with dict operations that run in C, so compile can check a
    DeepSeek-V3 index (~90k tensors) without one Python step per tensor.
    """
    found: dict[str, str] = {}
    for shard, (header, _) in read.items():
        if not found.keys().isdisjoint(header):
            key = next(k for k in header if k in found)
            raise CheckpointError(f"tensor {key} is in both {found[key]} and {shard}; the checkpoint is corrupt")
        found.update(dict.fromkeys(header, shard))
        found.pop("__metadata__", None)
    if index is None or index["weight_map"] == found:
        return found
    weight_map = index["weight_map"]
    missing = weight_map.keys() - found.keys()
    if missing:
        raise CheckpointError(f"{path / INDEX} lists {len(missing)} tensors no shard holds, e.g. {sorted(missing)[0]}")
    moved = sorted(k for k, shard in found.items() if weight_map.get(k, shard) != shard)
    if moved:
        raise CheckpointError(f"{path / INDEX} puts {moved[0]} in {weight_map[moved[0]]}, but "
                              f"{found[moved[0]]} holds it; the index does not match the shards")
    return found


def encode_header(entries: dict[str, dict], metadata: dict | None = None) -> bytes:
    """A safetensors header as compile writes it: compact JSON, space-padded so the data starts 8-byte aligned.

    One encoder for the writer and for size estimates, so a budget counts the
    header bytes that are really written (without the 8-byte length prefix).

    >>> len(encode_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})) % 8
    0
    """
    header = {"__metadata__": metadata, **entries} if metadata else dict(entries)
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def entry_bytes(key: str, info: dict, data_bytes: int) -> int:
    """Bytes one tensor's entry (and its comma) can take in the header of a pruned copy of its shard, at most.

    A pruned shard keeps a subset of the entries, renumbers experts to smaller
    indices, shrinks shapes and holds at most ``data_bytes`` of data, so every
    offset in it has at most the digits of ``data_bytes``: the entry encoded
    with both offsets set to ``data_bytes`` is never shorter than the one
    compile writes (:func:`encode_header`).
    """
    entry = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [data_bytes, data_bytes]}
    return len(json.dumps(key)) + 1 + len(json.dumps(entry, separators=(",", ":"))) + 1


def _fixed_header_bytes(header: dict) -> int:
    """A shard's header bytes that do not depend on its tensors: length prefix, braces, metadata, padding."""
    metadata = header.get("__metadata__")
    return 8 + 2 + 7 + (len(encode_header({}, metadata)) + 1 if metadata else 0)


@dataclass(frozen=True)
class SizeBreakdown:
    total_bytes: int  # everything on disk, multi-token-prediction layers included
    base_bytes: int  # what is not a routed expert (attention, embeddings, shared experts, routers), MTP layers excluded
    expert_bytes: dict[int, int]  # decoder layer -> bytes of ONE routed expert in that layer (incl. its router row)
    num_experts: int
    mtp_bytes: int = 0  # the MTP layers (DeepSeek-V3's model.layers.61), which compile drops by default
    header_bytes: int | None = None  # shard headers compile writes, less per-expert entries, at most; None: not recorded
    expert_header_bytes: dict[int, int] = field(default_factory=dict)  # layer -> ONE expert's header entries, at most

    def bytes_with(self, kept_per_layer: dict[int, int]) -> int:
        """Tensor bytes of a compiled checkpoint keeping these counts, with compile's default ``--mtp drop``."""
        return self.base_bytes + sum(self.expert_bytes[l] * n for l, n in kept_per_layer.items())

    def file_bytes_with(self, kept_per_layer: dict[int, int]) -> int:
        """The .safetensors files' bytes for these counts: tensors exactly, headers at most (within a few bytes
        per entry); what a ``--budget-gb`` promise measures."""
        headers = (self.header_bytes or 0) + sum(self.expert_header_bytes.get(l, 0) * n
                                                 for l, n in kept_per_layer.items())
        return self.bytes_with(kept_per_layer) + headers


def size_breakdown(path: Path, adapter, num_experts: int) -> SizeBreakdown:
    """How the checkpoint's bytes split between routed experts, MTP layers, the rest, and shard headers."""
    from premoe.modeling import read_config

    config = read_config(path)
    per_layer: dict[int, int] = {}
    expert_entries: dict[tuple[int, int], int] = {}  # (layer, expert) -> its per-expert header entries' bytes
    total = mtp = header = 0
    read = headers(path)
    tensors(path, read)  # the same checks as every reader: no key in two shards, the index agrees
    for shard, (entries, start) in read.items():
        data_bytes = (path / shard).stat().st_size - start
        header += _fixed_header_bytes(entries)
        for key, info in entries.items():
            if key == "__metadata__":
                continue
            nbytes, entry = info["data_offsets"][1] - info["data_offsets"][0], entry_bytes(key, info, data_bytes)
            total += nbytes
            if adapter.mtp_layer(key, config) is not None:  # dropped by compile's default --mtp drop
                mtp += nbytes
                continue
            kind = adapter.classify_key(key)
            if kind is not None:
                per_layer[kind[1]] = per_layer.get(kind[1], 0) + nbytes
            if kind is not None and kind[0] == "expert":
                expert_entries[kind[1], kind[2]] = expert_entries.get((kind[1], kind[2]), 0) + entry
            else:
                header += entry  # kept whatever the plan (router rows and fused tensors keep their one entry)
    expert_bytes = {l: b // num_experts for l, b in per_layer.items()}
    expert_header = {l: max((b for (layer, _), b in expert_entries.items() if layer == l), default=0) for l in per_layer}
    return SizeBreakdown(total, total - mtp - sum(per_layer.values()), expert_bytes, num_experts, mtp, header,
                         expert_header)
