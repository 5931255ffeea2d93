"""Calibration and evaluation text: where it comes from and how it becomes token windows.

A data source is given as ``NAME=PATH`` (or a testbed domain name):

* a ``.txt`` file (one document) or a directory of ``.txt`` files;
* a ``.jsonl`` / ``.jsonl.gz`` file with a ``text`` field, or chat ``messages``
  (rendered with the model's chat template);
* ``testbed`` (every trained testbed domain) or a testbed domain name, with an
  optional split: ``python``, ``python:test``, ``testbed:val``.
"""
from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from premoe.errors import InputError, MissingFileError

DEFAULT_SPLIT = "calib"


CHARS_PER_TOKEN = 32  # no tokenizer makes a token of more than ~32 characters: text beyond the budget is unused
_CHUNK = 1 << 20  # bytes read per call from a text file
LINE_LIMIT = 64 << 20  # bytes of one .jsonl record: longer lines are refused, not read into memory whole
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # a domain name: used in tensor keys and file names


@dataclass
class Source:
    name: str
    texts: list[str]
    origin: str  # recorded in artefacts: testbed:<domain>:<split>, or the absolute path (rereadable from any cwd)


def text_budget(max_tokens: int | None) -> int | None:
    """Characters of text that surely hold ``max_tokens`` tokens (None: no limit); reading stops there."""
    return None if max_tokens is None else max(int(max_tokens), 2) * CHARS_PER_TOKEN


def parse_sources(specs: list[str], tokenizer=None, split: str = DEFAULT_SPLIT,
                  max_tokens: int | None = None) -> list[Source]:
    """Turn ``--data`` arguments into named sources of documents.

    With ``max_tokens``, each source is read only as far as that many tokens can reach (see :func:`text_budget`),
    so a huge file or directory costs no more than the tokens used.

    >>> [s.name for s in parse_sources(["testbed"])]
    ['python', 'en_docs', 'de', 'fr', 'bible', 'math']
    """
    if not specs:
        raise InputError("no data given; pass --data NAME=PATH (or --data testbed for the shipped domains)")
    budget = text_budget(max_tokens)
    sources: list[Source] = []
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep:
            sources.extend(_testbed_sources(spec, split, budget))
            continue
        if not name:
            raise InputError(f"--data {spec!r} has an empty NAME; write NAME=PATH")
        if not _NAME.fullmatch(name):
            raise InputError(f"--data {spec!r}: NAME {name!r} may hold letters, digits and _ . + - only "
                             "(up to 64, starting with a letter or digit); it names the domain in artefacts")
        if not where.strip():
            raise InputError(f"--data {spec!r} has an empty PATH; write NAME=PATH to a .txt, .jsonl or directory")
        sources.append(Source(name, read_texts(Path(where), tokenizer, budget), _absolute(where)))
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"data name {', '.join(duplicates)} given twice; each --data needs its own NAME")
    for source in sources:
        if not any(t.strip() for t in source.texts):
            raise InputError(f"data {source.name!r} ({source.origin}) contains no text")
    return sources


def data_paths(specs) -> list[Path]:
    """The file-system paths ``--data`` specs read: each ``NAME=PATH``, and the shipped corpus for testbed names.

    Outputs are checked against these (:func:`premoe.fileio.check_output`), so ``--out`` can never replace the
    corpus a testbed domain was just read from.
    """
    from premoe import testbed

    paths = []
    for name, sep, where in (str(s).partition("=") for s in specs or ()):
        if sep and where.strip():
            paths.append(Path(where))
        elif not sep and testbed.corpus_path() not in paths:
            paths.append(testbed.corpus_path())
    return paths


def source_origins(specs: list[str], split: str = DEFAULT_SPLIT) -> dict[str, str]:
    """``{name: origin}`` of ``--data`` specs, as :func:`parse_sources` records them, without reading any text."""
    origins = {}
    for spec in specs:
        name, sep, where = spec.partition("=")
        origins.update({name: _absolute(where)} if sep
                       else {n: f"testbed:{n}:{s}" for n, s in _testbed_names(spec, split)})
    return origins


