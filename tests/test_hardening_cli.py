"""Hostile inputs replayed through the CLI (issue 12 items 1, 2, 7): no input lost, one line, no traceback.

Every failing case asserts: a non-zero exit, exactly one line on stderr, no traceback, and the inputs byte for
byte as they were. The CLI runs in-process through ``premoe.cli.main`` (the same error handler as the
``premoe`` command) so each case costs milliseconds; click rejects bad options before any model loads.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from premoe.cli import main
from premoe.errors import CheckpointError, DiskSpaceError, InputError, OutputExistsError, PremoeError
from premoe.fileio import (MARKER, check_output, clean_stale_temps, load_artefact, save_artefact, write_dir,
                           write_text_atomic)

# --------------------------------------------------------------------------- helpers


def tree_hash(path: Path) -> str:
    """A hash of every name and byte under ``path`` (a file or a directory)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


def run(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    """``premoe ARGV`` in-process: (exit code, stdout, stderr)."""
    monkeypatch.delenv("PREMOE_DEBUG", raising=False)
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails(capsys, monkeypatch, *argv: str, inputs=(), expect: str = "") -> str:
    """Run ``premoe ARGV`` and assert the hardening contract; return the one error line."""
    before = {p: tree_hash(p) for p in inputs}
    code, _, err = run(capsys, monkeypatch, *argv)
    assert code != 0, err
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert err.startswith("premoe: "), err
    assert expect in err, err
    for path, digest in before.items():
        assert Path(path).exists() and tree_hash(path) == digest, f"{path} changed"
    return err.strip()


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    directory = tmp_path / "texts"
    (directory / "sub").mkdir(parents=True)
    (directory / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    (directory / "sub" / "b.txt").write_text("In the beginning God created the heaven and the earth.\n" * 20)
    return directory


@pytest.fixture()
def user_dir(tmp_path) -> Path:
    """A directory premoe did not write, holding something of the user's."""
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "thesis.tex").write_text("irreplaceable")
    return directory


# --------------------------------------------------------------------------- 12.1 never destroy an input


def test_compile_out_parent_of_model_is_refused(capsys, monkeypatch, tiny_qwen3, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    fails(capsys, monkeypatch, "compile", tiny_qwen3, plan, "--out", tiny_qwen3.parent, "--force",
          inputs=[tiny_qwen3, plan], expect="contains the input")


def test_compile_out_inside_model_is_refused(capsys, monkeypatch, tiny_qwen3, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    fails(capsys, monkeypatch, "compile", tiny_qwen3, plan, "--out", tiny_qwen3 / "pruned", "--force",
          inputs=[tiny_qwen3], expect="lies inside the input")
    assert not (tiny_qwen3 / "pruned").exists()


def test_profile_out_equal_to_data_is_refused(capsys, monkeypatch, tiny_qwen3, data_dir):
    fails(capsys, monkeypatch, "profile", tiny_qwen3, "--data", f"d={data_dir}", "--out", data_dir, "--force",
          inputs=[data_dir, tiny_qwen3], expect="is the input")


def test_profile_out_through_a_symlink_to_the_data_is_refused(capsys, monkeypatch, tiny_qwen3, data_dir, tmp_path):
    (tmp_path / "alias").symlink_to(data_dir.parent)
    fails(capsys, monkeypatch, "profile", tiny_qwen3, "--data", f"d={data_dir}", "--out", tmp_path / "alias" / "texts",
          "--force", inputs=[data_dir], expect="is the input")


def test_store_build_out_equal_to_profile_is_refused(capsys, monkeypatch, tiny_qwen3, tmp_path):
    profile = tmp_path / "prof"
    save_artefact(profile, "profile.json", {"format": "premoe-profile/1"}, "scores.safetensors", {"x": torch.ones(2)})
    fails(capsys, monkeypatch, "store", "build", tiny_qwen3, "--profile", profile, "--out", profile, "--force",
          inputs=[profile], expect="is the input")


def test_report_out_holding_the_results_is_refused(capsys, monkeypatch, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.json").write_text('{"format": "premoe-sweep/1"}')
    fails(capsys, monkeypatch, "report", sweep, "--out", sweep, "--force", inputs=[sweep], expect="contains the input")


def test_force_does_not_replace_a_directory_premoe_did_not_write(capsys, monkeypatch, tmp_path, user_dir):
    results = tmp_path / "results.json"
    results.write_text('{"format": "premoe-sweep/1"}')
    fails(capsys, monkeypatch, "report", results, "--out", user_dir, "--force", inputs=[user_dir, results],
          expect="not written by premoe")


def test_existing_output_needs_force(capsys, monkeypatch, tmp_path, tiny_qwen3, data_dir):
    out = tmp_path / "prof"
    write_dir(out, lambda tmp: (tmp / "profile.json").write_text("{}"))
    fails(capsys, monkeypatch, "profile", tiny_qwen3, "--data", f"d={data_dir}", "--out", out, inputs=[out],
          expect="pass --force")


def test_output_symlink_is_refused(capsys, monkeypatch, tmp_path, tiny_qwen3, data_dir, user_dir):
    (tmp_path / "link").symlink_to(user_dir)
    fails(capsys, monkeypatch, "profile", tiny_qwen3, "--data", f"d={data_dir}", "--out", tmp_path / "link", "--force",
          inputs=[user_dir], expect="symbolic link")


@pytest.mark.parametrize("verb", [["eval", "{model}"], ["verify", "{model}", "{model}"]])
def test_json_file_is_not_overwritten(capsys, monkeypatch, tmp_path, tiny_qwen3, verb):
    target = tmp_path / "numbers.json"
    target.write_text("my own numbers")
    argv = [a.format(model=tiny_qwen3) for a in verb]
    fails(capsys, monkeypatch, *argv, "--json", target, inputs=[target], expect="pass --force")
    fails(capsys, monkeypatch, *argv, "--json", target, "--force", inputs=[target], expect="not written by premoe")


def test_profile_end_to_end_then_force_replaces_its_own_output(capsys, monkeypatch, tmp_path, tiny_qwen3, data_dir):
    out = tmp_path / "prof"
    before = tree_hash(data_dir)
    old = os.umask(0o022)
    try:
        argv = ["profile", tiny_qwen3, "--data", f"d={data_dir}", "--out", out, "--max-tokens", "64", "--seq-len",
                "16", "--scorers", "frequency"]
        code, _, err = run(capsys, monkeypatch, *argv)
        assert code == 0, err
        assert (out / MARKER).is_file() and (out / "profile.json").is_file()
        assert oct(out.stat().st_mode & 0o777) == oct(0o755)  # umask, not mkdtemp's 0700
        assert oct((out / "profile.json").stat().st_mode & 0o777) == oct(0o644)
        assert oct((out / "scores.safetensors").stat().st_mode & 0o777) == oct(0o644)  # safetensors writes 0600
        code, _, err = run(capsys, monkeypatch, *argv, "--force")
        assert code == 0, err
    finally:
        os.umask(old)
    assert tree_hash(data_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof", "texts"]  # no temp left beside the output


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temps_of_a_killed_run_are_removed_and_live_ones_reported(tmp_path, capsys):
    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}-abcd"
    (dead / "big").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{os.getppid()}-efgh"  # the parent process: alive
    live.mkdir()
    old = tmp_path / ".out.tmp-k2j3h4"  # an older premoe's name, without a process id
    old.mkdir()
    other = tmp_path / ".outer.tmp-1-abcd"  # another output's temp: not ours to touch
    other.mkdir()
    assert clean_stale_temps(out) == [dead]
    err = capsys.readouterr().err
    assert not dead.exists() and live.exists() and old.exists() and other.exists()
    assert f"removed {dead}" in err and f"{live} is being written by process" in err and str(old) in err


def test_a_failed_file_save_leaves_no_temp(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("premoe.fileio.os.chmod", full_disk)
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "plan.json", '{"format": "premoe-plan/1"}')
    assert list(tmp_path.iterdir()) == []


def test_a_failed_directory_write_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    write_dir(out, lambda tmp: (tmp / "a.txt").write_text("first"))

    def broken(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_dir(out, broken, force=True)  # a --force replacement that fails
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_permissions_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        out = write_dir(tmp_path / "out", lambda tmp: (tmp / "f.txt").write_text("x"))
        plan = write_text_atomic(tmp_path / "plan.json", "{}")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode
    assert plan.stat().st_mode & 0o777 == mode & 0o666
    assert (out / "f.txt").stat().st_mode & 0o777 == mode & 0o666


# --------------------------------------------------------------------------- 12.2 bounded reading


def test_device_file_is_refused_not_read(capsys, monkeypatch, tmp_path, tiny_qwen3):
    fails(capsys, monkeypatch, "profile", tiny_qwen3, "--data", "x=/dev/zero", "--out", tmp_path / "o",
          expect="not a regular file")
    assert not (tmp_path / "o").exists()


def test_empty_data_path_is_an_error(capsys, monkeypatch, tmp_path, tiny_qwen3):
    fails(capsys, monkeypatch, "profile", tiny_qwen3, "--data", "x=", "--out", tmp_path / "o", expect="empty PATH")


@pytest.mark.parametrize("name, content, expect", [
    ("bin.txt", b"text\x00\x01\x02binary", "binary, not text (NUL byte at byte 4)"),
    ("latin.txt", "Grüße aus Köln\n".encode("latin-1"), "is not UTF-8 (byte 0xfc)"),
    ("latin.jsonl", '{"text": "ok"}\n{"text": "Grüße"}\n'.encode("latin-1"), "latin.jsonl:2 is not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2 is not valid JSON"),
    ("list.jsonl", b'["text"]\n', "list.jsonl:1 is a JSON list, not an object"),
    ("deep.jsonl", b"[" * 100000 + b"]" * 100000 + b"\n", "deep.jsonl:1"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "hello"}\n' * 100)[:40], "is a corrupt or truncated gzip file (Compressed file ended"),
    ("plain.jsonl.gz", b'{"text": "not compressed"}\n', "is a corrupt or truncated gzip"),
    ("none.jsonl", b'{"title": "no text"}\n', "none.jsonl:1 has neither"),
])
def test_bad_data_files_are_one_line(capsys, monkeypatch, tmp_path, tiny_qwen3, name, content, expect):
    file = tmp_path / name
    file.write_bytes(content)
    fails(capsys, monkeypatch, "profile", tiny_qwen3, "--data", f"x={file}", "--out", tmp_path / "o",
          inputs=[file], expect=expect)


# --------------------------------------------------------------------------- 12.7 one line for every bad input

OPTION_CASES = [
    (["profile", "{m}", "--data", "x=t", "--out", "{o}", "--seq-len", "0"], "--seq-len"),
    (["profile", "{m}", "--data", "x=t", "--out", "{o}", "--batch-size", "0"], "--batch-size"),
    (["profile", "{m}", "--data", "x=t", "--out", "{o}", "--generate", "256", "--seq-len", "256"], "--generate"),
    (["profile", "{m}", "--data", "x=t", "--out", "{o}", "--max-tokens", "0"], "--max-tokens"),
    (["profile", "{m}", "--data", "x=t", "--out", "{o}", "--max-tokens", "-5"], "--max-tokens"),
    (["profile", "{m}", "--data", "x=t", "--out", "{o}", "--device", "quantum"], "--device"),
    (["profile", "{m}", "--data", "x=t", "--out", "{o}", "--device", "cuda:7"], "--device"),
    (["plan", "{o}", "--budget-gb", "nan", "--domain", "x", "--dry-run"], "--budget-gb"),
    (["plan", "{o}", "--budget-gb", "inf", "--domain", "x", "--dry-run"], "--budget-gb"),
    (["plan", "{o}", "--keep", "1.5", "--domain", "x", "--dry-run"], "--keep"),
    (["plan", "{o}", "--experts", "0", "--domain", "x", "--dry-run"], "--experts"),
    (["store", "build", "{m}", "--profile", "{o}", "--out", "{o}2", "--quantile", "5"], "--quantile"),
    (["store", "build", "{m}", "--profile", "{o}", "--out", "{o}2", "--margin", "-1"], "--margin"),
    (["store", "query", "{o}", "text", "--tokens", "0"], "--tokens"),
    (["eval", "{m}", "--max-windows", "-1"], "--max-windows"),
    (["eval", "{m}", "--seq-len", "1"], "--seq-len"),
    (["verify", "{m}", "{m}", "--max-tokens", "0"], "--max-tokens"),
    (["sweep", "{m}", "--profile", "{o}", "--out", "{o}2", "--keep", "0.5,2"], "--keep"),
    (["sweep", "{m}", "--profile", "{o}", "--out", "{o}2", "--cache-gb", "nan"], "--cache-gb"),
    (["demo", "--keep", "0"], "--keep"),
    (["demo", "--specialist", "klingon", "--out", "{o}"], "--specialist"),
    (["testbed", "train", "--corpus", "{o}", "--work", "{o}2", "--out", "{o}3", "--max-steps", "0"], "--max-steps"),
]


@pytest.mark.parametrize("argv, option", OPTION_CASES, ids=[" ".join(a[:2]) + " " + o for a, o in OPTION_CASES])
def test_numeric_options_are_validated(capsys, monkeypatch, tmp_path, tiny_qwen3, argv, option):
    args = [a.format(m=tiny_qwen3, o=tmp_path / "o") for a in argv]
    line = fails(capsys, monkeypatch, *args, inputs=[tiny_qwen3])
    assert option in line
    assert not (tmp_path / "o").exists()


def test_corrupt_artefacts_are_one_line(capsys, monkeypatch, tmp_path):
    profile = tmp_path / "prof"
    save_artefact(profile, "profile.json", {"format": "premoe-profile/1"}, "scores.safetensors",
                  {"x": torch.ones(64)})
    tensors = profile / "scores.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])  # truncated, as a full disk or killed copy leaves it
    line = fails(capsys, monkeypatch, "profile", "show", profile, inputs=[profile], expect="corrupt or truncated")
    assert "rebuild it with `premoe profile" in line
    (profile / "profile.json").write_text('{"format": "premoe-prof')
    fails(capsys, monkeypatch, "profile", "show", profile, inputs=[profile], expect="profile.json is corrupt")
    tensors.unlink()
    (profile / "profile.json").write_text("[1, 2]")
    fails(capsys, monkeypatch, "profile", "show", profile, inputs=[profile], expect="not a JSON object")
    fails(capsys, monkeypatch, "store", "query", profile / "profile.json", "text", expect="is not a directory")


@pytest.mark.parametrize("content, expect", [
    (b"[1, 2]", "is not a premoe sweep's results.json"),
    (b'{"format": "premoe-sweep/1"}', "is damaged (KeyError"),
    (b'{"format": "premoe-sweep/1", "model": 5, "profile_info": [], "config": {}, "rows": 1, "eval_data": {}}',
     "is damaged"),
    (b"\xff\xfe{", "is not valid JSON"),
])
def test_damaged_sweep_results_are_one_line(capsys, monkeypatch, tmp_path, content, expect):
    results = tmp_path / "results.json"
    results.write_bytes(content)
    fails(capsys, monkeypatch, "report", results, "--out", tmp_path / "r", inputs=[results], expect=expect)
    assert not (tmp_path / "r").exists()


def test_junk_in_the_sweep_cache_is_ignored(tmp_path):
    from premoe.sweep import read_cache

    cache = tmp_path / "rows.jsonl"
    good = {"key": "k1", "params": {"eval": "x"}, "result": {}}
    cache.write_bytes(b"[1]\n\xff\xfe\n" + json.dumps(good).encode() + b'\n{"key": 5}\n{"params": {}}\n{"key": "k2"')
    assert read_cache(cache) == {"k1": good}


@pytest.mark.parametrize("name", ["a/b", "../up", "x y", ".hidden", "a" * 65, "é"])
def test_data_names_that_would_break_artefacts_are_refused(tmp_path, name):
    from premoe.data import parse_sources

    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(InputError, match="may hold letters, digits"):
        parse_sources([f"{name}={tmp_path / 't.txt'}"])


def test_disk_errors_and_internal_errors_are_one_line(capsys, monkeypatch, tmp_path):
    results = tmp_path / "results.json"
    results.write_text('{"format": "premoe-sweep/1"}')
    cases = [(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o")), "the disk is full"),
             (OSError(errno.EROFS, "Read-only file system", str(tmp_path / "o")), "read-only"),
             (OSError(errno.EACCES, "Permission denied", str(tmp_path / "o")), "permission denied"),
             (RuntimeError("boom\nsecond line"), "internal error: RuntimeError: boom second line; rerun with "
                                                 "PREMOE_DEBUG=1 and report it")]
    for error, expect in cases:
        def raise_it(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr("premoe.report.write_report", raise_it)
        fails(capsys, monkeypatch, "report", results, "--out", tmp_path / "o", inputs=[results], expect=expect)


def test_read_only_or_full_disk_is_refused_before_the_work(tmp_path, monkeypatch):
    class Stats:
        f_flag, f_bavail, f_frsize, f_blocks = os.ST_RDONLY, 10**9, 4096, 10**9

    monkeypatch.setattr("premoe.fileio.os.statvfs", lambda path: Stats())
    with pytest.raises(DiskSpaceError, match="read-only file system"):
        check_output(tmp_path / "out")
    Stats.f_flag, Stats.f_bavail = 0, 10
    with pytest.raises(DiskSpaceError, match="needs about 1.0 MB but .* has 0.0 MB free"):
        check_output(tmp_path / "out")


# --------------------------------------------------------------------------- property tests



@pytest.fixture(scope="module")
def artefact_bytes(tmp_path_factory) -> tuple[bytes, bytes]:
    path = tmp_path_factory.mktemp("artefact") / "prof"
    save_artefact(path, "profile.json", {"format": "premoe-profile/1", "domains": {"a": 3}}, "scores.safetensors",
                  {"a/sums": torch.arange(12, dtype=torch.float32).view(3, 4)})
    return (path / "profile.json").read_bytes(), (path / "scores.safetensors").read_bytes()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["manifest", "tensors"]), cut=st.integers(0, 400), flips=st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4))
def test_mutated_artefacts_load_or_fail_cleanly(tmp_path_factory, artefact_bytes, which, cut, flips):
    manifest, tensors = artefact_bytes
    data = bytearray(manifest if which == "manifest" else tensors)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    data = bytes(data[: len(data) - cut % (len(data) + 1)])
    path = tmp_path_factory.mktemp("mutant") / "prof"
    path.mkdir()
    (path / "profile.json").write_bytes(data if which == "manifest" else manifest)
    (path / "scores.safetensors").write_bytes(data if which == "tensors" else tensors)
    before = tree_hash(path)
    try:
        loaded_manifest, loaded = load_artefact(path, "profile.json", "premoe-profile/1", "scores.safetensors",
                                                "premoe profile MODEL --out prof", required=["domains"])
    except (CheckpointError, InputError) as e:
        assert "\n" not in str(e) and "rebuild" in str(e)
    except PremoeError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(loaded_manifest, dict) and all(isinstance(t, torch.Tensor) for t in loaded.values())
    assert tree_hash(path) == before


def test_output_guard_refuses_files_premoe_did_not_write(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    with pytest.raises(OutputExistsError, match="not written by premoe"):
        write_text_atomic(mine, "{}", force=True)
    assert mine.read_text() == '{"mine": true}'
    ours = write_text_atomic(tmp_path / "plan.json", '{"format": "premoe-plan/1"}')
    write_text_atomic(ours, '{"format": "premoe-plan/1", "v": 2}', force=True)
    assert json.loads(ours.read_text())["v"] == 2


def test_outputs_of_an_older_premoe_are_recognised(tmp_path):
    from premoe.fileio import is_premoe_output

    report = tmp_path / "report"
    report.mkdir()
    for name in ("report.html", "report.md", "coverage.png"):
        (report / name).write_text("x")
    compiled = tmp_path / "compiled"
    compiled.mkdir()
    (compiled / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "premoe": {"kept": {}}}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    (report.parent / "notes").mkdir()
    (report.parent / "notes" / "report.md").write_text("mine")
    (report.parent / "notes" / "report.html").write_text("mine")
    (report.parent / "notes" / "todo.txt").write_text("mine")
    assert is_premoe_output(report) and is_premoe_output(compiled)
    assert not is_premoe_output(model) and not is_premoe_output(tmp_path / "notes")
