"""The command line: help, placeholders, one-line errors."""
import subprocess
import sys

import pytest

from premoe.cli import COMMANDS


def premoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from premoe.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    result = premoe("--help")
    assert result.returncode == 0
    for verb in ("profile", "plan", "compile", "verify", "eval", "store", "serve", "demo", "testbed"):
        assert verb in COMMANDS
        assert f"\n  {verb} " in result.stdout


@pytest.mark.parametrize("verb", list(COMMANDS))
def test_each_command_has_help(verb):
    result = premoe(verb, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["profile", "/nonexistent/model", "--data", "testbed", "--out", "/tmp/premoe-never"], "does not exist"),
    (["profile", "testbed", "--data", "klingon", "--out", "/tmp/premoe-never"], "unknown data 'klingon'"),
    (["testbed", "corpus", "--out", "/tmp/premoe-never", "--domains", "klingon"], "unknown domain klingon"),
    (["plan", "/nonexistent/profile", "--keep", "0.5", "--domain", "x", "--dry-run"], "/nonexistent/profile not found"),
])
def test_bad_input_is_one_line_and_nonzero(args, message):
    result = premoe(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_ctrl_c_while_the_cli_loads_is_one_line(monkeypatch, capsys):
    """The console script imports the CLI under a guard: an interrupt during that import is a line and exit 130."""
    import builtins

    from premoe import launch

    real = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "premoe.cli":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as e:
        launch.main()
    assert e.value.code == 130
    assert capsys.readouterr().err == "premoe: interrupted while starting; nothing was written\n"


def test_a_closed_standard_output_is_refused_not_silently_lost():
    """`premoe ... >&-`: Python drops every print when fd 1 is closed, so premoe said nothing and exited 0."""
    import subprocess
    import sys

    script = f"{sys.executable} -c 'from premoe.launch import main; main()' --help"
    closed = subprocess.run(["bash", "-c", script + " >&-"], capture_output=False, stderr=subprocess.PIPE,
                            text=True, timeout=120)
    assert closed.returncode == 2
    assert closed.stderr == ("premoe: standard output is closed (>&-), so what premoe prints would be lost; "
                             "redirect it instead (> FILE, or > /dev/null to discard it)\n")
    both = subprocess.run(["bash", "-c", script + " >&- 2>&-"], timeout=120)
    assert both.returncode == 2
    fine = subprocess.run(["bash", "-c", script + " > /dev/null"], stderr=subprocess.PIPE, text=True, timeout=120)
    assert fine.returncode == 0 and fine.stderr == ""