def _absolute(where: str) -> str:
    """A data path as artefacts record it: absolute, so a later command run elsewhere rereads the same file."""
    return os.path.abspath(where)


def _testbed_names(spec: str, default_split: str) -> list[tuple[str, str]]:
    """(domain, split) pairs a testbed spec (``testbed``, ``python``, ``python:test``) stands for."""
    from premoe import testbed

    domain, _, split = spec.partition(":")
    split = split or default_split
    if split not in ("calib", "val", "test"):
        raise InputError(f"unknown split {split!r} in {spec!r}; use calib, val or test")
    all_domains = testbed.domains(trained_only=False)
    if domain == "testbed":
        names = testbed.domains()
    elif domain in all_domains:
        names = [domain]
    else:
        raise InputError(f"unknown data {spec!r}: not NAME=PATH and not a testbed domain "
                         f"({', '.join(all_domains)}); write e.g. --data mydomain=texts.jsonl")
    return [(n, split) for n in names]


def _testbed_sources(spec: str, default_split: str, budget: int | None) -> list[Source]:
    from premoe import testbed

    return [Source(n, read_texts(testbed.corpus_path() / n / f"{split}.jsonl.gz", max_chars=budget),
                   f"testbed:{n}:{split}") for n, split in _testbed_names(spec, default_split)]


def read_texts(path: Path, tokenizer=None, max_chars: int | None = None) -> list[str]:
    """Documents from a text file, a directory of text files, or JSONL (``text`` or chat ``messages``).

    Reads at most about ``max_chars`` characters (whole documents, then stops). Text must be UTF-8: binary
    files (NUL bytes) and other encodings are refused with the offset and the fix, never decoded to U+FFFD.
    Devices, pipes and sockets are refused (``/dev/zero`` would never end).
    """
    path = Path(path)
    if not str(path).strip():
        raise InputError("a data path is empty; write NAME=PATH to a .txt, .jsonl or directory")
    if not path.exists():
        shown = str(path) if str(path).isprintable() else repr(str(path))  # a control character is invisible
        raise MissingFileError(f"data path {shown} does not exist")
    if path.is_dir():
        texts, left = [], max_chars
        for file in _text_files(path):
            if left is not None and left <= 0:
                break
            texts.append(_read_text_file(file, left))
            left = None if left is None else left - len(texts[-1])
        if not texts and left != 0:
            raise InputError(f"directory {path} holds no .txt files")
        return texts
    _check_regular(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path, tokenizer, max_chars)
    if path.name.lower().endswith(".json"):  # a JSON array of records would be calibrated on as raw JSON syntax
        raise InputError(f"{path} is a .json file; premoe reads .jsonl (one {{\"text\": ...}} object per line), "
                         ".jsonl.gz or .txt: convert it to .jsonl, or rename it .txt to use its raw text")
    return [_read_text_file(path, max_chars)]


def _check_regular(file: Path) -> None:
    if not file.is_file():
        raise InputError(f"data path {file} is not a regular file (a device, pipe or socket); "
                         "give a .txt or .jsonl file, or a directory of .txt files")


def _text_files(directory: Path):
    """``*.txt`` files under ``directory`` in sorted path order, found lazily (a huge tree is not walked whole)."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise InputError(f"cannot list data directory {directory} ({e.strerror})") from e
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _text_files(Path(entry.path))
        elif entry.name.endswith(".txt"):
            file = Path(entry.path)
            _check_regular(file)
            yield file


def _read_text_file(file: Path, max_chars: int | None) -> str:
    """A UTF-8 text file, read in chunks until ``max_chars`` characters (or the end)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    parts, chars, offset = [], 0, 0
    size = _CHUNK if max_chars is None else min(_CHUNK, max(4096, max_chars))
    with open(file, "rb") as f:
        while max_chars is None or chars < max_chars:
            chunk = f.read(size)
            _check_not_binary(chunk, file, offset)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise _not_utf8(file, offset + max(e.start, 0), e) from e
            parts.append(text)
            chars += len(text)
            offset += len(chunk)
            if not chunk:
                break
    return "".join(parts)


