"""Hostile inputs of the second sweep (docs/hostile.md, "Second sweep"): each case once destroyed an input, crashed
with exit 70, or gave a silently wrong result; each now fails in one line before anything is written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoints import save_family, spread_plan
from premoe import testbed
from premoe.compile import compile_checkpoint, compiled_info
from premoe.data import data_paths, parse_sources, source_origins
from premoe.errors import CheckpointError, InputError, OutputExistsError
from premoe.export import check_uniform, export_gguf, fallback_pre_tokenizer
from premoe.fileio import MARKER, check_inputs, check_output, write_marker
from premoe.modeling import check_context, resolve_model_path
from premoe.sweep import _check_out, estimate_sweep, run_sweep
from test_export import fake_llama  # noqa: F401 -- the stand-in llama.cpp fixture
from test_hardening_cli import fails, tree_hash
from test_store import known_store

# --------------------------------------------------------------------------- data paths


def test_data_paths_are_recorded_absolute(tmp_path, monkeypatch):
    """A relative --data path recorded as given made `store build` (default: the profile's text) read another
    directory's file of the same name when run from elsewhere."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some calibration text\n")
    [source] = parse_sources(["x=t.txt"])
    assert source.origin == str(tmp_path / "t.txt")
    assert source_origins(["x=t.txt", "python"]) == {"x": str(tmp_path / "t.txt"), "python": "testbed:python:calib"}


def test_the_testbed_corpus_is_an_input_of_testbed_data():
    assert data_paths(["python:test", "x=a.txt", "testbed"]) == [testbed.corpus_path(), Path("a.txt")]
    assert data_paths(["python", "de"]) == [testbed.corpus_path()]
    with pytest.raises(InputError, match="is the input"):
        check_output(testbed.corpus_path(), inputs=data_paths(["python"]), force=True)


@pytest.mark.parametrize("argv", [
    ["profile", "run", "testbed", "--data", "python", "--max-tokens", "8", "--force", "--out"],
    ["demo", "--quick", "--force", "--out"],
])
def test_force_never_replaces_the_testbed_corpus(capsys, monkeypatch, tmp_path, argv):
    """The corpus carries a premoe manifest, so --force took it for a replaceable output and deleted it."""
    corpus = tmp_path / "corpus"  # a copy: a regression must not delete the shipped one
    shutil.copytree(testbed.corpus_path(), corpus)
    monkeypatch.setattr(testbed, "corpus_path", lambda: corpus)
    fails(capsys, monkeypatch, *argv, corpus, inputs=[corpus], expect="is the input")


# --------------------------------------------------------------------------- sweep --out


@pytest.mark.parametrize("kind", ["profile", None])
def test_a_sweep_is_not_mixed_into_another_premoe_output(tmp_path, kind):
    """`sweep --out compiled/` wrote rows.jsonl, results.json and a sweep marker into a compiled checkpoint."""
    out = tmp_path / "other"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"premoe": {"format": "premoe-compiled/1"}}))
    if kind:
        write_marker(out, {"kind": kind})
    before = tree_hash(out)
    for call in (run_sweep, estimate_sweep):
        with pytest.raises(OutputExistsError, match="not a sweep"):
            call("testbed", tmp_path / "no-profile", out)
    assert tree_hash(out) == before


def test_a_new_empty_or_sweep_directory_is_a_sweep_out(tmp_path):
    empty, resumed = tmp_path / "empty", tmp_path / "resumed"
    empty.mkdir()
    resumed.mkdir()
    write_marker(resumed, {"kind": "sweep"})
    (resumed / "results.json").write_text("{}")
    for out in (tmp_path / "new", empty, resumed):
        _check_out(out, "testbed", tmp_path / "p", [], [], create=False)
    _check_out(empty, "testbed", tmp_path / "p", [], [])
    assert json.loads((empty / MARKER).read_text())["kind"] == "sweep"


