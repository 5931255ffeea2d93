"""Shard headers: read_header accepts exactly what safetensors can load, and refuses the rest with one clean error.

Property-based: random and mutated headers (hypothesis) must give either a
correct result — the same tensors safetensors itself reads — or a
CheckpointError naming the shard; never another exception.
"""
import functools
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from premoe.checkpoint import DTYPE_BYTES, INDEX, read_header, read_index, shard_files, tensors
from premoe.errors import CheckpointError, MissingFileError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="premoe-test-checkpoint-"))


def valid_file(path: Path) -> Path:
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "c": torch.zeros(0, 5), "d": torch.tensor([True, False])}, str(path), metadata={"format": "pt"})
    return path


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def assemble(header, data: bytes, length: int | None = None) -> bytes:
    text = (header if isinstance(header, bytes) else json.dumps(header).encode())
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def agrees_with_safetensors(file: Path) -> None:
    """read_header either raises CheckpointError, on a file safetensors refuses too, or returns what safetensors reads.

    (Dtypes safetensors knows but premoe does not, e.g. 4-bit F4, are the one
    thing premoe may refuse alone.)
    """
    try:
        header, start = read_header(file)
    except CheckpointError as e:
        assert str(file) in str(e) and "\n" not in str(e)
        if "has dtype" not in str(e):
            with pytest.raises(Exception):
                with safe_open(file, "pt") as f:
                    [f.get_slice(k) for k in f.keys()]
        return
    with safe_open(file, "pt") as f:  # accepted: safetensors must load every tensor the same way
        assert set(f.keys()) == set(header) - {"__metadata__"}
        for key in f.keys():
            assert list(f.get_slice(key).get_shape()) == header[key]["shape"]
    assert start == 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]


def test_a_valid_file_reads_back(tmp_path):
    file = valid_file(tmp_path / "x.safetensors")
    header, start = read_header(file)
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["c"]["shape"] == [0, 5] and header["__metadata__"] == {"format": "pt"}
    assert start == 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h["a"].update(dtype="F31"), "tensor a has dtype 'F31'"),
    (lambda h: h["a"].update(shape=[2, -3]), "tensor a has shape"),
    (lambda h: h["a"].update(shape=[2, True]), "tensor a has shape"),
    (lambda h: h["a"].update(shape=[3, 3]), "tensor a spans 24 bytes but F32 \\[3, 3\\] needs 36"),
    (lambda h: h["a"].update(data_offsets=[24, 0]), "tensor a has data_offsets"),
    (lambda h: h["a"].pop("data_offsets"), "tensor a has data_offsets None"),
    (lambda h: h.update(a=[1, 2]), "tensor a has no dtype"),
    (lambda h: h.update(e={"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}), "overlaps"),
    (lambda h: h.update(__metadata__={"format": 1}), "__metadata__ must map strings"),
])
def test_each_broken_field_is_named(tmp_path, mutate, message):
    header, data = split(valid_file(tmp_path / "x.safetensors"))
    mutate(header)
    (tmp_path / "y.safetensors").write_bytes(assemble(header, data))
    with pytest.raises(CheckpointError, match=message):
        read_header(tmp_path / "y.safetensors")


def test_gaps_trailing_bytes_truncation_and_lengths(tmp_path):
    file = valid_file(tmp_path / "x.safetensors")
    header, data = split(file)
    bad = tmp_path / "y.safetensors"
    bad.write_bytes(assemble(header, data + b"\0" * 8))
    with pytest.raises(CheckpointError, match="cover 34 of its 42 data bytes \\(trailing bytes\\)"):
        read_header(bad)
    bad.write_bytes(assemble(header, data[:-3]))
    with pytest.raises(CheckpointError, match="is truncated: tensor"):
        read_header(bad)
    shifted = {k: ({**v, "data_offsets": [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]} if k != "__metadata__"
                   else v) for k, v in header.items()}
    bad.write_bytes(assemble(shifted, b"\0" * 8 + data))
    with pytest.raises(CheckpointError, match="leaves a gap after byte 0"):
        read_header(bad)
    bad.write_bytes(assemble(header, data, length=10**6))
    with pytest.raises(CheckpointError, match="truncated: its header claims 1000000 bytes"):
        read_header(bad)
    bad.write_bytes(assemble(header, data, length=2**40))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(bad)
    bad.write_bytes(assemble(b'{"a": 1, "a": 2}', b""))
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        read_header(bad)
    bad.write_bytes(assemble(b"[1, 2]", b""))
    with pytest.raises(CheckpointError, match="a JSON list, not an object"):
        read_header(bad)
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="no safetensors header"):
        read_header(bad)
    with pytest.raises(MissingFileError):
        read_header(tmp_path / "absent.safetensors")


def test_the_index_must_name_plain_shards_that_hold_its_tensors(tmp_path):
    valid_file(tmp_path / "model-1.safetensors")
    for weight_map, message in [({"a": "../model-1.safetensors"}, "expected a .safetensors file name"),
                                ({"a": "/etc/passwd"}, "expected a .safetensors file name"),
                                ({"a": 3}, "weight_map must map"),
                                ({"a": "model-1.bin"}, "names shard 'model-1.bin'; expected a .safetensors file name"),
                                ({"a": ".."}, "names shard '..'; expected"), ({"a": ""}, "names shard ''; expected"),
                                ({"a": "model-1.safetensors", "zz": "model-1.safetensors"}, "lists 1 tensors no shard"),
                                ]:
        (tmp_path / INDEX).write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            tensors(tmp_path)
    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        shard_files(tmp_path)
    valid_file(tmp_path / "model-2.safetensors")  # the same tensors in two shards
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    with pytest.raises(CheckpointError, match="in both model-1.safetensors and model-2.safetensors"):
        tensors(tmp_path)


# --------------------------------------------------------------------------- property-based

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
FIELD = st.sampled_from(["dtype", "shape", "data_offsets"])
SMALL = st.integers(-3, 40)
VALUES = {"dtype": st.sampled_from([*DTYPE_BYTES, "F31", "", "f32"]) | JSON,
          "shape": st.lists(SMALL, max_size=3) | JSON,
          "data_offsets": st.lists(SMALL, min_size=2, max_size=2) | st.lists(SMALL, max_size=3) | JSON}


