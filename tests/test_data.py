"""Calibration text (premoe/data.py): bounded reading, strict UTF-8, and property tests of the parsers."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from premoe.data import parse_sources, read_texts
from premoe.errors import PremoeError

SAFE_NAME = st.text(alphabet="abcxyz_-:=09 ", min_size=0, max_size=12)  # relative names only: no "/" or "."


def test_max_tokens_stops_the_reading(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("word " * 2_000_000)  # 10 MB
    (text,) = parse_sources([f"x={big}"], max_tokens=100)[0].texts
    assert len(text) == 4096  # one small read: 100 tokens x 32 characters fit in it
    lines = tmp_path / "many.jsonl"
    lines.write_text("".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(100_000)))
    assert len(parse_sources([f"x={lines}"], max_tokens=100)[0].texts) == 32  # 32 x 100 chars >= 100 x 32
    assert len(parse_sources([f"x={lines}"])[0].texts) == 100_000


def test_directory_reading_stops_too(tmp_path):
    for i in range(50):
        (tmp_path / f"{i:02d}.txt").write_text("y" * 1000)
    assert len(read_texts(tmp_path, max_chars=2500)) == 3


def test_bounded_reading_gives_the_same_windows():
    from premoe.data import token_windows
    from premoe.modeling import load_tokenizer

    tokenizer = load_tokenizer("testbed")
    bounded = parse_sources(["python"], split="test", max_tokens=1024)[0].texts
    whole = parse_sources(["python"], split="test")[0].texts
    assert len(bounded) < len(whole)
    assert torch.equal(token_windows(bounded, tokenizer, 256, 1024), token_windows(whole, tokenizer, 256, 1024))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".jsonl", ".jsonl.gz", ".md"]),
       gz=st.booleans())
def test_any_data_file_gives_texts_or_a_premoe_error(tmp_path_factory, content, suffix, gz):
    directory = tmp_path_factory.mktemp("data")
    file = directory / f"f{suffix}"
    file.write_bytes(gzip.compress(content) if gz else content)
    before = file.read_bytes()
    try:
        sources = parse_sources([f"x={file}"], max_tokens=50)
    except PremoeError:
        pass
    else:
        assert sources[0].name == "x" and all(isinstance(t, str) for t in sources[0].texts)
        if "\ufffd".encode() not in content:  # never decoded to U+FFFD behind the user's back
            assert not any("\ufffd" in t for t in sources[0].texts)
    assert file.read_bytes() == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.text(max_size=40), st.builds(json.dumps, st.dictionaries(
    st.sampled_from(["text", "messages", "x"]), st.one_of(st.text(max_size=20), st.integers(), st.none(),
                                                          st.lists(st.text(max_size=5), max_size=3))))),
    max_size=8))
def test_any_jsonl_gives_texts_or_a_premoe_error(tmp_path_factory, lines):
    file = tmp_path_factory.mktemp("jsonl") / "f.jsonl"
    file.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))  # a lone surrogate is invalid UTF-8
    try:
        texts = read_texts(file)
    except PremoeError:
        return
    records = [json.loads(line) for line in lines if line.strip()]
    assert texts == [r["text"] for r in records]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=SAFE_NAME)
def test_any_data_spec_gives_sources_or_a_premoe_error(tmp_path_factory, monkeypatch, spec):
    directory = tmp_path_factory.mktemp("cwd")
    (directory / "a.txt").write_text("hello")
    monkeypatch.chdir(directory)
    try:
        sources = parse_sources([spec], max_tokens=10)
    except PremoeError:
        return
    assert sources and all(s.texts for s in sources)


def test_a_line_without_end_is_not_read_whole(tmp_path, monkeypatch):
    """A .jsonl.gz that inflates to one endless line (a gzip bomb) stops at the line limit."""
    import pytest

    import premoe.data

    monkeypatch.setattr(premoe.data, "LINE_LIMIT", 1 << 20)
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gzip.compress(b'{"text": "' + b"a" * (8 << 20)))
    with pytest.raises(premoe.errors.InputError, match=r"bomb.jsonl.gz:1 is longer than 1 MB"):
        read_texts(bomb)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"text": "b" * 1000}) + "\n" + json.dumps({"text": "c"}))  # last line without newline
    assert read_texts(ok) == ["b" * 1000, "c"]


def test_the_benchmarks_default_unseen_texts_are_all_readable():
    """bench/taer_setup.py passes every file of tests/data/unseen as an unseen domain (eval_retrieval, bench_serve,
    docs/make_results.sh): a file the data rules refuse (a .json array once) breaks those scripts, not CI's tests."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import taer_setup

    from premoe.data import parse_sources

    names = [spec.split("=")[0] for spec in taer_setup.OWN_UNSEEN]
    assert len(names) == len(set(names)) >= 8
    sources = parse_sources([spec.split("=")[0] + "=" + str(taer_setup.ROOT / spec.split("=", 1)[1])
                             for spec in taer_setup.OWN_UNSEEN])
    assert [s.name for s in sources] == names and all(s.texts and s.texts[0].strip() for s in sources)
