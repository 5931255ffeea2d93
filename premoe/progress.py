"""Progress bars, one rule for every command: one bar per long piece of work, on stderr, only for a person.

- A bar is drawn only when stderr is a terminal and ``PREMOE_QUIET`` is unset
  (``TQDM_DISABLE=1`` works too): logs, pipes and CI get none of tqdm's
  carriage-return noise.
- One piece of work, one bar: a stage spanning several domains shows one bar
  over all of them (the domain in its postfix), and work nested inside
  another bar (a sweep's profiles and evaluations) shows none of its own.
- transformers' own "Loading weights" bar follows the same rule, and is
  shown only for checkpoints large enough to take a while (:func:`loading`).

Example::

    with domains_bar({"python": 12, "de": 8}, "profile", "win") as start:
        for domain in ("python", "de"):
            advance = start(domain)  # the bar now names the domain
            advance(4)               # 4 more windows done
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Callable, Iterator, Mapping

_INSIDE = contextvars.ContextVar("premoe_progress_inside", default=False)  # a bar is open: nested work stays quiet


def shown(requested: bool = True) -> bool:
    """Whether a new bar would be drawn: asked for, not nested in another, stderr a terminal, not quieted."""
    if not requested or _INSIDE.get() or os.environ.get("PREMOE_QUIET"):
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


@contextlib.contextmanager
def bar(total: float | None, desc: str, unit: str, *, enabled: bool = True, unit_scale: bool = False) -> Iterator:
    """A tqdm bar on stderr (disabled unless :func:`shown`); work inside the ``with`` draws no bar of its own."""
    from tqdm import tqdm

    progress = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=not shown(enabled),
                    file=sys.stderr, leave=False, dynamic_ncols=True)
    token = _INSIDE.set(True)
    try:
        yield progress
    finally:
        _INSIDE.reset(token)
        progress.close()


@contextlib.contextmanager
def domains_bar(work: Mapping[str, int], desc: str, unit: str, *,
                enabled: bool = True) -> Iterator[Callable[[str], Callable[[int], object]]]:
    """One bar over every domain's ``work`` ({domain: units}); ``start(domain)`` names the domain on the bar and
    returns ``advance(units)``."""
    with bar(sum(work.values()), desc, unit, enabled=enabled) as shown:
        def start(domain: str) -> Callable[[int], object]:
            shown.set_postfix_str(domain, refresh=False)
            return shown.update

        yield start


LONG_LOAD_BYTES = 2_000_000_000  # checkpoints this large take seconds to minutes to load: worth a bar


@contextlib.contextmanager
def loading(path) -> Iterator[None]:
    """Load the checkpoint at ``path`` with transformers' "Loading weights" bar only where it is worth one.

    Shown when :func:`shown` allows a bar and the .safetensors files hold at
    least :data:`LONG_LOAD_BYTES`; a small model (the testbed loads in well
    under a second) would otherwise print a bar per load — twice for verify,
    seven times in the demo — that looks like the same work repeated.
    """
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    if shown() and sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) >= LONG_LOAD_BYTES:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
