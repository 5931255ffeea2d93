"""Resolve, identify and load checkpoints. ``testbed`` names the shipped model."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from premoe.errors import CheckpointError, MissingFileError


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint directory: ``testbed`` or a local path holding config.json."""
    if str(model) == "testbed":
        from premoe import testbed

        path = testbed.path()
        if not (path / "config.json").exists():
            raise MissingFileError(f"the testbed model is missing from {path}; reinstall premoe, or train and ship it "
                                   "with `premoe testbed train` and `premoe testbed ship`")
        return path
    path = Path(model)
    if not path.is_dir():
        raise MissingFileError(f"model directory {path} does not exist; pass a local checkpoint directory or 'testbed'")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    return path


def read_config(model: str | Path) -> dict:
    path = resolve_model_path(model) / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e


def config_hash(config: dict) -> str:
    """A short hash of the config fields that fix the expert layout (not transformers' version)."""
    ignored = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "premoe"}
    canonical = json.dumps({k: v for k, v in sorted(config.items()) if k not in ignored}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_identity(model: str | Path) -> dict:
    """What artefacts record to know which model they belong to."""
    config = read_config(model)
    return {"name": str(model), "path": str(resolve_model_path(model)), "model_type": config.get("model_type"),
            "config_hash": config_hash(config)}


def load_model(model: str | Path, device: str = "cpu"):
    """Load a checkpoint in fp32 (bf16 matmuls are 5-20x slower on AVX2 CPUs), in eval mode."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # SafetensorError: a truncated shard
        raise CheckpointError(f"could not load the checkpoint in {path}: {str(e).splitlines()[0]}") from e
    return loaded.to(device).eval()


def load_tokenizer(model: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(model))
