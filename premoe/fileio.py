"""Atomic file output, without torch (so ``premoe report`` stays light)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_dir(out: Path, write: Callable[[Path], object]) -> Path:
    """Write a directory atomically: ``write(tmp)`` fills a temp sibling, which is then renamed over ``out``.

    >>> write_dir(Path("report"), lambda tmp: (tmp / "report.md").write_text("# hi"))
    PosixPath('report')
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