def test_sweep_names_that_list_nothing_are_refused(capsys, monkeypatch, tmp_path):
    """--scorers '' dropped every specialist and generalist row and reported success."""
    for option in ("--scorers", "--grid-transforms"):
        fails(capsys, monkeypatch, "sweep", "testbed", "--profile", tmp_path / "p", "--out", tmp_path / "s",
              option, " , ", "--dry-run", expect=f"Invalid value for '{option}': ' , ' lists no names")
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- compiled premoe block


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A compiled tiny Qwen3-MoE (experts 0-3 kept in every layer) and its config.json."""
    root = tmp_path_factory.mktemp("c")
    path, model, adapter = save_family("qwen3_moe", root / "model")
    plan = spread_plan(path, model, adapter, {l: [0, 1, 2, 3] for l in range(model.config.num_hidden_layers)})
    compile_checkpoint(path, plan, root / "out")
    return root / "out", json.loads((root / "out" / "config.json").read_text())


def _with_block(compiled, tmp_path, edit):
    out, config = compiled
    copy = tmp_path / "c"
    copy.mkdir()
    block = json.loads(json.dumps(config["premoe"]))
    edit(block)
    (copy / "config.json").write_text(json.dumps({**config, "premoe": block}))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["kept_experts"].pop("0"), r"kept experts for layers \['1'.*but counts for \['0'"),
    (lambda b: b["kept_experts"].__setitem__("0", [0, 0, 2, 3]), r"keeps experts \[0, 0, 2, 3\] in layer 0"),
    (lambda b: b["kept_experts"].__setitem__("0", [0, 1, 2, 99]), r"4 distinct indices below"),
    (lambda b: b["kept_experts"].__setitem__("0", [0, 1]), r"keeps experts \[0, 1\] in layer 0: expected 4"),
    (lambda b: b.pop("num_experts_original"), "num_experts_original None, expected a positive integer"),
    (lambda b: b.__setitem__("export", "weird"), "export 'weird', expected uniform, padded or compact"),
    (lambda b: b.__setitem__("format", "premoe-compiled/9"), "format 'premoe-compiled/9'"),
])
def test_an_inconsistent_premoe_block_is_one_line(compiled, tmp_path, edit, message):
    """Each once gave exit 70 in verify (KeyError, IndexError) or a misleading FAIL / a silent PASS."""
    with pytest.raises(CheckpointError, match=message):
        compiled_info(_with_block(compiled, tmp_path, edit))


def test_the_compiled_block_as_written_loads(compiled):
    assert compiled_info(compiled[0])["export"] == "uniform"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["kept_experts", "experts_per_layer", "num_experts_original", "export", "format",
                            "source"]),
       value=st.one_of(st.none(), st.integers(-3, 40), st.text(max_size=3),
                       st.lists(st.integers(-1, 40), max_size=5),
                       st.dictionaries(st.sampled_from(["0", "1", "9", "x"]),
                                       st.one_of(st.integers(-1, 9), st.lists(st.integers(-1, 40), max_size=5)),
                                       max_size=3)))
def test_any_edit_of_the_block_loads_or_fails_in_one_line(compiled, tmp_path_factory, key, value):
    path = _with_block(compiled, tmp_path_factory.mktemp("h"), lambda b: b.__setitem__(key, value))
    try:
        info = compiled_info(path)
    except CheckpointError as e:
        assert "config.json" in str(e) and "\n" not in str(e)
        return
    for layer, kept in info["kept_experts"].items():  # what loads is consistent: verify can index with it
        assert len(set(kept)) == len(kept) == info["experts_per_layer"][layer]
        assert max(kept) < info["num_experts_original"]


# --------------------------------------------------------------------------- export gguf


def test_export_force_replaces_only_a_gguf_file(fake_llama, tmp_path):  # noqa: F811
    """--force overwrote any file, e.g. a user's notes given as --out by mistake."""
    notes = tmp_path / "notes.txt"
    notes.write_text("irreplaceable")
    with pytest.raises(OutputExistsError, match="not a GGUF file, so --force does not replace it"):
        export_gguf("testbed", notes, llama_cpp=fake_llama, force=True)
    assert notes.read_text() == "irreplaceable"
    gguf = tmp_path / "old.gguf"
    gguf.write_bytes(b"GGUF" + bytes(8))
    export_gguf("testbed", gguf, llama_cpp=fake_llama, force=True)  # the stand-in converter writes JSON
    assert json.loads(gguf.read_text())["outtype"] == "f16"
    with pytest.raises(OutputExistsError, match="not a regular file"):
        export_gguf("testbed", tmp_path, llama_cpp=fake_llama, force=True)


