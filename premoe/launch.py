"""The `premoe` command's entry point: the CLI imported under a guard, so Ctrl-C while it loads says one line.

``premoe.cli`` installs its own handling (:func:`premoe.cli.main`) only once imported; a Ctrl-C during that import
(click and premoe's CLI modules, ~0.1 s) printed a KeyboardInterrupt traceback. Nothing is written by then.
"""
from __future__ import annotations

import sys


def main() -> None:
    try:
        from premoe.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("premoe: interrupted while starting; nothing was written\n")
        raise SystemExit(130) from None
    run()
