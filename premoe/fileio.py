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


def save_artefact(out: str | Path, manifest_name: str, manifest: dict, tensors_name: str | None = None,
                  tensors: dict | None = None, force: bool = False) -> Path:
    """Write a versioned artefact directory (a JSON manifest + optional safetensors) atomically.

    Profiles, stores and the like share this one writer: refuse to overwrite
    without ``force``, fill a temp dir, rename.
    """
    import json

    from premoe.errors import OutputExistsError

    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")

    def write(tmp: Path) -> None:
        if tensors_name is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in (tensors or {}).items()}, str(tmp / tensors_name))
        (tmp / manifest_name).write_text(json.dumps(manifest, indent=2) + "\n")

    return write_dir(out, write)


def load_artefact(path: str | Path, manifest_name: str, format: str, tensors_name: str, make_hint: str) -> tuple[dict, dict]:
    """Read what :func:`save_artefact` wrote: ``(manifest, tensors)``, checking the format version.

    ``make_hint`` is the command that makes this artefact, for the error when it is missing.
    """
    import json

    from safetensors.torch import load_file

    from premoe.errors import CheckpointError, MissingFileError

    path = Path(path)
    manifest_path = path / manifest_name
    if not manifest_path.exists():
        raise MissingFileError(f"{manifest_path} not found; make it with `{make_hint}`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != format:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}; this premoe reads {format}")
    return manifest, load_file(str(path / tensors_name))
