"""Option types and shared options of the CLI: every number is checked by click before anything runs.

A bad value fails with one line naming the option and the valid range, e.g.
``premoe: error: Invalid value for '--seq-len': 0 is not in the range x>=2.``

The ``--json`` convention, the same on every verb: ``--json FILE`` writes the JSON to FILE (an existing file is
replaced only with ``--force``, and only if premoe wrote it); ``--json -``, or a bare ``--json`` as the last
option, prints it to stdout instead of the human-readable text.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import click


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: ``nan`` and ``inf`` fail like an out-of-range value."""

    name = "finite float"

    def _describe_range(self) -> str:
        if self.min is None and self.max is None:  # click would print "x<=None" in --help
            return ""
        return super()._describe_range()

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


POSITIVE = click.IntRange(min=1)  # counts that must be at least one: tokens, windows, batch size
NON_NEGATIVE = click.IntRange(min=0)
SEQ_LEN = click.IntRange(min=2)  # one token predicts the next: a window needs two
FRACTION = FiniteFloat(min=0.0, max=1.0, min_open=True)  # keep ratios, quantiles: (0, 1]
POSITIVE_FLOAT = FiniteFloat(min=0.0, min_open=True)
NON_NEGATIVE_FLOAT = FiniteFloat(min=0.0)


class ListOf(click.ParamType):
    """A comma-separated list whose every item is checked by ``item`` (e.g. ``0.5,0.25`` with FRACTION)."""

    def __init__(self, item: click.ParamType, allow_empty: bool = True):
        self.item = item
        self.allow_empty = allow_empty  # False: "," or "" would silently drop every row the option drives
        self.name = f"list of {item.name}"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [self.item.convert(x.strip(), param, ctx) for x in str(value).split(",") if x.strip()]
        if not items and not self.allow_empty:
            self.fail(f"{value!r} lists no values; give at least one, e.g. 0.5", param, ctx)
        return items


def split_names(text: str) -> list[str]:
    """Comma-separated names; commas inside parentheses belong to a scorer spec like ``peu(a=1,b=2)``."""
    names, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            names.append(current.strip())
            current = ""
        else:
            current += ch
    return [n for n in [*names, current.strip()] if n]


class Device(click.ParamType):
    """A torch device that exists here: ``cpu``, ``cuda``, ``cuda:N`` (N below the GPU count) or ``mps``."""

    name = "device"
    _FORM = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")

    def convert(self, value, param, ctx):
        match = self._FORM.match(str(value))
        if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
            self.fail(f"{value!r} is not a device; use cpu, cuda, cuda:N or mps", param, ctx)
        kind, index = match.group(1), match.group(2)
        if kind == "cpu":
            return value
        import torch

        if kind == "mps" and not torch.backends.mps.is_available():
            self.fail("mps is not available on this machine; use cpu", param, ctx)
        if kind == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                self.fail(f"{value} is not available: this machine has no CUDA GPU; use cpu", param, ctx)
            if index is not None and int(index) >= count:
                self.fail(f"{value} does not exist: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}",
                          param, ctx)
        return value


def json_option(help_text: str = "Write the result as JSON to FILE ('-' or a bare --json: stdout).", **kwargs):
    """The one ``--json [FILE|-]`` option (see the module docstring)."""
    return click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="FILE|-",
                        type=click.Path(dir_okay=False, allow_dash=True), help=help_text, **kwargs)


def model_input(model: str | None) -> Path | None:
    """The directory a MODEL argument reads (a shipped testbed's name resolves to its folder); None when not local."""
    from premoe.modeling import TESTBEDS, shipped_dir

    if model is None:
        return None
    if str(model) in TESTBEDS:
        return shipped_dir(str(model))
    return Path(model)
