"""The `premoe` command's entry point: the CLI imported under a guard, so Ctrl-C while it loads says one line.

``premoe.cli`` installs its own handling (:func:`premoe.cli.main`) only once imported; a Ctrl-C during that import
(click and premoe's CLI modules, ~0.1 s) printed a KeyboardInterrupt traceback. Nothing is written by then.
A closed standard output is refused here too, as coreutils refuse to write to one.
"""
from __future__ import annotations

import sys


def main() -> None:
    if sys.stdout is None:  # started with fd 1 closed (`>&-`): Python drops every print, and premoe exited 0
        if sys.stderr is not None:
            sys.stderr.write("premoe: standard output is closed (>&-), so what premoe prints would be lost; "
                             "redirect it instead (> FILE, or > /dev/null to discard it)\n")
        raise SystemExit(2)
    try:
        from premoe.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("premoe: interrupted while starting; nothing was written\n")
        raise SystemExit(130) from None
    run()