@st.composite
def mutated_header(draw):
    header, data = split(valid_file(WORK / "base.safetensors"))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(sorted(header) + ["new"]))
        action = draw(st.sampled_from(["field", "drop_field", "replace", "delete"]))
        if action == "delete" and key in header:
            del header[key]
        elif action == "replace":
            header[key] = draw(JSON)
        elif isinstance(header.get(key), dict) and key != "__metadata__":
            name = draw(FIELD)
            if action == "drop_field":
                header[key].pop(name, None)
            else:
                header[key][name] = draw(VALUES[name])
        else:
            header[key] = {name: draw(VALUES[name]) for name in ("dtype", "shape", "data_offsets")}
    cut = draw(st.integers(0, len(data)))
    extra = draw(st.binary(max_size=16))
    return header, data[:cut] + extra if draw(st.booleans()) else data


@SETTINGS
@given(mutated_header())
def test_mutated_headers_are_read_right_or_refused_cleanly(case):
    header, data = case
    file = WORK / "mutated.safetensors"
    file.write_bytes(assemble(header, data))
    agrees_with_safetensors(file)


@SETTINGS
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1) | st.none())
def test_random_bytes_are_refused_cleanly(body, length):
    file = WORK / "random.safetensors"
    file.write_bytes(assemble(body, b"", length))
    agrees_with_safetensors(file)


@SETTINGS
@given(st.integers(0, 400), st.integers(0, 255), st.integers(0, 400))
def test_flipped_and_truncated_files_are_refused_cleanly(position, value, cut):
    raw = bytearray(valid_file(WORK / "base2.safetensors").read_bytes())
    raw[position % len(raw)] = value
    file = WORK / "flipped.safetensors"
    file.write_bytes(bytes(raw[: max(cut, 0) or None]))
    agrees_with_safetensors(file)


def _object_text(pairs: list, ascii_only: bool) -> str:
    """A JSON object written from (key, value) pairs, so a key may repeat; values already JSON text."""
    return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{v}" for k, v in pairs) + "}"


@SETTINGS
@given(st.sampled_from(["top", "entry", "metadata"]), st.text(max_size=6), st.text(max_size=6), st.booleans(),
       st.booleans())
def test_a_repeated_key_anywhere_is_named(where, name, value, ascii_only, repeat):
    """Keys and values holding colons, quotes, escapes: a key given twice in any object is refused, naming it;
    the same header without the repeat reads back."""
    header, data = split(valid_file(WORK / "dup.safetensors"))
    dump = functools.partial(json.dumps, ensure_ascii=ascii_only)
    metadata = [("format", dump("pt")), (name, dump(value))]
    entries = {k: [(f, dump(v)) for f, v in e.items()] for k, e in header.items() if k != "__metadata__"}
    top = [(k, None) for k in entries]
    if repeat and where == "metadata":
        metadata.append((name, dump(value + "x")))
    elif repeat and where == "entry":
        entries["a"].append(("dtype", dump("F32")))
    elif repeat:
        top.append(("b", None))
    text = _object_text([("__metadata__", _object_text(metadata, ascii_only))]
                        + [(k, _object_text(entries[k], ascii_only)) for k, _ in top], ascii_only)
    file = WORK / "dup2.safetensors"
    file.write_bytes(assemble(text.encode(), data))
    if repeat or name == "format":  # "format" is a metadata key already
        with pytest.raises(CheckpointError, match="duplicate key"):
            read_header(file)
    else:
        assert read_header(file)[0]["__metadata__"] == {"format": "pt", name: value}


def test_an_index_that_puts_a_tensor_in_the_wrong_shard_is_refused(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-1.safetensors"))
    save_file({"b": torch.ones(3)}, str(tmp_path / "model-2.safetensors"))
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    assert {k: i.shard for k, i in tensors(tmp_path).items()} == {"a": "model-1.safetensors", "b": "model-2.safetensors"}
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "model-2.safetensors", "b": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="puts a in model-2.safetensors, but model-1.safetensors holds it"):
        tensors(tmp_path)


def test_header_lengths_at_the_edges(tmp_path):
    """(mutmut survivors) the length is unsigned: 2**63 + 5 is no small negative number; a header that would end
    one byte past the file is truncated, one that ends exactly at the file's end (no tensors) is read."""
    file = valid_file(tmp_path / "x.safetensors")
    header, data = split(file)
    bad = tmp_path / "y.safetensors"
    bad.write_bytes(assemble(header, data, length=2**63 + 5))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(bad)
    text = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(text) + len(data) + 1) + text + data)
    with pytest.raises(CheckpointError, match="is truncated: its header claims"):
        read_header(bad)
    empty = b'{"__metadata__": {"format": "pt"}}'
    bad.write_bytes(struct.pack("<Q", len(empty)) + empty)
    assert read_header(bad) == ({"__metadata__": {"format": "pt"}}, 8 + len(empty))


# --------------------------------------------------------------------------- readers and writers' arithmetic
# (each of these was reached only by integration tests: mutmut found its formulas untested here)


def test_every_dtype_premoe_sizes_is_a_torch_dtype_of_that_size():
    from premoe.checkpoint import torch_dtype

    for name, size in DTYPE_BYTES.items():
        assert torch.empty(0, dtype=torch_dtype(name)).element_size() == size, name
    assert torch_dtype("BF16") is torch.bfloat16 and torch_dtype("F8_E4M3") is torch.float8_e4m3fn
    with pytest.raises(CheckpointError, match="tensors of dtype F4 cannot be read into torch"):
        torch_dtype("F4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_read_into_fills_the_tensor_with_the_bytes_at_its_offset(tmp_path, dtype, monkeypatch):
    import os

    import premoe.checkpoint as checkpoint

    values = torch.arange(24).reshape(4, 6).to(dtype)
    raw = values.reshape(-1).view(torch.uint8).numpy().tobytes()
    file = tmp_path / "data"
    file.write_bytes(b"x" * 13 + raw + b"tail")
    monkeypatch.setattr(checkpoint, "_CHUNK", 5)  # several preadv calls, the last one short
    target = torch.empty(4, 6, dtype=dtype)
    fd = os.open(file, os.O_RDONLY)
    try:
        checkpoint.read_into(fd, target, 13, "data")
        assert torch.equal(target, values)
        with pytest.raises(CheckpointError, match=f"data: the file ends {len(raw) - 20} bytes early"):
            checkpoint.read_into(fd, torch.empty(4, 6, dtype=dtype), 13 + len(raw) + 4 - 20, "data")
    finally:
        os.close(fd)


ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(sorted(DTYPE_BYTES)),
                               "shape": st.lists(st.integers(0, 10**6), max_size=3)})


