"""Shard headers: read_header accepts exactly what safetensors can load, and refuses the rest with one clean error.

Property-based: random and mutated headers (hypothesis) must give either a
correct result — the same tensors safetensors itself reads — or a
CheckpointError naming the shard; never another exception.
"""
import functools
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from premoe.checkpoint import DTYPE_BYTES, INDEX, read_header, shard_files, tensors
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
