"""Build the offline multi-domain corpus from Debian packages.

Run it as ``premoe testbed corpus --out DIR``. Every domain is a list of
documents; documents are assigned to exactly one split (test, val, calib,
train) by a hash of their id, so no document appears in two splits and a
rebuild on another machine with the same package versions gives the same
splits. Two domains (``c_headers``, ``es``) never get a train split: they are
the unseen domains used to test retrieval's fallback.

Layout written::

    DIR/manifest.json
    DIR/<domain>/<split>.jsonl.gz     one {"id": ..., "text": ...} per line
"""
from __future__ import annotations

import concurrent.futures as futures
import gzip
import hashlib
import html
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from premoe.errors import InputError, OutputExistsError, PremoeError
from premoe.fileio import write_dir

SPLITS = ("train", "calib", "val", "test")
MAX_DOC_CHARS = 48_000  # long files are cut so one document cannot dominate a split


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    packages: tuple[str, ...]  # Debian packages the text comes from
    licence: str
    documents: Callable[[], Iterator[tuple[str, str]]]  # yields (doc id, text)
    trained: bool = True  # False: kept out of training (an unseen domain)


@dataclass
class Caps:
    """Per-domain size caps in characters (bytes for ASCII text)."""

    train: int = 6_000_000  # enough text for ~1.5M tokens per domain
    calib: int = 240_000  # shipped with the package
    val: int = 120_000  # shipped
    test: int = 120_000  # shipped
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- sources


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _python_docs() -> Iterator[tuple[str, str]]:
    root = Path("/usr/lib/python3.11")
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        yield str(path.relative_to(root)), _read(path)


def _en_docs() -> Iterator[tuple[str, str]]:
    root = Path("/usr/share/doc/python3.11/html/_sources")
    for path in sorted(root.rglob("*.rst.txt")):
        yield str(path.relative_to(root)), _read(path)


def _render_man(path: Path) -> str:
    man = subprocess.run(
        ["man", "--nh", "--nj", "-l", str(path)],
        capture_output=True, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    col = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True)
    return col.stdout.decode("utf-8", errors="replace")


def _man_pages(lang: str) -> Iterator[tuple[str, str]]:
    root = Path("/usr/share/man") / lang
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    with futures.ThreadPoolExecutor(max_workers=4) as pool:
        for path, text in zip(paths, pool.map(_render_man, paths)):
            if len(text) > 200:
                yield f"man/{path.relative_to(root)}", text


_TAG = re.compile(r"<[^>]+>")


def _html_text(path: Path) -> str:
    raw = _read(path)
    raw = re.sub(r"(?s)<(script|style)[^>]*>.*?</\1>", " ", raw)
    text = html.unescape(_TAG.sub(" ", raw))
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def _debian_reference(lang: str) -> Iterator[tuple[str, str]]:
    for path in sorted(Path("/usr/share/debian-reference").glob(f"*.{lang}.html")):
        text = _html_text(path)
        # the chapters are long: split into ~8 KB documents at paragraph breaks
        for i, chunk in enumerate(_chunks(text, 8000)):
            yield f"debian-reference/{path.name}#{i}", chunk


def _chunks(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.rfind("\n", start, start + size)
        end = len(text) if end <= start or start + size >= len(text) else end
        yield text[start:end]
        start = end + 1


def _language(lang: str) -> Callable[[], Iterator[tuple[str, str]]]:
    def documents() -> Iterator[tuple[str, str]]:
        yield from _man_pages(lang)
        if lang in ("de", "fr"):
            yield from _debian_reference(lang)

    return documents


def _bible() -> Iterator[tuple[str, str]]:
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True)
    chapters: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        match = re.match(r"^(\S+?\d*:)\d+ (.*)$", line)
        if match:  # "Ge1:1 In the beginning" -> chapter key "Ge1"
            chapters.setdefault(match.group(1)[:-1], []).append(line)
    for key, verses in chapters.items():
        yield f"kjv/{key}", "\n".join(verses)


def _c_headers() -> Iterator[tuple[str, str]]:
    for path in sorted(Path("/usr/include").rglob("*.h")):
        yield str(path), _read(path)


