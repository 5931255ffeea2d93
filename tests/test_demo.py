"""`premoe demo` end to end at a reduced size (what a newcomer runs first)."""
import json
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-c", "from premoe.cli import main; main()", "demo", "--quick",
                             "--out", str(out), "--json", str(tmp_path / "demo.json")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads((tmp_path / "demo.json").read_text())
    assert all(diff < 1e-4 for diff in numbers["verify"].values()), numbers["verify"]
    assert (out / "report" / "report.html").stat().st_size > 10_000
    for name in ("python-50", "generalist-50"):
        config = json.loads((out / name / "config.json").read_text())
        assert config["num_local_experts"] == 16 and config["num_experts"] == 16
    assert "full ppl" in result.stdout and "demo finished" in result.stdout


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_rerun_after_an_interrupted_demo_starts_over(tmp_path, capsys):
    """Ctrl-C or a kill leaves an unfinished demo; the next run clears it without --force (issue 15.5)."""
    from premoe.demo import _prepare

    out = tmp_path / "demo"
    out.mkdir()
    (out / "profile").mkdir()
    (out / ".premoe").write_text(json.dumps({"written_by": "premoe", "kind": "demo", "complete": False,
                                             "pid": _dead_pid()}))
    _prepare(out, force=False)
    assert [p.name for p in out.iterdir()] == [".premoe"]
    assert json.loads((out / ".premoe").read_text())["complete"] is False
    assert "removing the unfinished demo" in capsys.readouterr().err


def test_a_finished_demo_needs_force_and_a_foreign_directory_is_never_replaced(tmp_path):
    import pytest

    from premoe.demo import _prepare
    from premoe.errors import OutputExistsError

    out = tmp_path / "demo"
    out.mkdir()
    (out / ".premoe").write_text(json.dumps({"written_by": "premoe", "kind": "demo", "complete": True}))
    with pytest.raises(OutputExistsError, match="--force"):
        _prepare(out, force=False)
    _prepare(out, force=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not written by premoe"):
        _prepare(mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_a_keep_the_testbed_cannot_compile_is_refused_before_anything_is_written(tmp_path):
    """--keep 0.01 of 32 experts is M = 1 < top-k 4: refused up front, not after the profiling step."""
    import pytest

    from premoe.demo import DemoConfig, run_demo
    from premoe.errors import PlanError

    out = tmp_path / "demo"
    with pytest.raises(PlanError, match=r"--keep 0.01 of 32 experts gives M = 1 .* nearest valid choice is M = 4"):
        run_demo(DemoConfig(out=out, keep=0.01))
    assert not out.exists()
