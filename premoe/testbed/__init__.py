"""The embedded testbed: a small Qwen3-MoE trained by premoe, and its corpus splits.

``path()`` is the checkpoint directory, so any command takes ``testbed`` as
its MODEL argument; ``corpus_path()`` holds the calibration / validation /
test text of every domain (``<domain>/<split>.jsonl.gz``).
"""
from __future__ import annotations

import json
from pathlib import Path

_HERE = Path(__file__).parent


def path() -> Path:
    """Directory of the shipped checkpoint (config.json, model.safetensors, tokenizer files)."""
    return _HERE / "model"


def corpus_path() -> Path:
    """Directory of the shipped corpus splits (calib, val, test) and their manifest."""
    return _HERE / "corpus"


def domains(trained_only: bool = True) -> list[str]:
    """Domain names of the shipped corpus; ``trained_only=False`` adds the unseen ones."""
    manifest = json.loads((corpus_path() / "manifest.json").read_text())
    return [d for d, info in manifest["domains"].items() if info["trained"] or not trained_only]
