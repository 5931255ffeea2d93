"""Progress bars (issue 15.5, "duplicated progress bars"): one bar per long piece of work, on a terminal only.

Before: profile, verify and eval drew one bar per domain, a sweep's study profiles drew their own bars inside the
sweep's, every model load added transformers' "Loading weights" bar, and all of it went to stderr even when that
was a log file. The tests count the bars drawn on a fake terminal, and the bytes written to a non-terminal.
"""
import io
import re
import sys

import pytest

import tiny
from checkpoints import save_family, spread_plan
from premoe.compile import compile_checkpoint
from premoe.data import Source
from premoe.evaluate import Evaluator
from premoe.modeling import load_model, load_tokenizer
from premoe.profile import ProfileParams, profile_model
from premoe.progress import bar
from premoe.verify import verify

SOURCES = [Source("code", [tiny.TEXT[:600]], "tiny"), Source("bible", [tiny.TEXT[600:1700]], "tiny"),
           Source("de", [tiny.TEXT[1700:]], "tiny")]
PARAMS = ProfileParams(max_tokens=96, seq_len=32, batch_size=1)


class Terminal(io.StringIO):
    """stderr as a person's terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch):
    """Call it in the test body (pytest's capture replaces sys.stderr again after fixtures ran)."""
    def attach() -> Terminal:
        screen = Terminal()
        monkeypatch.setattr(sys, "stderr", screen)
        monkeypatch.delenv("PREMOE_QUIET", raising=False)
        return screen

    return attach


def bars(text: str) -> list[str]:
    """The descriptions of the bars drawn, one per bar (each bar first draws itself at 0)."""
    return re.findall(r"(?:^|\r)([^\r\n:]+): +0%\|", text)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.save("qwen3_moe", tmp_path_factory.mktemp("progress") / "qwen3")


def test_profiling_three_domains_draws_one_bar_and_no_loading_bar(model, terminal):
    screen = terminal()
    profile_model(model, SOURCES, ["router_mass"], PARAMS, progress=True)
    assert bars(screen.getvalue()) == ["profile"], repr(screen.getvalue())
    assert "Loading weights" not in screen.getvalue()
    assert re.search(r"profile: +0%\|.*\| 0/9 ", screen.getvalue()), "the one bar must cover the 3 x 3 windows"


def test_evaluating_three_domains_draws_one_bar(model, terminal):
    screen = terminal()
    evaluator = Evaluator(load_model(model), load_tokenizer(model), SOURCES, seq_len=32, batch_size=1, progress=True)
    evaluator.evaluate()
    assert bars(screen.getvalue()) == ["eval"]


def test_verify_draws_one_bar_for_every_domain_and_both_models(tmp_path, terminal):
    path, net, adapter = save_family("qwen3_moe", tmp_path / "src")
    compile_checkpoint(path, spread_plan(path, net, adapter), tmp_path / "out", progress=False)
    screen = terminal()
    verify(path, tmp_path / "out", SOURCES, max_tokens=64, seq_len=32, progress=True)
    assert bars(screen.getvalue()) == ["verify"]


def test_work_inside_a_bar_draws_none_of_its_own(model, terminal):
    """A sweep's rows re-profile and evaluate inside the sweep's bar: the sweep's bar is the only one."""
    screen = terminal()
    with bar(2, "sweep", "row") as rows:
        profile_model(model, SOURCES, ["router_mass"], PARAMS, progress=True)
        rows.update(2)
    assert bars(screen.getvalue()) == ["sweep"]


def test_no_bar_where_no_person_watches(model, monkeypatch, terminal):
    screen = terminal()
    monkeypatch.setenv("PREMOE_QUIET", "1")
    profile_model(model, SOURCES, ["router_mass"], PARAMS, progress=True)
    assert screen.getvalue() == ""
    monkeypatch.delenv("PREMOE_QUIET")
    log = io.StringIO()  # a log file or a pipe: not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    with bar(3, "compile", "B") as written:
        written.update(3)
    load_model(model)
    profile_model(model, SOURCES, ["router_mass"], PARAMS, progress=True)
    assert log.getvalue() == ""
