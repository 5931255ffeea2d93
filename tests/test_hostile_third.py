"""Hostile conditions of the third sweep (docs/hostile.md, "Third sweep"): signals, full disks, concurrent runs,
model inputs that are not a local safetensors MoE checkpoint, and paths that are not UTF-8.

Each test failed before its fix: a traceback or a silent kill, a temp or scratch file left behind, an old output
lost, an output another process wrote replaced without --force, an internal error instead of one line.
"""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from premoe.checkpoint import shard_files
from premoe.demo import DemoConfig, run_demo
from premoe.errors import DiskSpaceError, InputError, MissingFileError, OutputExistsError
from premoe.export import export_gguf
from premoe.fileio import (check_inputs, clean_stale_temps, load_artefact, save_artefact, write_dir, write_marker,
                           write_text_atomic)
from premoe.modeling import resolve_model_path
from test_export import fake_llama  # noqa: F401 -- the stand-in llama.cpp fixture
from test_hardening_cli import _dead_pid, fails, tree_hash
from test_plan import toy_profile
from test_sweep import _config as sweep_config
from test_sweep import setup  # noqa: F401 -- a tiny checkpoint and its profile

ROOT = Path(__file__).resolve().parents[1]


def _temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --------------------------------------------------------------------------- signals

# a `premoe profile merge` that stops inside write_dir, its temp directory filled, until it is signalled
_PAUSED_CHILD = """
import sys, time
import premoe.fileio as fileio
marker = fileio.write_marker
def paused(directory, info=None):
    marker(directory, info)
    print("writing", flush=True)
    time.sleep(60)
fileio.write_marker = paused
from premoe.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, -signal.SIGTERM, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_signal_while_writing_unwinds_in_one_line_and_keeps_the_old_output(tmp_path, sig, code, said):
    """SIGTERM killed premoe before any cleanup (the temp directory left beside --out, no message); it now ends
    the same way (killed by SIGTERM, a clean stop for systemd) after the cleanups. Ctrl-C said "aborted" (click's
    word for a declined prompt)."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    for path in (a, b, out):
        toy_profile().save(path)
    before = tree_hash(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PREMOE_DEBUG", None)
    child = subprocess.Popen([sys.executable, "-c", _PAUSED_CHILD, "profile", "merge", str(a), str(b), "--out",
                              str(out), "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready and child.stdout.readline().strip() == "writing", child.stderr.read() if not ready else ""
        assert _temps(out), "the child should be mid-write"
        child.send_signal(sig)
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == code, err
    assert err.strip() == f"premoe: {said}; outputs are written atomically, rerun the same command"
    assert _temps(out) == [] and tree_hash(out) == before


def test_a_replacement_killed_between_its_renames_gets_the_old_output_back(tmp_path, capsys):
    """write_dir renames the old output aside, then the new one in: killed in between, the next run deleted the
    old output as a stale temp, and nothing was left at --out."""
    out = tmp_path / "prof"
    aside = tmp_path / f".prof.old-{_dead_pid()}-abcd"
    aside.mkdir()
    (aside / "profile.json").write_text("the old output")
    assert clean_stale_temps(out) == []
    assert (out / "profile.json").read_text() == "the old output" and not aside.exists()
    assert f"restored {out}" in capsys.readouterr().err


def test_an_interrupted_demo_force_keeps_the_finished_demo(tmp_path, monkeypatch):
    """`demo --force` deleted the finished demo first: Ctrl-C during the new one lost both."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.html").write_text("the finished demo")
    write_marker(out, {"kind": "demo", "complete": True})
    before = tree_hash(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("premoe.modeling.load_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoConfig(out=out, quick=True), force=True)
    assert tree_hash(out) == before and _temps(out) == []


# --------------------------------------------------------------------------- full disks


def test_a_full_disk_while_saving_a_profile_is_one_line(capsys, monkeypatch, tmp_path):
    """safetensors' own writer reports ENOSPC as a SafetensorError: `internal error`, exit 70. Both writers are made
    to fail as they do on a full disk (measured on a 2 MB tmpfs)."""
    from safetensors import SafetensorError

    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    for path in (a, b, out):
        toy_profile().save(path)

    def rust_writer(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    real_write_bytes = Path.write_bytes

    def python_writer(self, data):
        if self.suffix == ".safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data)

    monkeypatch.setattr("safetensors.torch.save_file", rust_writer)
    monkeypatch.setattr(Path, "write_bytes", python_writer)
    err = fails(capsys, monkeypatch, "profile", "merge", a, b, "--out", out, "--force", inputs=[out])
    assert f"cannot write {out}: the disk holding {tmp_path} is full" in err and "nothing was replaced" in err
    assert _temps(out) == []


def test_a_full_disk_while_writing_a_file_names_it(tmp_path, monkeypatch):
    """ENOSPC without a file name: the CLI could only say "No space left on device", not where."""
    out = tmp_path / "plan.json"
    real = os.fdopen

    class Full:
        def __init__(self, fd, *args, **kwargs):
            self.file = real(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr("premoe.fileio.os.fdopen", Full)
    with pytest.raises(DiskSpaceError, match=f"cannot write {out}: the disk holding {tmp_path} quota is exhausted"):
        write_text_atomic(out, "{}")
    assert list(tmp_path.iterdir()) == []


def test_the_scratch_file_is_nameless_and_checked_for_room(tmp_path, monkeypatch):
    """profile/verify --stream: the hidden-state scratch file was left in --workdir (or /tmp) by a kill, and by a
    full disk (the runner's constructor failed, so its __exit__ never ran); a disk too small for it was found
    only when a write failed, with advice to "write the output to another disk"."""
    from premoe.streaming import _HiddenStore

    with _HiddenStore(64, 8, 0, tmp_path / "w") as store:
        assert list((tmp_path / "w").iterdir()) == []  # unlinked at once: a SIGKILL cannot leave it behind
        store.write(0, torch.ones(64, 8))
        assert torch.equal(store.read(0, 64), torch.ones(64, 8))
    with pytest.raises(DiskSpaceError, match=r"needs about 4000000000.0 MB .*point --workdir at another directory"):
        _HiddenStore(10 ** 12, 1000, 0, tmp_path / "w")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with _HiddenStore(64, 8, 0, tmp_path / "w") as store:
        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(DiskSpaceError, match="scratch file of hidden states .* filled its disk"):
            store.write(0, torch.ones(64, 8))


def test_a_full_disk_during_a_sweep_names_its_rows_and_says_it_resumes(setup, tmp_path, monkeypatch):  # noqa: F811
    """A row that cannot be appended said only "No space left on device ... write the output to another disk"."""
    import premoe.sweep
    from premoe.sweep import run_sweep

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    model, profile, data, _ = setup
    monkeypatch.setattr(premoe.sweep, "_compute", full)
    out = tmp_path / "sweep"
    with pytest.raises(DiskSpaceError, match=f"cannot write {out / 'rows.jsonl'}: the disk .* is full .*rerun this "
                                             "command: it resumes"):
        run_sweep(model, profile, out, sweep_config(), eval_data=data, progress=False)


# --------------------------------------------------------------------------- concurrency


def test_an_output_that_appears_while_writing_is_not_replaced_without_force(tmp_path):
    """Two `compile --out X` at once: both found X free, and the second silently replaced the first's output."""
    out = tmp_path / "out"

    def meanwhile_another_run_writes_out(tmp: Path) -> None:
        (tmp / "mine.txt").write_text("this run")
        write_dir(out, lambda other: (other / "theirs.txt").write_text("the other run"))

    with pytest.raises(OutputExistsError, match="appeared while premoe was writing it.*--force"):
        write_dir(out, meanwhile_another_run_writes_out)
    assert sorted(p.name for p in out.iterdir()) == [".premoe", "theirs.txt"] and _temps(out) == []
    file = tmp_path / "plan.json"

    def appears(*args, **kwargs):
        file.write_text('{"format": "premoe-plan/1", "by": "the other run"}')

    real = os.chmod
    os.chmod = lambda path, mode: (appears() if str(path).startswith(str(tmp_path / ".plan.json")) else None,
                                   real(path, mode))
    try:
        with pytest.raises(OutputExistsError, match="appeared"):
            write_text_atomic(file, '{"format": "premoe-plan/1"}')
    finally:
        os.chmod = real
    assert "the other run" in file.read_text() and _temps(file) == []


def test_an_artefact_replaced_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    """A reader took the manifest of one version and the tensors of the next (`--force` run in between)."""
    import premoe.fileio as fileio

    out = tmp_path / "art"
    save_artefact(out, "a.json", {"format": "premoe-a/1", "version": 1}, "t.safetensors", {"t": torch.tensor([1.0])})
    real, calls = fileio._load_tensors, []

    def replaced_first(file, rebuild):
        if not calls:
            calls.append(file)
            save_artefact(out, "a.json", {"format": "premoe-a/1", "version": 2}, "t.safetensors",
                          {"t": torch.tensor([2.0])}, force=True)
        return real(file, rebuild)

    monkeypatch.setattr(fileio, "_load_tensors", replaced_first)
    manifest, tensors = load_artefact(out, "a.json", "premoe-a/1", "t.safetensors", "make it")
    assert (manifest["version"], tensors["t"].item()) == (2, 2.0)


def test_a_second_sweep_of_the_same_out_stops_before_computing(tmp_path, tiny_qwen3):
    """Two `sweep --out S` at once both computed every row and appended duplicates to S/rows.jsonl."""
    import fcntl

    from premoe.sweep import run_sweep

    out = tmp_path / "sweep"
    out.mkdir()
    write_marker(out, {"kind": "sweep"})
    with open(out / "rows.jsonl", "a") as first:  # the running sweep's lock
        fcntl.flock(first.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputExistsError, match=f"another premoe sweep is writing {out}.*rerun this command"):
            run_sweep(tiny_qwen3, tmp_path / "profile-never-read", out, progress=False)
    assert (out / "rows.jsonl").read_text() == ""


# --------------------------------------------------------------------------- model inputs


def test_a_hub_id_says_premoe_does_not_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingFileError, match=r"never downloads; run `huggingface-cli download Qwen/Qwen3-30B-A3B "
                                               r"--local-dir Qwen3-30B-A3B` and pass Qwen3-30B-A3B"):
        resolve_model_path("Qwen/Qwen3-30B-A3B")
    snapshot = tmp_path / "models--Org--Tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--Org--Tiny" / "refs").mkdir()
    (tmp_path / "models--Org--Tiny" / "refs" / "main").write_text("abc123\n")
    with pytest.raises(MissingFileError, match=f"local directories only: pass {snapshot}$"):
        resolve_model_path("Org/Tiny")
    with pytest.raises(MissingFileError, match="pass a local checkpoint directory or one of testbed"):
        resolve_model_path("./Org/Tiny")


def test_a_pytorch_bin_checkpoint_says_how_to_convert(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(MissingFileError, match=r"holds PyTorch \.bin weights.*save_pretrained\('.*-st'\)"):
        shard_files(tmp_path)


def test_a_dense_model_is_one_clear_line(capsys, monkeypatch, tmp_path):
    """The message ended "is this a Mixture-of-Experts model?. Supported families: ..."."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = tmp_path / "dense"
    Qwen3ForCausalLM(Qwen3Config(**tiny.COMMON, intermediate_size=64)).save_pretrained(model)
    tiny.tiny_tokenizer().save_pretrained(model)
    (tmp_path / "t.txt").write_text(tiny.TEXT)
    capsys.readouterr()  # transformers' save progress bar
    err = fails(capsys, monkeypatch, "profile", model, "--data", f"x={tmp_path / 't.txt'}", "--max-tokens", "32",
                "--seq-len", "16", "--out", tmp_path / "p", expect="a dense model has no experts to prune")
    assert "?." not in err and not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- paths that are not UTF-8


def test_paths_that_are_not_utf8(tmp_path, tiny_qwen3):
    """A Latin-1 byte in a name (LANG=C): the model's tokenizer failed to load with a codec error, compile ended in
    an internal UnicodeEncodeError, and a profile written there was then refused as "corrupt or truncated"."""
    latin = os.fsdecode(b"caf\xe9")
    (tmp_path / latin).symlink_to(tiny_qwen3, target_is_directory=True)
    with pytest.raises(InputError, match="model path .* is not valid UTF-8.*rename the directory"):
        resolve_model_path(tmp_path / latin)
    with pytest.raises(InputError, match="output path .* is not valid UTF-8; .*choose a UTF-8 name"):
        check_inputs(tmp_path / f"{latin}-out", [])
    toy_profile().save(tmp_path / "prof")
    (tmp_path / "prof").rename(tmp_path / f"{latin}-prof")  # renamed by the user: still readable
    manifest, tensors = load_artefact(tmp_path / f"{latin}-prof", "profile.json", json.loads(
        (tmp_path / f"{latin}-prof" / "profile.json").read_text())["format"], "scores.safetensors", "premoe profile")
    assert manifest["domains"] and tensors


# --------------------------------------------------------------------------- export


def test_a_killed_exports_temp_is_removed_by_the_next(fake_llama, tmp_path):  # noqa: F811
    """The export's temp directory (a whole GGUF) had no process id in its name, so no later run removed it."""
    gguf = tmp_path / "m.gguf"
    stale = tmp_path / f".m.gguf.tmp-{_dead_pid()}-abcd"
    stale.mkdir()
    (stale / "model-f16.gguf").write_bytes(b"GGUF" + bytes(100))
    seen = []

    real = subprocess.run

    def converter(command, **kwargs):
        seen.append(next(Path(a).parent.name for a in command if str(a).endswith(".gguf")))
        return real(command, **kwargs)

    subprocess.run = converter
    try:
        export_gguf("testbed", gguf, llama_cpp=fake_llama)
    finally:
        subprocess.run = real
    assert not stale.exists() and gguf.is_file() and _temps(gguf) == []
    assert seen[0].startswith(f".m.gguf.tmp-{os.getpid()}-")


def test_the_sigterm_handler_is_restored_after_main(capsys, monkeypatch):
    """main() may run inside another program (tests, a notebook): its SIGTERM handling must not outlive it."""
    from premoe.cli import main

    seen = []
    monkeypatch.setattr("premoe.cli.cli.main", lambda **kwargs: seen.append(signal.getsignal(signal.SIGTERM)))
    before = signal.getsignal(signal.SIGTERM)
    main(["--version"])
    assert seen and seen[0] is not before  # SIGTERM unwinds while the verb runs ...
    assert signal.getsignal(signal.SIGTERM) is before  # ... and is the caller's again afterwards


def test_stopping_a_server_says_it_stopped_not_that_a_run_was_lost(capsys, monkeypatch):
    """serve and route run until stopped: Ctrl-C there is the normal end, not an interrupted write."""
    from premoe.cli import _verb, main

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("premoe.cli.cli.main", interrupted)
    for verb, said in [("serve", "premoe: serve stopped (Ctrl-C)"), ("route", "premoe: route stopped (Ctrl-C)"),
                       ("compile", "premoe: interrupted; outputs are written atomically, rerun the same command")]:
        with pytest.raises(SystemExit) as stopped:
            main([verb, "x"])
        assert stopped.value.code == 130 and capsys.readouterr().err.strip() == said
    assert _verb(["--help"]) is None and _verb(["-v", "store", "build"]) == "store"


def test_every_shipped_testbed_name_is_an_input_folder():
    """model_input knew only "testbed": testbed-dsv3's shipped folder was not among a command's inputs."""
    from premoe.cli.options import model_input
    from premoe.modeling import TESTBEDS, shipped_dir

    assert {name: model_input(name) for name in TESTBEDS} == {name: shipped_dir(name) for name in TESTBEDS}
    assert model_input("some/dir") == Path("some/dir") and model_input(None) is None
