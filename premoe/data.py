"""Calibration and evaluation text: where it comes from and how it becomes token windows.

A data source is given as ``NAME=PATH`` (or a testbed domain name):

* a ``.txt`` file (one document) or a directory of ``.txt`` files;
* a ``.jsonl`` / ``.jsonl.gz`` file with a ``text`` field, or chat ``messages``
  (rendered with the model's chat template);
* ``testbed`` (every trained testbed domain) or a testbed domain name, with an
  optional split: ``python``, ``python:test``, ``testbed:val``.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from premoe.errors import InputError, MissingFileError

DEFAULT_SPLIT = "calib"


@dataclass
class Source:
    name: str
    texts: list[str]
    origin: str  # what the user passed, recorded in artefacts


def parse_sources(specs: list[str], tokenizer=None, split: str = DEFAULT_SPLIT) -> list[Source]:
    """Turn ``--data`` arguments into named sources of documents.

    >>> [s.name for s in parse_sources(["testbed"])]
    ['python', 'en_docs', 'de', 'fr', 'bible', 'math']
    """
    if not specs:
        raise InputError("no data given; pass --data NAME=PATH (or --data testbed for the shipped domains)")
    sources: list[Source] = []
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep:
            sources.extend(_testbed_sources(spec, split))
            continue
        if not name:
            raise InputError(f"--data {spec!r} has an empty NAME; write NAME=PATH")
        sources.append(Source(name, read_texts(Path(where), tokenizer), where))
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"data name {', '.join(duplicates)} given twice; each --data needs its own NAME")
    for source in sources:
        if not any(t.strip() for t in source.texts):
            raise InputError(f"data {source.name!r} ({source.origin}) contains no text")
    return sources


def _testbed_sources(spec: str, default_split: str) -> list[Source]:
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
    return [Source(n, read_texts(testbed.corpus_path() / n / f"{split}.jsonl.gz"), f"testbed:{n}:{split}") for n in names]


def read_texts(path: Path, tokenizer=None) -> list[str]:
    """Documents from a text file, a directory of text files, or JSONL (``text`` or chat ``messages``)."""
    if not path.exists():
        raise MissingFileError(f"data path {path} does not exist")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise InputError(f"directory {path} holds no .txt files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return [_record_text(r, path, i, tokenizer) for i, r in enumerate(_read_jsonl(path))]
    return [path.read_text(encoding="utf-8", errors="replace")]


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number} is not valid JSON ({e.msg})") from e
    return records


def _record_text(record: dict, path: Path, index: int, tokenizer) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("messages"), list):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError(f"{path} line {index + 1} has chat 'messages' but the model has no chat template; "
                             "give plain 'text' records instead")
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    raise InputError(f"{path} line {index + 1} has neither a 'text' string nor a 'messages' list")


def token_windows(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Documents joined by EOS and cut into full windows: (windows, seq_len) int64.

    Full windows only, so every window has the same context length; a text
    shorter than one window becomes a single shorter window.
    """
    eos = tokenizer.eos_token or ""
    text = eos.join(texts) + eos
    if max_tokens is not None:  # no tokenizer makes a token of more than ~32 characters: skip the rest unread
        text = text[: max(max_tokens, 2) * 32]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long on purpose
    if max_tokens is not None:
        ids = ids[: max(max_tokens, 2)]
    if len(ids) < seq_len:
        return torch.tensor([ids], dtype=torch.long)
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)  # (windows, seq)