def test_export_never_writes_into_the_model(fake_llama, tmp_path):  # noqa: F811
    model = tmp_path / "m"
    shutil.copytree(resolve_model_path("testbed"), model)
    with pytest.raises(InputError, match="lies inside the input"):
        export_gguf(model, model / "x.gguf", llama_cpp=fake_llama)
    assert not (model / "x.gguf").exists()


def test_export_reads_damaged_files_in_one_line(tmp_path):
    """A non-object premoe block or tokenizer.json gave exit 70 (AttributeError, TypeError, UnicodeDecodeError)."""
    with pytest.raises(CheckpointError, match="malformed 'premoe' block"):
        check_uniform({"premoe": "junk"}, tmp_path)
    with pytest.raises(CheckpointError, match=r"compact checkpoint \(\[\"a\", 3\] experts"):
        check_uniform({"premoe": {"export": "compact", "experts_per_layer": {"0": "a", "1": 3}}}, tmp_path)
    for content, message in ((b"[1]", "holds a JSON list"), (b"\xff\xfe{}", "is not valid JSON")):
        (tmp_path / "tokenizer.json").write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            fallback_pre_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": "BPE", "pre_tokenizer": ["x"]}))
    assert fallback_pre_tokenizer(tmp_path) is None


# --------------------------------------------------------------------------- paths and models


@pytest.mark.parametrize("out", ["", " "])
def test_an_empty_output_path_says_empty(tmp_path, out):
    """'' became '.', so the error said the output contained the input."""
    with pytest.raises(InputError, match="the output path is empty"):
        check_inputs(out, [tmp_path])


def test_a_model_that_is_a_file_says_so(tmp_path):
    """Passing model.safetensors or config.json as MODEL said 'does not exist' of a file that exists."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(InputError, match=f"model {weights} is a file, not a checkpoint directory.*e.g. {tmp_path}"):
        resolve_model_path(weights)


def test_store_query_refuses_another_model(capsys, monkeypatch, tmp_path, tiny_qwen3):
    """Any model with the store's first-layer width was accepted, and retrieved from patterns it never made."""
    known_store(tmp_path / "m").save(tmp_path / "store")
    fails(capsys, monkeypatch, "store", "query", tmp_path / "store", "def f(): pass", "--model", tiny_qwen3,
          expect="is not the model the store was built from (known, config 0000000000000000)")


# --------------------------------------------------------------------------- windows beyond the model's positions


