"""Safe file output and artefact loading, without torch (so ``premoe report`` and ``--help`` stay light).

Every premoe writer goes through this module, so one set of rules holds for all verbs:

* **Never touch an input.** An output may not equal, contain or lie inside any input path (symlinks resolved):
  :func:`check_output` refuses it before anything is computed.
* **``--force`` replaces only what premoe wrote.** An existing output is replaced only with ``--force``, and only
  when premoe made it: a directory carrying the ``.premoe`` marker (every directory premoe writes gets one) or the
  manifest of an older premoe artefact, or an empty directory; a file that is premoe's JSON (a ``format`` of
  ``premoe-*``) or empty. Anything else is refused even with ``--force``: remove it yourself if you mean it.
* **Atomic.** Output is written into a temp sibling ``.NAME.tmp-PID-XXXX`` and renamed into place; a temp left
  by a killed run is removed by the next run that writes the same output (its process is gone), or reported
  (its process still runs).
* **Ordinary permissions.** Outputs get ``0o777 & ~umask`` (directories) / ``0o666 & ~umask`` (files), not 0700.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

MARKER = ".premoe"  # left in every directory premoe writes; its presence lets --force replace the directory
MIN_FREE_BYTES = 1 << 20  # refuse to start a job whose output would land on a (nearly) full file system
_LEGACY_MANIFESTS = ("profile.json", "store.json", "results.json", "manifest.json", "config.json")
# formats of the manifests that hold a premoe directory together: never replaced by a --json or --out FILE
_DIRECTORY_MANIFESTS = ("premoe-profile/", "premoe-store/", "premoe-sweep/", "premoe-corpus/")
_TEMP = re.compile(r"\.(?:tmp|old)-(\d+)-")  # .NAME.tmp-PID-XXXX / .NAME.old-PID-XXXX


SMALL_FILE_BYTES = 64 << 20  # a plan, config or route config larger than this is not one


def read_small_text(path: str | Path, what: str, limit: int = SMALL_FILE_BYTES) -> str:
    """The UTF-8 text of a small file the user names (a plan, a config): a regular file or a pipe, at most ``limit``.

    A device such as /dev/zero would otherwise be read until memory runs out; a pipe is allowed so that
    process substitution (``premoe compile MODEL <(...)``) works. Raises ``UnicodeDecodeError`` for non-UTF-8.

    >>> read_small_text("plan.json", "plan")[:1]
    '{'
    """
    import stat

    from premoe.errors import InputError

    path = Path(path)
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise InputError(f"{what} {path} is not a regular file (a directory, device or socket); give a JSON file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{what} {path} is larger than {limit >> 20} MiB, too large for a {what}; is it the right "
                         "file?")
    return data.decode("utf-8")


# --------------------------------------------------------------------------- the guard


def check_output(out: str | Path, *, inputs: Iterable[str | Path | None] = (), force: bool = False,
                 kind: str = "dir", need_bytes: int = 0) -> Path:
    """Refuse an output that would destroy an input or something premoe did not write; call before computing.

    ``kind`` is ``"dir"`` or ``"file"``. ``inputs`` are the paths the command reads (``None`` entries are skipped).
    Also checks that the output's file system is writable and has ``need_bytes`` free, and clears temp dirs
    that a killed run left beside the output.

    >>> check_output("prof/", inputs=["model/", "texts.jsonl"], force=True)
    PosixPath('prof')
    """
    out = check_inputs(out, inputs)
    clean_stale_temps(out)  # first: an output a killed replacement set aside is back before it is checked
    if out.exists():
        if kind == "file":
            _check_not_a_manifest(out)
        check_replaceable(out, force=force, kind=kind)
    check_space(out, need_bytes)
    return out


def _check_not_a_manifest(out: Path) -> None:
    """Refuse an output file that is the manifest of a premoe directory (a profile's profile.json, a sweep's
    results.json): premoe wrote it, but replacing it with a --json report would break the whole directory."""
    from premoe.errors import OutputExistsError

    data = _read_json(out) if out.is_file() and out.stat().st_size < (64 << 20) else None
    form = str(data.get("format", "")) if isinstance(data, dict) else ""
    if form.startswith(_DIRECTORY_MANIFESTS):
        raise OutputExistsError(f"{out} is the manifest of the premoe {form.split('/')[0].removeprefix('premoe-')} "
                                f"in {out.parent}; replacing it would break that; choose another output file")


def check_inputs(out: str | Path, inputs: Iterable[str | Path | None]) -> Path:
    """Refuse an output path that is empty, a symlink, or equals, contains or lies inside one of ``inputs``."""
    from premoe.errors import InputError

    if not str(out).strip():  # before Path(), which reads "" as "."
        raise InputError("the output path is empty; name a file or directory to write")
    out = Path(out)
    if out.is_symlink():
        raise InputError(f"{out} is a symbolic link; name the real path ({_resolve(out)}) as the output")
    target = _resolve(out)
    require_utf8(target, "output", "; tokenizers, safetensors and JSON manifests cannot name it: choose a UTF-8 name")
    for given in inputs:
        if given is None or not str(given).strip():
            continue
        source = _resolve(Path(given))
        if target == source:
            raise InputError(f"the output {out} is the input {given}; write the output elsewhere")
        if source.is_relative_to(target):
            raise InputError(f"the output {out} contains the input {given}; writing it would replace the input; "
                             "write the output elsewhere")
        if target.is_relative_to(source) and source.is_dir():
            raise InputError(f"the output {out} lies inside the input {given}; write the output elsewhere")
    return out


def check_replaceable(out: Path, *, force: bool, kind: str = "dir") -> None:
    """Raise unless ``out`` (which exists) may be replaced: ``force`` given and premoe wrote it (or it is empty)."""
    from premoe.errors import OutputExistsError

    if not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    if kind == "dir":
        if not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory; remove it or choose another output")
        if not is_premoe_output(out) and any(out.iterdir()):
            raise OutputExistsError(f"{out} was not written by premoe (no {MARKER} marker), so --force does not "
                                    "replace it; remove it yourself or choose another output")
    else:
        if not out.is_file():
            raise OutputExistsError(f"{out} exists and is not a regular file; choose another output file")
        if out.stat().st_size and not _is_premoe_json(out):
            raise OutputExistsError(f"{out} was not written by premoe, so --force does not replace it; "
                                    "remove it yourself or choose another output file")


def is_premoe_output(path: Path) -> bool:
    """Whether premoe wrote directory ``path``: its marker, or the manifest of an artefact from an older premoe."""
    if (path / MARKER).is_file():
        return True
    names = {p.name for p in path.iterdir()}
    if {"report.html", "report.md"} <= names and all(n.endswith((".html", ".md", ".png")) for n in names):
        return True  # a report from a premoe before the marker
    if {"profile", "sweep", "report"} <= names and is_premoe_output(path / "profile"):
        return True  # a demo from a premoe before the marker
    for name in _LEGACY_MANIFESTS:
        file = path / name
        if file.is_file() and file.stat().st_size < (16 << 20):
            data = _read_json(file)
            if isinstance(data, dict) and (str(data.get("format", "")).startswith("premoe")
                                           or isinstance(data.get("premoe"), dict)):
                return True
    return False


def _is_premoe_json(file: Path) -> bool:
    data = _read_json(file) if file.stat().st_size < (64 << 20) else None
    return isinstance(data, dict) and str(data.get("format", "")).startswith("premoe")


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def require_utf8(path: Path, role: str, consequence_and_fix: str) -> None:
    """Refuse a path holding a byte that is not UTF-8 (a Latin-1 name, which Python decodes as a surrogate): the
    tokenizer and safetensors libraries cannot open it, and JSON cannot record it."""
    from premoe.errors import InputError

    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {role} path {str(path)!r} is not valid UTF-8{consequence_and_fix}") from None


def _resolve(path: Path) -> Path:
    from premoe.errors import InputError

    try:
        return Path(os.path.abspath(path.expanduser())).resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError for a symlink loop, 3.13 OSError
        raise InputError(f"{path} is a symlink loop ({e}); name a real file or directory") from e


def check_space(out: str | Path, need_bytes: int = 0, *, elsewhere: str = "choose another output") -> None:
    """Refuse, before any compute, an output whose file system is read-only, not writable or too full.

    ``elsewhere`` is the fix each message ends with (a scratch file names its own option: "pass --workdir ...").
    """
    from premoe.errors import DiskSpaceError

    parent = _existing_ancestor(_resolve(Path(out)).parent)
    if not parent.is_dir():
        raise DiskSpaceError(f"cannot write {out}: {parent} is a file, not a directory; {elsewhere}")
    stats = os.statvfs(parent)
    if stats.f_flag & os.ST_RDONLY:
        raise DiskSpaceError(f"cannot write {out}: {parent} is on a read-only file system; {elsewhere}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DiskSpaceError(f"cannot write {out}: no permission to write in {parent}; {elsewhere}")
    if stats.f_blocks == 0:  # procfs, sysfs: nothing can be written there however "free" it looks
        raise DiskSpaceError(f"cannot write {out}: {parent} is not on a disk (a virtual file system such as /proc "
                             f"or /sys); {elsewhere} on a real disk")
    free = stats.f_bavail * stats.f_frsize
    need = max(int(need_bytes), MIN_FREE_BYTES)
    if free < need:
        raise DiskSpaceError(f"cannot write {out}: it needs about {need / 1e6:.1f} MB but {parent} has "
                             f"{free / 1e6:.1f} MB free; free some space or {elsewhere} on another disk")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def clean_stale_temps(out: str | Path) -> list[Path]:
    """Remove the temp siblings (``.NAME.tmp-PID-*``) a killed run left for ``out``; report those still in use.

    Returns the paths removed. A temp whose process still runs, or whose name carries no process id (an older
    premoe), is only reported on stderr.
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.glob(f".{glob_escape(out.name)}.*"):
        rest = entry.name[len(out.name) + 1:]
        match = _TEMP.match(rest)
        if match is None:
            if rest.startswith((".tmp", ".old")):
                _note(f"{entry} looks left by an interrupted run of an older premoe; remove it if nothing is writing it")
            continue
        pid = int(match.group(1))
        if _alive(pid):
            if pid != os.getpid():
                _note(f"{entry} is being written by process {pid}; another premoe may be writing {out}")
            continue
        if rest.startswith(".old-") and not (out.exists() or out.is_symlink()):
            entry.rename(out)  # killed between setting the old output aside and renaming the new one in
            _note(f"restored {out} from {entry.name}, set aside by a run that was killed while replacing it")
            continue
        _remove(entry)
        removed.append(entry)
        _note(f"removed {entry}, left by an interrupted run (process {pid} is gone)")
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _note(message: str) -> None:
    print(f"premoe: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- atomic writers


def umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(out: Path, what: str = "tmp") -> str:
    """The name start of ``out``'s temp siblings; the process id in it lets :func:`clean_stale_temps` tell a killed
    run's leftovers (removed) from a live run's."""
    return f".{out.name}.{what}-{os.getpid()}-"


def nameless_file(prefix: str, suffix: str, directory: str | Path | None = None) -> tuple[int, Path]:
    """A new scratch file, open read-write and already unlinked: ``(fd, the name it had)``.

    Its space comes back however premoe ends (SIGKILL included), where a
    named temp file outlives a killed process; it is written and read (or
    mapped) through ``fd`` only, and the name is for messages.
    """
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.unlink(name)
    return fd, Path(name)


def write_dir(out: str | Path, write: Callable[[Path], object], *, marker: dict | None = None,
              mark: bool = True, force: bool = False) -> Path:
    """Write a directory atomically: ``write(tmp)`` fills a temp sibling, which is then renamed over ``out``.

    The temp carries this process's id in its name, so the next run can tell a killed run's leftovers from a
    live one. The directory gets the ``.premoe`` marker (with ``marker`` in it) and umask permissions; ``mark=False``
    leaves the marker out where the output names premoe itself (a compiled checkpoint's config.json carries a
    ``premoe`` block), so the folder holds only what a Hub upload should. An existing ``out`` is replaced only if
    premoe wrote it (callers check ``--force`` first); without ``force``, an ``out`` that another process created
    while this one worked is refused rather than replaced. A full disk while writing is a :class:`DiskSpaceError`
    naming the output.

    >>> write_dir(Path("report"), lambda tmp: (tmp / "report.md").write_text("# hi"))
    PosixPath('report')
    """
    out = Path(out)
    clean_stale_temps(out)
    refuse_if_appeared(out, force)  # callers checked --force when they started
    if out.exists() or out.is_symlink():  # premoe still replaces only what it wrote
        if out.is_symlink() or not out.is_dir() or (not is_premoe_output(out) and any(out.iterdir())):
            check_replaceable(out, force=True)  # raises for a file, or a directory premoe did not write
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    old = None
    try:
        with disk_errors(out):
            write(tmp)
            if mark:
                write_marker(tmp, marker)
        _ordinary_permissions(tmp)
        refuse_if_appeared(out, force)
        old = set_aside(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        put_back(out, old)
        raise
    if old is not None:
        _remove(old)
    return out


def set_aside(out: Path) -> Path | None:
    """Rename an existing ``out`` to ``.NAME.old-PID-XXXX`` while its replacement is put in place; None if absent.

    The old output survives an interrupted replacement: :func:`put_back` returns it on failure, and after a kill
    the next run's :func:`clean_stale_temps` does (the process id in the name tells it the run is gone).
    """
    if not (out.exists() or out.is_symlink()):
        return None
    old = out.with_name(f"{temp_prefix(out, 'old')}{os.urandom(4).hex()}")
    out.rename(old)
    return old


def put_back(out: Path, old: Path | None) -> None:
    """Return the output :func:`set_aside` moved, unless ``out`` holds a replacement (remove a half-built one
    first)."""
    if old is not None and not (out.exists() or out.is_symlink()):
        old.rename(out)


def refuse_if_appeared(out: Path, force: bool) -> None:
    """Without ``force``, refuse an ``out`` that exists now although the command checked it was free when it
    started: another process wrote it meanwhile, and replacing it would overwrite that without --force."""
    from premoe.errors import OutputExistsError

    if not force and (out.exists() or out.is_symlink()):
        raise OutputExistsError(f"{out} appeared while premoe was writing it (another process wrote it meanwhile); "
                                "kept it and dropped this run's output: rerun with --force to replace it")


@contextlib.contextmanager
def disk_errors(out: Path, fix: str = "free some space or write the output to another disk; nothing was "
                                     "replaced") -> Iterator[None]:
    """A full disk or exhausted quota while writing ``out``: a :class:`DiskSpaceError` naming its file system and
    ``fix`` (the OSError alone names neither: a write to an open file carries no file name)."""
    from premoe.errors import DiskSpaceError

    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        parent = _existing_ancestor(_resolve(out).parent)
        free = shutil.disk_usage(parent).free
        what = "is full" if e.errno == errno.ENOSPC else "quota is exhausted"
        raise DiskSpaceError(f"cannot write {out}: the disk holding {parent} {what} ({free / 1e6:.1f} MB free); "
                             f"{fix}") from e


def _ordinary_permissions(root: Path) -> None:
    """Directories ``0o777 & ~umask``, files ``0o666 & ~umask``: mkdtemp (0700) and some writers (0600) are stricter."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            if not os.path.islink(os.path.join(directory, name)):
                os.chmod(os.path.join(directory, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                os.chmod(os.path.join(directory, name), 0o666 & ~mask)


def read_marker(directory: str | Path) -> dict:
    """What the ``.premoe`` marker of ``directory`` says (its ``kind``: profile, sweep, demo, ...); {} if none."""
    data = _read_json(Path(directory) / MARKER)
    return data if isinstance(data, dict) else {}


def write_marker(directory: str | Path, info: dict | None = None) -> None:
    """Mark ``directory`` as written by premoe (so a later ``--force`` may replace it)."""
    from premoe import __version__

    text = json.dumps({"written_by": "premoe", "premoe_version": __version__, **(info or {})}) + "\n"
    (Path(directory) / MARKER).write_text(text)


def write_text_atomic(out: str | Path, text: str, *, force: bool = False) -> Path:
    """Write one text file atomically (temp file + rename); a failure leaves neither a temp nor a half file.

    Refuses to replace an existing file unless ``force`` and premoe wrote it (see :func:`check_replaceable`).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if out.is_symlink():
            from premoe.errors import InputError

            raise InputError(f"{out} is a symbolic link; name the real file ({out.resolve()}) as the output")
        check_replaceable(out, force=force, kind="file")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(out), dir=out.parent)
    tmp = Path(name)
    try:
        with disk_errors(out), os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        refuse_if_appeared(out, force)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def emit_json(dest: str | Path | None, data: dict, *, kind: str, force: bool = False,
              inputs: Iterable[str | Path | None] = ()) -> None:
    """The one ``--json`` convention: ``-`` prints to stdout, a path writes that file (guarded, atomic).

    ``data`` gets ``"format": "premoe-KIND/1"`` unless it has a format, so a later ``--force`` knows premoe wrote
    the file.
    """
    if dest is None:
        return
    data = data if "format" in data else {"format": f"premoe-{kind}/1", **data}
    text = json.dumps(data, indent=1, default=str)
    if str(dest) == "-":
        print(text)
        return
    check_output(dest, inputs=inputs, force=force, kind="file")
    write_text_atomic(dest, text + "\n", force=force)


# --------------------------------------------------------------------------- artefacts


def save_artefact(out: str | Path, manifest_name: str, manifest: dict, tensors_name: str | None = None,
                  tensors: dict | None = None, force: bool = False) -> Path:
    """Write a versioned artefact directory (a JSON manifest + optional safetensors) atomically.

    Profiles, stores and the like share this one writer: refuse to overwrite without ``force`` (and refuse to
    replace what premoe did not write), fill a temp dir, rename.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        check_output(out, force=force)

    def write(tmp: Path) -> None:
        if tensors_name is not None:  # serialised here, written by Python: a full disk is an OSError, which
            from safetensors.torch import save  # safetensors' own file writer hides in a SafetensorError

            (tmp / tensors_name).write_bytes(save({k: v.contiguous() for k, v in (tensors or {}).items()}))
        (tmp / manifest_name).write_text(json.dumps(manifest, indent=2) + "\n")

    return write_dir(out, write, marker={"kind": manifest_name.removesuffix(".json")}, force=force)


def load_artefact(path: str | Path, manifest_name: str, format: str, tensors_name: str, make_hint: str,
                  required: Iterable[str] = ()) -> tuple[dict, dict]:
    """Read what :func:`save_artefact` wrote: ``(manifest, tensors)``, checking the format version.

    Every way the files can be broken (missing, not a directory, truncated or corrupt JSON or safetensors, a
    manifest without a ``required`` key) raises one premoe error naming the file and saying to rebuild it with
    ``make_hint``, the command that makes this artefact. A directory that another run replaces (``--force``)
    while it is read is read again, so the manifest and the tensors always come from the same version.
    """
    for _ in range(3):
        version = _identity(path)
        loaded = _load_artefact_once(path, manifest_name, format, tensors_name, make_hint, required)
        if _identity(path) == version:
            break
    return loaded


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``: :func:`write_dir` renames a new directory into place, so it changes."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _load_artefact_once(path: str | Path, manifest_name: str, format: str, tensors_name: str, make_hint: str,
                        required: Iterable[str]) -> tuple[dict, dict]:
    from premoe.errors import CheckpointError, MissingFileError

    path = Path(path)
    rebuild = f"rebuild it with `{make_hint}`"
    if not path.exists():
        raise MissingFileError(f"{path} not found; make it with `{make_hint}`")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; {manifest_name.removesuffix('.json')} artefacts are "
                              f"directories made by `{make_hint}`")
    manifest_path = path / manifest_name
    if not manifest_path.exists():
        raise MissingFileError(f"{manifest_path} not found; make it with `{make_hint}`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{manifest_path} is corrupt or truncated ({_reason(e)}); {rebuild}") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path} is not a JSON object; {rebuild}")
    if manifest.get("format") != format:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}; this premoe reads {format}; {rebuild}")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise CheckpointError(f"{manifest_path} lacks {', '.join(missing)}; {rebuild}")
    tensors_path = path / tensors_name
    if not tensors_path.is_file():
        raise MissingFileError(f"{tensors_path} not found; {rebuild}")
    return manifest, _load_tensors(tensors_path, rebuild)


def _load_tensors(file: Path, rebuild: str) -> dict:
    from safetensors.torch import load

    from premoe.errors import CheckpointError

    try:  # read by Python: safetensors' own load_file cannot open a path that is not UTF-8 (LANG=C, Latin-1 names)
        return load(file.read_bytes())
    except OSError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError on a broken file
        raise CheckpointError(f"{file} is corrupt or truncated ({_reason(e)}); {rebuild}") from e


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (text[:120] + "...") if len(text) > 120 else text or type(error).__name__