@SETTINGS
@given(entries=st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k != "__metadata__"), ENTRY,
                               max_size=6),
       metadata=st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
       data_bytes=st.integers(0, 10**12), fractions=st.lists(st.floats(0, 1), min_size=12, max_size=12))
def test_encoded_headers_parse_back_aligned_and_are_bounded_by_the_size_estimate(entries, metadata, data_bytes,
                                                                                 fractions):
    """encode_header is what compile writes; entry_bytes + _fixed_header_bytes must bound it (budget promises)."""
    from premoe.checkpoint import _fixed_header_bytes, encode_header, entry_bytes

    placed = {}
    for i, (key, info) in enumerate(entries.items()):
        begin, end = sorted(int(f * data_bytes) for f in fractions[2 * i : 2 * i + 2])
        placed[key] = {**info, "data_offsets": [begin, end]}
    text = encode_header(placed, metadata)
    source = {"__metadata__": metadata, **placed} if metadata else placed  # metadata first, as safetensors writes it
    compact = json.dumps(source, separators=(",", ":")).encode()
    assert text == compact + b" " * (-len(compact) % 8) and len(text) % 8 == 0
    assert list(json.loads(text)) == list(source)
    bound = _fixed_header_bytes(source) + sum(entry_bytes(k, v, data_bytes) for k, v in placed.items())
    assert 8 + len(text) <= bound
    widest = {k: {**v, "data_offsets": [data_bytes, data_bytes]} for k, v in placed.items()}
    assert 0 <= bound - (8 + len(encode_header(widest, metadata))) <= 17  # braces, commas, two paddings at most


def test_the_size_estimate_of_a_known_entry_is_exact():
    from premoe.checkpoint import _fixed_header_bytes, encode_header, entry_bytes

    info = {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}
    assert entry_bytes("w", info, 12) == len('"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[12,12]},')
    assert entry_bytes("w", info, 123456) == entry_bytes("w", info, 12) + 8  # offsets take the data size's digits
    assert _fixed_header_bytes({"w": info}) == 8 + 2 + 7
    assert _fixed_header_bytes({"__metadata__": {"format": "pt"}, "w": info}) == (
        8 + 2 + 7 + len(encode_header({}, {"format": "pt"})) + 1)


def test_size_breakdown_arithmetic():
    from premoe.checkpoint import SizeBreakdown

    sizes = SizeBreakdown(total_bytes=1000, base_bytes=300, expert_bytes={1: 10, 2: 20}, num_experts=8, mtp_bytes=60,
                          header_bytes=50, expert_header_bytes={1: 3, 2: 4})
    assert sizes.bytes_with({1: 4, 2: 2}) == 300 + 40 + 40
    assert sizes.file_bytes_with({1: 4, 2: 2}) == 300 + 40 + 40 + 50 + 12 + 8
    unrecorded = SizeBreakdown(1000, 300, {1: 10}, 8)
    assert unrecorded.file_bytes_with({1: 5}) == unrecorded.bytes_with({1: 5}) == 350


def test_gc_paused_restores_the_collector_as_it_was():
    import gc

    from premoe.checkpoint import gc_paused

    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        with gc_paused():
            assert not gc.isenabled()
            1 / 0
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the caller had paused it: left paused
    finally:
        gc.enable()


def test_headers_and_tensors_describe_every_tensor_where_it_lies(tmp_path):
    from premoe.checkpoint import TensorInfo, headers, read_index, tensor_shards

    save_file({"x": torch.zeros(2, 3), "y": torch.ones(5, dtype=torch.bfloat16)}, str(tmp_path / "one.safetensors"))
    save_file({"z": torch.zeros(7, dtype=torch.int64)}, str(tmp_path / "two.safetensors"), metadata={"format": "pt"})
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {"x": "one.safetensors", "y":
                                              "one.safetensors", "z": "two.safetensors"}}))
    index = read_index(tmp_path)
    read = headers(tmp_path, index)
    assert sorted(read) == ["one.safetensors", "two.safetensors"]
    assert read["two.safetensors"][0]["__metadata__"] == {"format": "pt"}
    assert tensor_shards(tmp_path, read, index) == {"x": "one.safetensors", "y": "one.safetensors",
                                                    "z": "two.safetensors"}
    assert tensor_shards(tmp_path, read, None) == tensor_shards(tmp_path, read, index)
    found = tensors(tmp_path)
    assert found == tensors(tmp_path, read, index)
    assert found["z"] == TensorInfo("z", "two.safetensors", "I64", (7,), (0, 56)) and found["z"].nbytes == 56
    assert {k: (v.dtype, v.shape, v.nbytes) for k, v in found.items() if k != "z"} == {
        "x": ("F32", (2, 3), 24), "y": ("BF16", (5,), 10)}
    with safe_open(str(tmp_path / "one.safetensors"), "pt") as f:  # the offsets are the file's own
        start = read["one.safetensors"][1]
        raw = (tmp_path / "one.safetensors").read_bytes()
        begin, end = found["y"].offsets
        assert torch.equal(torch.frombuffer(bytearray(raw[start + begin : start + end]), dtype=torch.bfloat16),
                           f.get_tensor("y"))
    assert read_index(tmp_path / "nowhere") is None
    assert shard_files(tmp_path, index) == ["one.safetensors", "two.safetensors"]
    (tmp_path / INDEX).unlink()
    with pytest.raises(MissingFileError, match="has neither model.safetensors.index.json nor model.safetensors"):
        shard_files(tmp_path)
    (tmp_path / "two.safetensors").rename(tmp_path / "model.safetensors")
    assert shard_files(tmp_path) == ["model.safetensors"]


# --------------------------------------------------------------------------- exact refusals, unit by unit
# (mutmut: these error paths and edge cases were reached only by the integration tests, or their messages unpinned)

SHARD = Path("s.safetensors")  # check_layout only puts the name in its messages