def _check_not_binary(chunk: bytes, file: Path, offset: int, line: int | None = None) -> None:
    nul = chunk.find(b"\0")
    if nul >= 0:
        where = f"{file}:{line}" if line else f"{file}"
        raise InputError(f"{where} is binary, not text (NUL byte at byte {offset + nul}); give UTF-8 text files")


def _not_utf8(file: Path, offset: int, error: UnicodeDecodeError, line: int | None = None) -> InputError:
    where = f"{file}:{line}" if line else f"{file} at byte {offset}"
    bad = error.object[error.start:error.start + 1].hex()
    return InputError(f"{where} is not UTF-8 (byte 0x{bad}); convert it, e.g. "
                      f"`iconv -f latin1 -t utf-8 {file} > utf8-{file.name}`")


def _read_jsonl(path: Path, tokenizer, max_chars: int | None) -> list[str]:
    """Documents of a ``.jsonl`` / ``.jsonl.gz`` file, one record a line, until ``max_chars`` characters."""
    opener = gzip.open if path.name.endswith(".gz") else open
    texts, chars, number = [], 0, 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(iter(lambda: f.readline(LINE_LIMIT + 1), b""), 1):
                if max_chars is not None and chars >= max_chars:
                    break
                if len(raw) > LINE_LIMIT:  # e.g. a gzip bomb without newlines: never read it whole
                    raise InputError(f"{path}:{number} is longer than {LINE_LIMIT >> 20} MB; write one record per "
                                     "line, each below that")
                if not raw.strip():
                    continue
                texts.append(_valid_unicode(_record_text(_parse_line(raw, path, number), path, number, tokenizer),
                                            path, number))
                chars += len(texts[-1])
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(f"{path}:{number + 1} is a corrupt or truncated gzip file ({e}); recompress it with gzip, "
                         "or give the plain .jsonl") from e
    return texts


def _parse_line(raw: bytes, path: Path, number: int) -> dict:
    _check_not_binary(raw, path, 0, number)
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e.start, e, number) from e
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{number} is not valid JSON ({e.msg} at column {e.colno}); "
                         "write one JSON object per line") from e
    except RecursionError as e:
        raise InputError(f"{path}:{number} is nested too deeply to read; write one flat JSON object per line") from e
    if not isinstance(record, dict):
        raise InputError(f"{path}:{number} is a JSON {type(record).__name__}, not an object; "
                         'write {"text": "..."} per line')
    return record


def _valid_unicode(text: str, path: Path, number: int) -> str:
    """``text`` if it encodes as UTF-8: a JSON escape such as "\\ud800" decodes to a lone surrogate no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{path}:{number} holds a lone surrogate ({text[e.start]!r} at character {e.start} of the "
                         "text, from a JSON \\u escape), not valid Unicode; fix or drop that record") from e
    return text


def _record_text(record: dict, path: Path, number: int, tokenizer) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("messages"), list):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError(f"{path}:{number} has chat 'messages' but the model has no chat template; "
                             "give plain 'text' records instead")
        try:
            text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        except Exception as e:  # the template is the model's own Jinja code: any error means bad messages
            raise InputError(f"{path}:{number}: the chat template cannot render these 'messages' ({e}); "
                             "give a list of {\"role\": ..., \"content\": \"...\"} objects") from e
        if not isinstance(text, str):
            raise InputError(f"{path}:{number}: the chat template did not render text; give 'text' records instead")
        return text
    raise InputError(f"{path}:{number} has neither a 'text' string nor a 'messages' list")


def token_windows(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Documents joined by EOS and cut into full windows: (windows, seq_len) int64.

    Full windows only, so every window has the same context length; a text
    shorter than one window becomes a single shorter window.
    """
    eos = tokenizer.eos_token or ""
    text = eos.join(texts) + eos
    if max_tokens is not None:  # text beyond the budget cannot reach max_tokens tokens: skip it untokenised
        text = text[: text_budget(max_tokens)]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long on purpose
    if max_tokens is not None:
        ids = ids[: max(max_tokens, 2)]
    if len(ids) < seq_len:
        return torch.tensor([ids], dtype=torch.long)
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)  # (windows, seq)