_NAMES = ["Anna", "Ben", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells", "boxes", "tickets"]


def _math_problem(rng: random.Random) -> str:
    """One synthetic arithmetic/algebra problem with a worked answer."""
    kind = rng.randrange(6)
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind == 0:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?\nAnswer: {a} + {b} = {a + b}."
    if kind == 1:
        big, small = max(a, b), min(a, b)
        return f"{name} had {big} {item} and gave away {small}. How many are left?\nAnswer: {big} - {small} = {big - small}."
    if kind == 2:
        return f"{name} buys {c} packs of {item} with {a} in each pack. How many {item} in total?\nAnswer: {c} * {a} = {c * a}."
    if kind == 3:
        x = rng.randint(-20, 20)
        return f"Solve for x: {c}x + {a} = {c * x + a}.\nSolution: {c}x = {c * x + a} - {a} = {c * x}, so x = {x}."
    if kind == 4:
        return f"Compute ({a} + {b}) * {c}.\nAnswer: ({a} + {b}) * {c} = {a + b} * {c} = {(a + b) * c}."
    q, r = divmod(a * c + b % c, c)
    return f"Divide {a * c + b % c} by {c}.\nAnswer: {a * c + b % c} = {c} * {q} + {r}, so the quotient is {q} and the remainder is {r}."


def _math() -> Iterator[tuple[str, str]]:
    rng = random.Random(1234)
    for doc in range(6000):
        problems = [f"Problem {i + 1}. {_math_problem(rng)}" for i in range(rng.randint(8, 16))]
        yield f"synthetic/{doc:05d}", "\n\n".join(problems)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("python", "CPython 3.11 standard library sources", ("libpython3.11-stdlib",), "PSF-2.0", _python_docs),
        Domain("en_docs", "Python 3.11 documentation (reST sources)", ("python3.11-doc",), "PSF-2.0", _en_docs),
        Domain("de", "German manual pages and Debian reference", ("manpages-de", "debian-reference-de"), "GPL-3.0+/GPL-2.0+ (per page)", _language("de")),
        Domain("fr", "French manual pages and Debian reference", ("manpages-fr", "debian-reference-fr"), "GPL-3.0+/GPL-2.0+ (per page)", _language("fr")),
        Domain("bible", "King James Bible, one chapter per document", ("bible-kjv", "bible-kjv-text"), "public domain", _bible),
        Domain("math", "SYNTHETIC arithmetic and algebra word problems (generated, seed 1234)", (), "CC0 (generated by premoe)", _math),
        Domain("c_headers", "C headers from /usr/include (unseen: not trained on)", ("libc6-dev",), "LGPL-2.1+ and others", _c_headers, trained=False),
        Domain("es", "Spanish manual pages (unseen: not trained on)", ("manpages-es",), "GPL (per page)", _language("es"), trained=False),
    )
}


# --------------------------------------------------------------------------- build


def _installed_version(package: str) -> str | None:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    version = result.stdout.strip()
    return version if result.returncode == 0 and version else None


def ensure_packages(packages: list[str]) -> dict[str, str]:
    """Install missing Debian packages with apt-get (saying so) and return their versions."""
    tools = ["man-db", "bsdextrautils"]  # man and col render the manual pages
    needed = sorted({p for p in packages + tools if _installed_version(p) is None})
    if needed:
        print(f"premoe: installing Debian packages with apt-get: {' '.join(needed)}", file=sys.stderr)
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        result = subprocess.run(["apt-get", "install", "-y", "-qq", *needed], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise PremoeError(
                f"apt-get could not install {' '.join(needed)}: {result.stderr.strip().splitlines()[-1:]}; "
                "install them yourself (as root) and run again"
            )
    return {p: _installed_version(p) or "unknown" for p in packages}


def _split_of(doc_id: str, domain: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document."""
    digest = hashlib.sha256(f"{domain}/{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(domain: Domain, caps: Caps) -> dict[str, list[dict]]:
    """Assign each document to one split, in hash order, filling test, val, calib, then train."""
    docs = [(i, t[:MAX_DOC_CHARS]) for i, t in domain.documents() if t.strip()]
    docs.sort(key=lambda d: _split_of(d[0], domain.name))
    order = ["test", "val", "calib"] + (["train"] if domain.trained else [])
    splits: dict[str, list[dict]] = {s: [] for s in order}
    sizes = dict.fromkeys(order, 0)
    current = 0
    for doc_id, text in docs:
        while current < len(order) and sizes[order[current]] >= getattr(caps, order[current]):
            current += 1
        if current == len(order):
            break
        split = order[current]
        splits[split].append({"id": doc_id, "text": text})
        sizes[split] += len(text)
    return splits


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    # mtime=0 keeps the compressed bytes identical between rebuilds
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode())


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_corpus(out: Path, domains: list[str] | None = None, caps: Caps | None = None, force: bool = False) -> dict:
    """Build the corpus into ``out`` (via a temp dir, renamed at the end) and return its manifest.

    Example::

        build_corpus(Path("corpus"), domains=["python", "bible"])
    """
    caps = caps or Caps()
    names = domains or list(DOMAINS)
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise InputError(f"unknown domain {', '.join(unknown)}; choose from {', '.join(DOMAINS)}")
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    versions = ensure_packages([p for n in names for p in DOMAINS[n].packages])
    manifest: dict = {"format": "premoe-corpus/1", "domains": {}, "caps": {s: getattr(caps, s) for s in SPLITS}}

    def write(tmp: Path) -> None:
        for name in names:
            domain = DOMAINS[name]
            print(f"premoe: building domain {name} ...", file=sys.stderr)
            splits = split_documents(domain, caps)
            (tmp / name).mkdir()
            info = {
                "description": domain.description,
                "licence": domain.licence,
                "trained": domain.trained,
                "packages": {p: versions[p] for p in domain.packages},
                "splits": {},
            }
            for split, records in splits.items():
                write_jsonl_gz(tmp / name / f"{split}.jsonl.gz", records)
                info["splits"][split] = {"documents": len(records), "bytes": sum(len(r["text"].encode()) for r in records)}
            manifest["domains"][name] = info
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    write_dir(out, write, force=force)
    return manifest