def write_shard(file: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A hand-made safetensors file: 8-byte little-endian header length, the header (a dict or raw bytes), data."""
    file.write_bytes(assemble(header, data, length))
    return file


def u8(begin: int, end: int, shape: list | None = None) -> dict:
    return {"dtype": "U8", "shape": [end - begin] if shape is None else shape, "data_offsets": [begin, end]}


def test_shard_files_takes_the_index_it_is_given_over_the_disk(tmp_path):
    index = {"weight_map": {"b": "s2.safetensors", "a": "s1.safetensors", "c": "s2.safetensors"}}
    assert shard_files(tmp_path, index) == ["s1.safetensors", "s2.safetensors"]  # nothing on disk: sorted, once each
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "other.safetensors"}}))
    assert shard_files(tmp_path, index) == ["s1.safetensors", "s2.safetensors"]
    assert shard_files(tmp_path) == ["other.safetensors"]
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert shard_files(tmp_path) == ["other.safetensors"]  # an index wins over a model.safetensors beside it
    (tmp_path / INDEX).unlink()
    assert shard_files(tmp_path) == ["model.safetensors"]


def test_a_pytorch_bin_checkpoint_is_refused_with_the_command_that_converts_it(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")  # not transformers' .bin name: no conversion advice
    with pytest.raises(MissingFileError) as caught:
        shard_files(tmp_path)
    assert str(caught.value) == (f"{tmp_path} has neither model.safetensors.index.json nor model.safetensors; "
                                 "premoe reads safetensors checkpoints")
    (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(b"")
    with pytest.raises(MissingFileError) as caught:
        shard_files(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path} holds PyTorch .bin weights, not safetensors, which premoe reads (by byte range, without "
        "unpickling); convert it once: python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{tmp_path}').save_pretrained('{tmp_path}-st')\" and pass {tmp_path}-st")
    (tmp_path / "model.safetensors").write_bytes(b"")  # safetensors beside the .bin: read, no refusal
    assert shard_files(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("text", ["[1, 2]", '"weight_map"', "3", "null", "{not json", '{"weight_map": {"a": "x"',
                                  "[" * 100_000 + "]" * 100_000])
def test_an_index_that_is_not_a_json_object_is_corrupt(tmp_path, text):
    (tmp_path / INDEX).write_text(text)
    with pytest.raises(CheckpointError) as caught:
        read_index(tmp_path)
    assert str(caught.value) == f"{tmp_path / INDEX} is not a JSON object with a weight_map; the checkpoint is corrupt"


def test_an_index_that_is_not_utf8_is_corrupt(tmp_path):
    (tmp_path / INDEX).write_bytes(b'{"weight_map": {"a\xff": "model.safetensors"}}')
    with pytest.raises(CheckpointError, match="is not a JSON object with a weight_map; the checkpoint is corrupt"):
        read_index(tmp_path)


@pytest.mark.parametrize("weight_map", [None, [], ["a", "model.safetensors"], "model.safetensors",
                                        {"a": None}, {"a": ["model.safetensors"]}, {"a": {"f": "model.safetensors"}},
                                        {"a": "model.safetensors", "b": 1.5}])
def test_a_weight_map_must_map_names_to_file_names(tmp_path, weight_map):
    (tmp_path / INDEX).write_text(json.dumps({} if weight_map is None else {"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as caught:
        read_index(tmp_path)
    assert str(caught.value) == f"{tmp_path / INDEX}: weight_map must map tensor names to shard file names"


@pytest.mark.parametrize("shard", ["sub/model.safetensors", "model.safetensors/", "./model.safetensors", ".",
                                   "a/../model.safetensors", "model.SAFETENSORS", "model.safetensors.bak"])
def test_index_shards_must_be_plain_safetensors_names_beside_it(tmp_path, shard):
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "model.safetensors", "b": shard}}))
    with pytest.raises(CheckpointError) as caught:
        read_index(tmp_path)
    assert str(caught.value) == (f"{tmp_path / INDEX} names shard {shard!r}; expected a .safetensors file name "
                                 "beside the index")


def test_read_index_returns_the_index_as_written(tmp_path):
    written = {"metadata": {"total_size": 12}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors",
                                                              "": "m-1.safetensors", "c:d": "m-1.safetensors"}}
    (tmp_path / INDEX).write_text(json.dumps(written))
    assert read_index(tmp_path) == written
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {}}))
    assert read_index(tmp_path) == {"weight_map": {}} and shard_files(tmp_path) == []


def test_header_length_limit_and_short_files_are_named(tmp_path):
    from premoe.checkpoint import _MAX_HEADER

    file = tmp_path / "x.safetensors"
    for length, message in [(_MAX_HEADER,
                             f"{file} is truncated: its header claims {_MAX_HEADER} bytes, the file has 10"),
                            (_MAX_HEADER + 1, f"{file} is not a safetensors file (header length {_MAX_HEADER + 1})"),
                            (3, f"{file} is truncated: its header claims 3 bytes, the file has 10"),
                            (0, f"{file} has a corrupt safetensors header (Expecting value)")]:
        write_shard(file, b"{}", length=length)
        with pytest.raises(CheckpointError) as caught:
            read_header(file)
        assert str(caught.value) == message
    for raw in (b"", b"\x02\0\0\0\0\0\0"):  # shorter than the length field
        file.write_bytes(raw)
        with pytest.raises(CheckpointError) as caught:
            read_header(file)
        assert str(caught.value) == f"{file} is truncated: no safetensors header"
    with pytest.raises(MissingFileError) as caught:
        read_header(tmp_path / "gone.safetensors")
    assert str(caught.value) == (f"shard {tmp_path / 'gone.safetensors'} is missing; the checkpoint is incomplete "
                                 "(re-download it)")


@pytest.mark.parametrize("text, reason", [
    (b'{"a": ', "Expecting value"),
    (b'{"a" 1}', "Expecting ':' delimiter"),
    (b'{"a": 1} x', "Extra data"),
    (b'{"a\xff": {}}', "'utf-8' codec can't decode byte 0xff in position 3: invalid start byte"),
    (b"[" * 100_000 + b"]" * 100_000,
     "maximum recursion depth exceeded while decoding a JSON array from a unicode string"),
])
def test_an_unparsable_header_names_the_parser_s_reason(tmp_path, text, reason):
    file = write_shard(tmp_path / "x.safetensors", text)
    with pytest.raises(CheckpointError) as caught:
        read_header(file)
    assert str(caught.value) == f"{file} has a corrupt safetensors header ({reason})"


@pytest.mark.parametrize("text, kind", [(b"[]", "list"), (b'"{}"', "str"), (b"12", "int"), (b"1.5", "float"),
                                        (b"true", "bool")])
def test_a_header_that_is_not_an_object_is_named(tmp_path, text, kind):
    file = write_shard(tmp_path / "x.safetensors", text)
    with pytest.raises(CheckpointError) as caught:
        read_header(file)
    assert str(caught.value) == f"{file} has a corrupt safetensors header (a JSON {kind}, not an object)"


@pytest.mark.parametrize("text, key", [
    (b'{"x": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, "a": 1, "a": 2}', "a"),  # not the first key
    (b'{"a": {"dtype": "U8", "dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}', "dtype"),  # inside an entry
    (b'{"__metadata__": {"f": "x", "g": "y", "g": "z"}}', "g"),
    (b'{"b": {}, "a": {}, "b": {}, "a": {}}', "b"),  # the first key that repeats, in the file's order
])
def test_a_duplicate_key_is_named_with_the_shard(tmp_path, text, key):
    file = write_shard(tmp_path / "x.safetensors", text)
    with pytest.raises(CheckpointError) as caught:
        read_header(file)
    assert str(caught.value) == f"{file} has a corrupt safetensors header (duplicate key {key!r})"


def test_headers_that_need_the_pairs_parse_read_back_whole(tmp_path):
    """Colons inside names, a null __metadata__: the header goes through the (key, value) pairs parse, which must
    give the same dicts as the plain one."""
    header = {"__metadata__": {"a:b": "c:d", "format": "pt"}, "w:1": u8(0, 2), "w\"2": u8(2, 5, [3, 1])}
    file = write_shard(tmp_path / "x.safetensors", header, b"\0" * 5)
    text_length = len(json.dumps(header))
    assert read_header(file) == (header, 8 + text_length)
    header["__metadata__"] = None
    file = write_shard(tmp_path / "x.safetensors", header, b"\0" * 5)
    assert read_header(file) == (header, 8 + len(json.dumps(header)))
    plain = {"w": u8(0, 5)}  # members == colons: the plain parse
    assert read_header(write_shard(tmp_path / "y.safetensors", plain, b"\0" * 5))[0] == plain


@pytest.mark.parametrize("metadata", [{"format": 1}, {"format": None}, {"format": {"x": "y"}}, ["format", "pt"],
                                      "pt", 0])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    file = write_shard(tmp_path / "x.safetensors", {"__metadata__": metadata, "w": u8(0, 1)}, b"\0")
    with pytest.raises(CheckpointError) as caught:
        read_header(file)
    assert str(caught.value) == f"{file}: __metadata__ must map strings to strings; the header is corrupt"


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt", "": ""}])
def test_empty_or_null_metadata_is_accepted(tmp_path, metadata):
    header = {"__metadata__": metadata, "w": u8(0, 1)}
    assert read_header(write_shard(tmp_path / "x.safetensors", header, b"\0"))[0] == header


DTYPES = "F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2, F8_E8M0, U16, U32, U64, C64"


@pytest.mark.parametrize("entry, problem", [
    ({"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}, f"has dtype 'F31'; premoe reads {DTYPES}"),
    ({"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}, f"has dtype 'f32'; premoe reads {DTYPES}"),
    ({"dtype": 4, "shape": [1], "data_offsets": [0, 4]}, f"has dtype 4; premoe reads {DTYPES}"),
    ({"shape": [1], "data_offsets": [0, 4]}, f"has dtype None; premoe reads {DTYPES}"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "has shape [-1]; expected a list of non-negative ints"),
    ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "has shape [1.0]; expected a list of non-negative ints"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
     "has shape [True]; expected a list of non-negative ints"),
    ({"dtype": "F32", "shape": [2, "2"], "data_offsets": [0, 4]},
     "has shape [2, '2']; expected a list of non-negative ints"),
    ({"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}, "has shape 1; expected a list of non-negative ints"),
    ({"dtype": "F32", "data_offsets": [0, 4]}, "has shape None; expected a list of non-negative ints"),
    ({"dtype": "F32", "shape": [0, 5], "data_offsets": [5, 0]},  # a 0 in the shape is fine: the offsets are named
     "has data_offsets [5, 0]; expected [begin, end] with 0 ≤ begin ≤ end"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
     "has data_offsets [-4, 0]; expected [begin, end] with 0 ≤ begin ≤ end"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]},
     "has data_offsets [0, 4.0]; expected [begin, end] with 0 ≤ begin ≤ end"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [False, 4]},
     "has data_offsets [False, 4]; expected [begin, end] with 0 ≤ begin ≤ end"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]},
     "has data_offsets [0, 4, 4]; expected [begin, end] with 0 ≤ begin ≤ end"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4]},
     "has data_offsets [4]; expected [begin, end] with 0 ≤ begin ≤ end"),
    ({"dtype": "F32", "shape": [1], "data_offsets": "04"},
     "has data_offsets '04'; expected [begin, end] with 0 ≤ begin ≤ end"),
    ({"dtype": "F32", "shape": [1], "data_offsets": {"0": 0, "4": 4}},
     "has data_offsets {'0': 0, '4': 4}; expected [begin, end] with 0 ≤ begin ≤ end"),
    ({"dtype": "F32", "shape": [1]}, "has data_offsets None; expected [begin, end] with 0 ≤ begin ≤ end"),
    ("F32", "has no dtype/shape/data_offsets entry; the header is corrupt"),
    (None, "has no dtype/shape/data_offsets entry; the header is corrupt"),
    (4, "has no dtype/shape/data_offsets entry; the header is corrupt"),
])
def test_each_malformed_entry_is_named_exactly(entry, problem):
    from premoe.checkpoint import check_layout

    with pytest.raises(CheckpointError) as caught:
        check_layout(SHARD, {"w": entry}, 4)
    assert str(caught.value) == f"s.safetensors: tensor w {problem}"


@pytest.mark.parametrize("header, data_bytes, message", [
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [4, 8]}}, 8,
     "s.safetensors: tensor w spans 4 bytes but F32 [3] needs 12; the header is corrupt"),
    ({"w": {"dtype": "BF16", "shape": [2, 0, 3], "data_offsets": [0, 2]}}, 2,
     "s.safetensors: tensor w spans 2 bytes but BF16 [2, 0, 3] needs 0; the header is corrupt"),
    ({"w": {"dtype": "C64", "shape": [], "data_offsets": [0, 4]}}, 4,
     "s.safetensors: tensor w spans 4 bytes but C64 [] needs 8; the header is corrupt"),
    ({"v": u8(0, 2), "w": u8(2, 8)}, 6, "s.safetensors is truncated: tensor w ends at byte 8 of the data section, "
                                        "which has 6"),
    ({"w": u8(1, 3)}, 3, "s.safetensors: tensor w starts at data byte 1 and leaves a gap after byte 0; "
                         "the shard is corrupt"),
    ({"x": u8(4, 5), "y": u8(1, 5)}, 5, "s.safetensors: tensor y starts at data byte 1 and leaves a gap after byte 0; "
                                        "the shard is corrupt"),
    ({"a": u8(0, 4), "b": u8(6, 8)}, 8, "s.safetensors: tensor b starts at data byte 6 and leaves a gap after byte 4; "
                                        "the shard is corrupt"),
    ({"a": u8(0, 4), "b": u8(2, 6)}, 6, "s.safetensors: tensor b starts at data byte 2 and overlaps the tensor "
                                        "before it; the shard is corrupt"),
    ({"b": u8(0, 4), "a": u8(0, 4)}, 8, "s.safetensors: tensor b starts at data byte 0 and overlaps the tensor "
                                        "before it; the shard is corrupt"),  # sorted by offsets, then by name
    ({"a": u8(0, 4)}, 7, "s.safetensors: its tensors cover 4 of its 7 data bytes (trailing bytes); "
                         "the shard is corrupt"),
    ({}, 3, "s.safetensors: its tensors cover 0 of its 3 data bytes (trailing bytes); the shard is corrupt"),
    ({"__metadata__": {"format": "pt"}}, 1,
     "s.safetensors: its tensors cover 0 of its 1 data bytes (trailing bytes); the shard is corrupt"),
])
def test_layout_errors_name_the_tensor_and_the_bytes(header, data_bytes, message):
    from premoe.checkpoint import check_layout

    with pytest.raises(CheckpointError) as caught:
        check_layout(SHARD, header, data_bytes)
    assert str(caught.value) == message


@pytest.mark.parametrize("header, data_bytes", [
    ({}, 0),
    ({"__metadata__": None}, 0),
    ({"a": u8(0, 2), "e": u8(2, 2), "b": u8(2, 4)}, 4),  # an empty tensor between two others
    ({"b": u8(2, 4), "a": u8(0, 2)}, 4),  # out of data order: sorted, then tiled
    ({"e": u8(2, 2), "b": u8(2, 4), "__metadata__": {"x": "y"}, "a": u8(0, 2)}, 4),
    ({"z": u8(4, 4, [0, 7]), "a": u8(0, 4)}, 4),  # an empty tensor at the very end
    ({"w": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]}}, 8),  # a scalar
    ({"w": {"dtype": "BOOL", "shape": [1, 1, 3], "data_offsets": [0, 3]}}, 3),
])
def test_headers_that_tile_their_data_pass(header, data_bytes):
    from premoe.checkpoint import check_layout

    before = json.dumps(header)
    assert check_layout(SHARD, header, data_bytes) is None
    assert json.dumps(header) == before


def test_check_layout_turns_entries_given_as_pairs_into_dicts():
    from premoe.checkpoint import check_layout

    header = {"__metadata__": (("format", "pt"),), "w": (("dtype", "U8"), ("shape", [2]), ("data_offsets", [0, 2]))}
    check_layout(SHARD, header, 2)
    assert header == {"__metadata__": {"format": "pt"}, "w": u8(0, 2)}
    assert type(header["w"]) is dict and type(header["__metadata__"]) is dict
    twice = {"w": (("dtype", "U8"), ("shape", [2]), ("shape", [2]), ("data_offsets", [0, 2]))}
    with pytest.raises(CheckpointError) as caught:
        check_layout(SHARD, twice, 2)
    assert str(caught.value) == "s.safetensors has a corrupt safetensors header (duplicate key 'shape')"


def two_shards(path: Path, index: bool = True) -> dict:
    """s1 holds x (2 bytes) and y (3), s2 holds z (4); both carry metadata. The index, written when ``index``."""
    write_shard(path / "s1.safetensors", {"__metadata__": {"format": "pt"}, "x": u8(0, 2), "y": u8(2, 5)}, b"\0" * 5)
    write_shard(path / "s2.safetensors", {"__metadata__": {"format": "pt"}, "z": u8(0, 4)}, b"\0" * 4)
    weight_map = {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"}
    if index:
        (path / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return {"weight_map": weight_map}


def test_headers_reads_the_shards_the_index_it_is_given_names(tmp_path):
    from premoe.checkpoint import headers

    index = two_shards(tmp_path, index=False)  # no index on disk: only the one given
    read = headers(tmp_path, index)
    assert {shard: start for shard, (_, start) in read.items()} == {
        "s1.safetensors": 8 + len(json.dumps({"__metadata__": {"format": "pt"}, "x": u8(0, 2), "y": u8(2, 5)})),
        "s2.safetensors": 8 + len(json.dumps({"__metadata__": {"format": "pt"}, "z": u8(0, 4)}))}
    assert read["s2.safetensors"][0] == {"__metadata__": {"format": "pt"}, "z": u8(0, 4)}
    assert list(headers(tmp_path, {"weight_map": {"z": "s2.safetensors"}})) == ["s2.safetensors"]
    write_shard(tmp_path / "model.safetensors", {"w": u8(0, 1)}, b"\0")  # single file, no index
    assert headers(tmp_path) == {"model.safetensors": ({"w": u8(0, 1)}, 8 + len(json.dumps({"w": u8(0, 1)})))}
    index["weight_map"]["x"] = "s3.safetensors"
    with pytest.raises(MissingFileError, match="shard .*s3.safetensors is missing"):
        headers(tmp_path, index)


def test_tensors_uses_the_headers_and_index_it_is_given(tmp_path):
    from premoe.checkpoint import TensorInfo, headers

    index = two_shards(tmp_path, index=False)
    expected = {"x": TensorInfo("x", "s1.safetensors", "U8", (2,), (0, 2)),
                "y": TensorInfo("y", "s1.safetensors", "U8", (3,), (2, 5)),
                "z": TensorInfo("z", "s2.safetensors", "U8", (4,), (0, 4))}
    assert tensors(tmp_path, index=index) == expected  # the given index finds the shards: none on disk
    read = headers(tmp_path, index)
    assert tensors(tmp_path / "elsewhere", read, index) == expected  # nothing read from disk at all
    assert tensors(tmp_path / "elsewhere", read) == expected  # no index there: the headers alone
    wrong = {"weight_map": {**index["weight_map"], "w": "s2.safetensors"}}
    with pytest.raises(CheckpointError) as caught:  # the given index is checked, not the (absent) one on disk
        tensors(tmp_path, read, wrong)
    assert str(caught.value) == f"{tmp_path / INDEX} lists 1 tensors no shard holds, e.g. w"


def test_tensor_shards_checks_the_index_against_the_headers(tmp_path):
    from premoe.checkpoint import headers, tensor_shards

    index = two_shards(tmp_path)
    read = headers(tmp_path, index)
    found = {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"}
    assert tensor_shards(tmp_path, read, None) == found  # both shards' __metadata__: not a tensor in two shards
    assert tensor_shards(tmp_path, read, index) == found
    partial = {"weight_map": {"z": "s2.safetensors"}}  # a tensor the index does not list is where its shard holds it
    assert tensor_shards(tmp_path, read, partial) == found
    assert tensors(tmp_path, read, partial)["x"].shard == "s1.safetensors"
    for weight_map, message in [
        ({**found, "b": "s1.safetensors", "a": "s2.safetensors"}, "lists 2 tensors no shard holds, e.g. a"),
        ({**found, "y": "s2.safetensors", "x": "s2.safetensors"},
         "puts x in s2.safetensors, but s1.safetensors holds it; the index does not match the shards"),
        ({"z": "s1.safetensors"}, "puts z in s1.safetensors, but s2.safetensors holds it; the index does not match "
                                  "the shards"),
    ]:
        with pytest.raises(CheckpointError) as caught:
            tensor_shards(tmp_path, read, {"weight_map": weight_map})
        assert str(caught.value) == f"{tmp_path / INDEX} {message}"


def test_a_tensor_in_two_shards_is_named(tmp_path):
    from premoe.checkpoint import headers, tensor_shards

    write_shard(tmp_path / "s1.safetensors", {"x": u8(0, 2), "q": u8(2, 3), "y": u8(3, 5)}, b"\0" * 5)
    write_shard(tmp_path / "s2.safetensors", {"z": u8(0, 1), "y": u8(1, 4), "q": u8(4, 5)}, b"\0" * 5)
    index = {"weight_map": {"x": "s1.safetensors", "z": "s2.safetensors"}}
    with pytest.raises(CheckpointError) as caught:
        tensor_shards(tmp_path, headers(tmp_path, index), None)
    assert str(caught.value) == "tensor y is in both s1.safetensors and s2.safetensors; the checkpoint is corrupt"
    with pytest.raises(CheckpointError) as caught:
        tensors(tmp_path, index=index)  # before the index is compared
    assert str(caught.value) == "tensor y is in both s1.safetensors and s2.safetensors; the checkpoint is corrupt"


class _Adapter:
    """The two questions size_breakdown asks an adapter, on made-up key names: ``mtp.*`` is an MTP tensor (when the
    config says MTP layers exist), ``e.L.E[.part]`` a per-expert tensor, ``r.L`` a router row tensor."""

    def mtp_layer(self, key, config):
        return 9 if config["mtp"] and key.startswith("mtp.") else None

    def classify_key(self, key):
        parts = key.split(".")
        if parts[0] == "e":
            return "expert", int(parts[1]), int(parts[2])
        return ("rows", int(parts[1]), None) if parts[0] == "r" else None


def test_size_breakdown_splits_bytes_and_header_entries(tmp_path):
    """Two MTP tensors (one first in its shard, where stopping at it would skip the rest), per-expert layers and a
    layer with router rows only (no per-expert entry: 0 header bytes per expert), expert bytes as whole bytes."""
    from premoe.checkpoint import SizeBreakdown, _fixed_header_bytes, entry_bytes, size_breakdown

    one = {"__metadata__": {"format": "pt"}, "emb": u8(0, 11), "e.1.0": u8(11, 17), "e.1.1.a": u8(17, 20),
           "e.1.1.b": u8(20, 23), "r.1": u8(23, 27), "mtp.x": u8(27, 34)}
    two = {"mtp.y": u8(0, 2), "e.2.0": u8(2, 12), "e.2.1": u8(12, 22), "norm": u8(22, 27), "r.3": u8(27, 30)}
    write_shard(tmp_path / "m-1.safetensors", one, b"\0" * 34)
    write_shard(tmp_path / "m-2.safetensors", two, b"\0" * 30)
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {**dict.fromkeys(set(one) - {"__metadata__"},
                                                                             "m-1.safetensors"),
                                                             **dict.fromkeys(two, "m-2.safetensors")}}))
    (tmp_path / "config.json").write_text(json.dumps({"mtp": True}))
    sizes = size_breakdown(tmp_path, _Adapter(), 2)
    kept = (_fixed_header_bytes(one) + entry_bytes("emb", one["emb"], 34) + entry_bytes("r.1", one["r.1"], 34)
            + _fixed_header_bytes(two) + entry_bytes("norm", two["norm"], 30) + entry_bytes("r.3", two["r.3"], 30))
    assert entry_bytes("emb", one["emb"], 34) == len('"emb":{"dtype":"U8","shape":[11],"data_offsets":[34,34]},')
    expert_1 = entry_bytes("e.1.1.a", one["e.1.1.a"], 34) + entry_bytes("e.1.1.b", one["e.1.1.b"], 34)  # the larger
    assert expert_1 > entry_bytes("e.1.0", one["e.1.0"], 34)
    assert sizes == SizeBreakdown(total_bytes=64, base_bytes=11 + 5,
                                  expert_bytes={1: (6 + 3 + 3 + 4) // 2, 2: 10, 3: 1},
                                  num_experts=2, mtp_bytes=7 + 2, header_bytes=kept,
                                  expert_header_bytes={1: expert_1, 2: entry_bytes("e.2.0", two["e.2.0"], 30), 3: 0})
    assert all(type(b) is int for b in [*sizes.expert_bytes.values(), *sizes.expert_header_bytes.values()])
    (tmp_path / "config.json").write_text(json.dumps({"mtp": False}))  # the config reaches the adapter
    plain = size_breakdown(tmp_path, _Adapter(), 4)
    assert (plain.mtp_bytes, plain.base_bytes, plain.expert_bytes) == (0, 11 + 7 + 2 + 5, {1: 4, 2: 5, 3: 0})
    assert plain.header_bytes == kept + entry_bytes("mtp.x", one["mtp.x"], 34) + entry_bytes("mtp.y", two["mtp.y"], 30)
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"emb": "m-2.safetensors", "norm": "m-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="puts emb in m-2.safetensors, but m-1.safetensors holds it"):
        size_breakdown(tmp_path, _Adapter(), 2)


HEADER_ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(sorted(DTYPE_BYTES)),
                                      "shape": st.lists(st.integers(0, 3), max_size=3)})


@settings(SETTINGS, max_examples=80)  # a file written and read per example: under 1 s on a loaded machine
@given(entries=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "__metadata__"), HEADER_ENTRY, max_size=6),
       metadata=st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
       order=st.randoms(use_true_random=False))
def test_any_well_formed_header_round_trips_through_encode_header_and_read_header(entries, metadata, order):
    """What compile writes (encode_header) reads back as written, in any data order, names with colons, quotes,
    escapes and non-ASCII included; the data starts 8-byte aligned."""
    from premoe.checkpoint import encode_header

    keys = list(entries)
    order.shuffle(keys)  # data order need not be the listing order
    placed, end = {}, 0
    for key in keys:
        nbytes = math.prod(entries[key]["shape"]) * DTYPE_BYTES[entries[key]["dtype"]]
        placed[key] = {**entries[key], "data_offsets": [end, end + nbytes]}
        end += nbytes
    placed = {key: placed[key] for key in entries}
    text = encode_header(placed, metadata)
    file = WORK / "roundtrip.safetensors"
    file.write_bytes(struct.pack("<Q", len(text)) + text + bytes(range(256)) * (end // 256) + b"\1" * (end % 256))
    header, start = read_header(file)
    assert header == ({"__metadata__": metadata, **placed} if metadata else placed)
    assert start == 8 + len(text) and start % 8 == 0


EMPTY_U8 = '"dtype": "U8", "shape": [0], "data_offsets": [0, 0]'


@pytest.mark.parametrize("text, reason", [
    (('{"a": {%s}}' % EMPTY_U8).encode("utf-16-le"), "Expecting property name enclosed in double quotes"),
    (('{"a": {%s}}' % EMPTY_U8).encode("utf-32"), "'utf-8' codec can't decode byte 0xff in position 0: invalid "
                                                   "start byte"),
    (b"\xef\xbb\xbf" + ('{"a": {%s}}' % EMPTY_U8).encode(), "Unexpected UTF-8 BOM (decode using utf-8-sig)"),
    (('{"a\ud800": {%s}}' % EMPTY_U8).encode("utf-8", "surrogatepass"),
     "'utf-8' codec can't decode byte 0xed in position 3: invalid continuation byte"),
    (('{"a": {%s, "x": NaN}}' % EMPTY_U8).encode(), "NaN is not JSON"),
    (('{"a": {%s, "x": [-Infinity]}}' % EMPTY_U8).encode(), "-Infinity is not JSON"),
    (('{"a\\ud800": {%s}}' % EMPTY_U8).encode(), "a \\u escape of an unpaired UTF-16 surrogate"),
    (('{"__metadata__": {"k": "\\uDC00x"}, "a": {%s}}' % EMPTY_U8).encode(), "a \\u escape of an unpaired UTF-16 "
                                                                              "surrogate"),
    (('{"a\\ude00\\ud83d": {%s}}' % EMPTY_U8).encode(), "a \\u escape of an unpaired UTF-16 surrogate"),
])
def test_headers_that_are_not_utf8_json_are_refused_as_safetensors_refuses_them(tmp_path, text, reason):
    """(a bug: json.loads of bytes also reads UTF-16 and UTF-32, skips a BOM, passes encoded surrogates, and
    takes NaN and Infinity; safetensors reads none of these, and premoe accepted them all)"""
    file = write_shard(tmp_path / "x.safetensors", text)
    with pytest.raises(CheckpointError) as caught:
        read_header(file)
    assert str(caught.value) == f"{file} has a corrupt safetensors header ({reason})"
    agrees_with_safetensors(file)  # safetensors refuses it too


def test_escapes_of_whole_characters_read_back(tmp_path):
    file = write_shard(tmp_path / "x.safetensors", ('{"a\\ud83d\\ude00\\u00e9\\n": {%s}}' % EMPTY_U8).encode())
    assert read_header(file)[0] == {"a\U0001F600\u00e9\n": u8(0, 0)}
    agrees_with_safetensors(file)


@pytest.mark.parametrize("shape, refused", [
    ([2**64 - 1, 0], False), ([2**63, 0, 5], False), ([2**32, 2**32 - 1, 0, 2**64 - 1], False),
    ([2**64, 0], True), ([0, 2**64], True), ([2**32, 2**32, 0], True), ([2**40, 2**40, 0, 1], True),
])
def test_an_empty_tensor_s_shape_must_count_its_elements_in_64_bits(tmp_path, shape, refused):
    """(a bug: premoe accepted an empty tensor whose dimensions safetensors cannot multiply; torch cannot either)"""
    file = write_shard(tmp_path / "x.safetensors", {"w": u8(0, 0, shape)})
    if refused:
        with pytest.raises(CheckpointError) as caught:
            read_header(file)
        assert str(caught.value) == (f"{file}: tensor w has shape {shape}, whose element count overflows 64 bits; "
                                     "the header is corrupt")
    else:
        assert read_header(file)[0] == {"w": u8(0, 0, shape)}
    agrees_with_safetensors(file)


@SETTINGS
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=6), order=st.randoms(use_true_random=False),
       victim=st.integers(0, 5), shift=st.integers(-3, 3).filter(bool))
def test_tilings_pass_in_any_listing_order_and_a_moved_tensor_is_refused(sizes, order, victim, shift):
    """check_layout: tensors that tile the data pass whatever order the header lists them in (the chained fast path
    and the sorted one agree); moving any non-empty tensor leaves a gap, an overlap or runs past the end."""
    from hypothesis import assume

    from premoe.checkpoint import check_layout

    header, end = {}, 0
    for i, n in enumerate(sizes):
        header[f"t{i}"] = u8(end, end + n)
        end += n
    keys = list(header)
    order.shuffle(keys)
    listed = {k: header[k] for k in keys}
    check_layout(SHARD, listed, end)
    with pytest.raises(CheckpointError, match=r"trailing bytes"):
        check_layout(SHARD, listed, end + 1)
    key = keys[victim % len(keys)]
    begin, stop = listed[key]["data_offsets"]
    assume(stop > begin and begin + shift >= 0)
    with pytest.raises(CheckpointError, match=r"overlaps the tensor before it|leaves a gap after byte \d+|"
                                              r"is truncated: tensor|its tensors cover \d+ of its"):
        check_layout(SHARD, {**listed, key: u8(begin + shift, stop + shift)}, end)