@pytest.mark.parametrize("config, seq_len, refused", [
    ({"max_position_embeddings": 1024}, 1025, True),
    ({"max_position_embeddings": 1024}, 1024, False),
    ({"max_position_embeddings": 1024, "rope_parameters": {"rope_type": "default"}}, 4096, True),
    ({"max_position_embeddings": 1024, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, 4096, False),
    ({"max_position_embeddings": 1024, "rope_scaling": {"type": "linear", "factor": 2.0}}, 2048, False),
    ({}, 10 ** 6, False),
    ({"max_position_embeddings": "1024"}, 4096, False),
])
def test_windows_beyond_the_model_positions_are_refused(config, seq_len, refused):
    if refused:
        with pytest.raises(InputError, match=f"--seq-len {seq_len} is longer than the model's "
                                             r"max_position_embeddings \(1024\).*--seq-len 1024 or less"):
            check_context(config, seq_len)
    else:
        check_context(config, seq_len)


@pytest.mark.parametrize("verb", [["profile", "run", "testbed", "--data", "python", "--max-tokens", "8", "--out"],
                                  ["sweep", "testbed", "--profile", "p", "--dry-run", "--out"]])
def test_the_cli_refuses_windows_beyond_the_testbed_positions(capsys, monkeypatch, tmp_path, verb):
    """--seq-len 4096 on the testbed (1024 positions) profiled and evaluated silently wrong numbers."""
    monkeypatch.chdir(tmp_path)
    fails(capsys, monkeypatch, *verb, tmp_path / "out", "--seq-len", "4096",
          expect="max_position_embeddings (1024)")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- plan targets


@pytest.mark.parametrize("argv, message", [
    (["--domain", "python", "--domain", "de"], "'--domain': given 2 times (python, de); a specialist serves one"),
    (["--generalist", "--domains", ""], "'--domains': '' lists no domains"),
    (["--generalist", "--domains", " , "], "'--domains': ' , ' lists no domains"),
])
def test_plan_targets_that_would_silently_change_are_refused(capsys, monkeypatch, tmp_path, argv, message):
    """--domain python --domain de planned for de alone; --domains '' planned for every domain; ',' said a domain
    was listed twice."""
    fails(capsys, monkeypatch, "plan", tmp_path / "prof", "--keep", "0.5", *argv, "--dry-run", expect=message)


# --------------------------------------------------------------------------- numbers click let through


@pytest.mark.parametrize("argv", [
    ["serve", "testbed", "--read-timeout", "nan"],
    ["route", "route.json", "--read-timeout", "nan"],
    ["store", "build", "testbed", "--profile", "p", "--out", "s", "--byte-weight", "nan"],
])
def test_nan_is_not_a_timeout_or_a_weight(capsys, monkeypatch, tmp_path, argv):
    """click's FloatRange compares, and NaN compares false: a NaN read timeout (never times out) was accepted."""
    monkeypatch.chdir(tmp_path)
    option = argv[-2]
    fails(capsys, monkeypatch, *argv, expect=f"Invalid value for '{option}': 'nan' is not a finite number")


def test_unbounded_numbers_show_no_range_in_help(capsys, monkeypatch):
    from test_hardening_cli import run

    code, out, _ = run(capsys, monkeypatch, "verify", "--help")
    assert code == 0 and "[default: 0.0001]" in out and "None" not in out


def test_verify_card_checks_the_card_before_verifying(capsys, monkeypatch, tmp_path):
    """A README.md without a Quality section (or a directory) was found only after the whole verification."""
    import premoe.verify

    monkeypatch.setattr(premoe.verify, "verify", lambda *a, **k: pytest.fail("verified before checking the card"))
    compiled = tmp_path / "c"
    compiled.mkdir()
    (compiled / "README.md").write_text("my own notes\n")
    fails(capsys, monkeypatch, "verify", "testbed", compiled, "--card", inputs=[compiled],
          expect="README.md has no '## Quality' section")
    (compiled / "README.md").unlink()
    (compiled / "README.md").mkdir()
    fails(capsys, monkeypatch, "verify", "testbed", compiled, "--card", expect="README.md is not a file")


# --------------------------------------------------------------------------- data files


def test_a_lone_surrogate_in_jsonl_is_one_line(tmp_path):
    """A JSON escape "\\ud800" decoded to a lone surrogate and the tokenizer crashed (exit 70, TypeError)."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n')
    with pytest.raises(InputError, match=r"d.jsonl:2 holds a lone surrogate \('\\ud800' at character 1"):
        parse_sources([f"x={data}"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=12))
def test_any_jsonl_text_record_reads_or_fails_in_one_line(tmp_path_factory, text):
    data = tmp_path_factory.mktemp("j") / "d.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")  # json.dumps escapes surrogates as \\udXXX
    try:
        [source] = parse_sources([f"x={data}"])
    except InputError as e:
        assert "\n" not in str(e) and ("contains no text" in str(e) or "lone surrogate" in str(e))
        return
    assert source.texts == [text] and text.encode("utf-8")


def test_a_json_file_is_not_calibrated_on_as_raw_text(tmp_path):
    """records.json (a JSON array, as datasets are often saved) was read as one text of JSON syntax."""
    data = tmp_path / "records.json"
    data.write_text(json.dumps([{"text": "hello"}]))
    with pytest.raises(InputError, match=r"records.json is a .json file; premoe reads .jsonl .* rename it .txt"):
        parse_sources([f"x={data}"])


# --------------------------------------------------------------------------- profile.json: what later verbs reread


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["data"].__setitem__("a", "testbed:python"), r"data\['a'\] must be where a profiled domain's text"),
    (lambda m: m["data"].__setitem__("a", 5), r"data\['a'\] must be"),
    (lambda m: m["data"].__setitem__("zzz", "x.txt"), r"data\['zzz'\] must be"),
    (lambda m: m["params"].__setitem__("seq_len", "x"), "params.seq_len must be an integer ≥ 2"),
    (lambda m: m["params"].__setitem__("generate", -1), "params.generate must be an integer ≥ 0"),
])
def test_profile_origins_and_params_are_checked_on_load(tmp_path, edit, message):
    """store build, plan --select reconstruct and sweep crashed on these (exit 70: ValueError, AttributeError)."""
    from test_plan import toy_profile

    from premoe.profile import Profile

    profile = toy_profile()
    profile.data, profile.params = {"a": "testbed:python:calib", "b": "/data/b.txt"}, {"seq_len": 64}
    profile.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "profile.json").read_text())
    edit(manifest)
    (tmp_path / "p" / "profile.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        Profile.load(tmp_path / "p")


def test_reconstruct_names_a_domain_without_recorded_text():
    """A profile whose data lacked the domain gave exit 70 (KeyError) in plan --select reconstruct."""
    from test_plan import toy_profile

    from premoe.select import reconstruct

    profile = toy_profile()
    profile.data = {"b": "/data/b.txt"}
    with pytest.raises(InputError, match="does not record where the text of a came from"):
        reconstruct(profile, ["a"], 4, loaded=(object(), object()))


@pytest.mark.parametrize("key, value, message", [
    ("calibration", {"amounts": {"zzz": 1}}, "'calibration' must be an object whose 'amounts' map tokens"),
    ("calibration", {"amounts": {"tokens": "x"}}, r"got \{'tokens': 'x'\}"),
    ("calibration", "x", "got 'x'"),
    ("model", {"name": "m", "path": 5, "config_hash": "0"}, "'model' must hold string name, path and config_hash"),
])
def test_store_fields_read_later_are_checked_on_load(tmp_path, key, value, message):
    """store add (calibration amounts) and store query (model path) crashed with exit 70 on these."""
    from premoe.store import Store

    known_store(tmp_path / "m").save(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "store.json").read_text())
    manifest[key] = value
    (tmp_path / "s" / "store.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=message):
        Store.load(tmp_path / "s")


# --------------------------------------------------------------------------- --json FILE


def test_json_never_replaces_an_artefact_manifest(tmp_path):
    """`eval --json prof/profile.json --force` replaced the profile's manifest with eval results (premoe's JSON)."""
    from test_plan import toy_profile

    toy_profile().save(tmp_path / "prof")
    before = tree_hash(tmp_path / "prof")
    with pytest.raises(OutputExistsError, match="is the manifest of the premoe profile in"):
        check_output(tmp_path / "prof" / "profile.json", force=True, kind="file")
    assert tree_hash(tmp_path / "prof") == before
    (tmp_path / "e.json").write_text(json.dumps({"format": "premoe-eval/1"}))
    check_output(tmp_path / "e.json", force=True, kind="file")  # a --json report premoe wrote: replaceable


@pytest.mark.parametrize("verb", [["compile", "testbed", "plan.json"], ["report", "results.json"]])
def test_json_equal_to_out_fails_before_writing(capsys, monkeypatch, tmp_path, verb):
    """compile wrote the checkpoint, then refused its --json (the same path) and exited 2 with it in place."""
    monkeypatch.chdir(tmp_path)
    for name in ("plan.json", "results.json"):
        (tmp_path / name).write_text("{}")
    fails(capsys, monkeypatch, *verb, "--out", "x", "--json", "x", expect="the output x is the input x")
    assert not (tmp_path / "x").exists()
