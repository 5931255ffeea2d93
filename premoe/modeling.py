"""Resolve, identify and load checkpoints. ``testbed`` and ``testbed-dsv3`` name the shipped models."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from premoe.errors import CheckpointError, InputError, MissingFileError, UnsupportedModelError


# MODEL names of the shipped testbeds -> (folder under premoe/testbed, how to train and ship it)
TESTBEDS = {
    "testbed": ("model", "`premoe testbed train` and `premoe testbed ship`"),
    "testbed-dsv3": ("model_dsv3", "`premoe testbed train --arch deepseek_v3` and `premoe testbed export WORK --ship testbed-dsv3`"),
}


def shipped_dir(name: str) -> Path:
    """Folder of a shipped testbed (``testbed``: Qwen3-MoE; ``testbed-dsv3``: DeepSeek-V3 router), present or not."""
    from premoe import testbed

    return testbed.path().parent / TESTBEDS[name][0]


def is_testbed(model: str | Path) -> bool:
    """Whether ``model`` names or points at a shipped testbed (whose corpus splits are the default data)."""
    if str(model) in TESTBEDS:
        return True
    try:
        path = Path(model).resolve()
    except (OSError, RuntimeError):  # a symlink loop: not a testbed; resolve_model_path says what is wrong
        return False
    return any(path == shipped_dir(name).resolve() for name in TESTBEDS)


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint directory: a shipped testbed's name (see TESTBEDS) or a local path holding config.json."""
    if str(model) in TESTBEDS:
        path = shipped_dir(str(model))
        if not (path / "config.json").exists():
            raise MissingFileError(f"the {model} model is not shipped in {path} yet; reinstall premoe, or train and "
                                   f"ship it with {TESTBEDS[str(model)][1]}")
        return path
    path = Path(model)
    if path.is_symlink() and not path.exists():
        raise MissingFileError(f"model directory {path} is a symlink to nowhere (dangling, or a loop); point MODEL "
                               "at the checkpoint directory itself")
    if path.exists() and not path.is_dir():
        raise InputError(f"model {path} is a file, not a checkpoint directory; pass the directory that holds "
                         f"config.json and the .safetensors shards (e.g. {path.parent})")
    if not path.is_dir():
        raise MissingFileError(_missing_model(str(model)))
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    from premoe.fileio import require_utf8

    require_utf8(path.absolute(), "model", ", and the tokenizer and safetensors libraries cannot open such paths; "
                 "rename the directory (or a parent) to a UTF-8 name")
    return path


def _missing_model(model: str) -> str:
    """Why MODEL is not a directory, and the fix. premoe never downloads: a Hub id gets the download command, or
    the snapshot already in the Hugging Face cache."""
    from premoe.modelcard import is_hub_id

    missing = f"model directory {model} does not exist"
    if not is_hub_id(model):
        return f"{missing}; pass a local checkpoint directory or one of {', '.join(TESTBEDS)}"
    cached = _cached_snapshot(model)
    if cached is not None:
        return f"{missing}; {model} is a Hugging Face Hub id and premoe reads local directories only: pass {cached}"
    local = model.split("/")[1]
    return (f"{missing}; if {model} is a Hugging Face Hub id: premoe reads local directories only and never downloads; "
            f"run `huggingface-cli download {model} --local-dir {local}` and pass {local}")


def _cached_snapshot(model: str) -> Path | None:
    """The snapshot of Hub repository ``model`` in the Hugging Face cache (its ``main`` revision first), if any."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        repo = Path(HF_HUB_CACHE) / f"models--{model.replace('/', '--')}"
        main = (repo / "refs" / "main").read_text().strip() if (repo / "refs" / "main").is_file() else None
        snapshots = [repo / "snapshots" / main] if main else sorted((repo / "snapshots").glob("*"))
    except (ImportError, OSError):
        return None
    return next((s for s in snapshots if (s / "config.json").is_file()), None)


def read_config(model: str | Path) -> dict:
    """config.json as a dict; a file that is not a JSON object is a :class:`CheckpointError`, not a crash later."""
    from premoe.fileio import read_small_text

    path = resolve_model_path(model) / "config.json"
    try:
        config = json.loads(read_small_text(path, "config"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, expected an object of config fields; "
                              "the checkpoint is corrupt (restore its config.json)")
    return config


def check_config(model: str | Path) -> dict:
    """read_config, plus the expert/top-k/layer counts of a supported family checked before transformers builds.

    A hand-edited count (0, -3, "32", 3.5, a top-k above the expert count)
    otherwise surfaces as a torch error deep inside model construction.
    """
    from premoe.adapters import REGISTRY, get_adapter

    config = read_config(model)
    if config.get("model_type") in REGISTRY:
        get_adapter(config).check_counts(config, resolve_model_path(model) / "config.json")
    return config


def transformers_config(model: str | Path):
    """transformers' config of a checkpoint, built from transformers' own classes: premoe never runs a
    checkpoint's custom code (``auto_map``).

    A family whose config.json names a model_type transformers does not register but whose modules it has
    (Kimi-K2's ``kimi_k2`` is DeepSeek-V3) is built as the type its adapter names; any other unregistered
    model_type is refused here, before transformers would ask to run the checkpoint's code.
    """
    return _transformers_config(resolve_model_path(model), check_config(model))


def _transformers_config(path: Path, raw: dict):
    """:func:`transformers_config` from the checkpoint directory and its already checked config.json fields."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from premoe.adapters import REGISTRY, supported

    model_type = raw.get("model_type")
    adapter = REGISTRY.get(model_type)
    if adapter is not None and adapter.transformers_model_type:
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
        return AutoConfig.for_model(adapter.transformers_model_type, **fields)
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedModelError(f"{path / 'config.json'} has no model_type; is it a Hugging Face checkpoint's "
                                    "config.json?")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise UnsupportedModelError(
            f"{path / 'config.json'}: model_type {model_type!r} is unknown to transformers "
            f"{transformers.__version__} and to premoe, which never runs a checkpoint's own code (auto_map); "
            f"upgrade transformers, or add an adapter in premoe/adapters/families.py (supported: "
            f"{', '.join(supported())})")
    return AutoConfig.from_pretrained(path)


def config_hash(config: dict) -> str:
    """A short hash of the config fields that fix the expert layout (not transformers' version)."""
    ignored = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "premoe"}
    canonical = json.dumps({k: v for k, v in sorted(config.items()) if k not in ignored}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def locate_model(identity: dict) -> str:
    """Where the model an artefact (profile, store) records is now.

    Its recorded path, or, when that directory is gone (the repository moved, a fresh clone, a removed
    worktree), its recorded name when that resolves to a model with the same config hash: artefacts of a
    shipped testbed keep working wherever premoe is installed.
    """
    path, name = identity.get("path"), identity.get("name")
    if path and Path(path).is_dir():
        return str(path)
    if name:
        try:
            if config_hash(read_config(name)) == identity.get("config_hash"):
                return str(name)
        except (MissingFileError, CheckpointError, InputError):
            pass
    raise MissingFileError(f"the model this was made from ({name}, recorded at {path}) is not there any more; "
                           "pass --model with its checkpoint directory")


def check_context(config, seq_len: int) -> None:
    """Refuse windows longer than the model's positions (``max_position_embeddings``, no RoPE scaling configured).

    Beyond them the model runs, on positions it never saw, and every number measured there (profile, perplexity,
    KL) is silently off. ``config`` is config.json as a dict or a transformers config.
    """
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    limit = get("max_position_embeddings")
    rope = get("rope_parameters") or get("rope_scaling") or {}
    scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (None, "default")
    if type(limit) is int and limit > 0 and not scaled and seq_len > limit:
        raise InputError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings ({limit}): "
                         f"windows beyond it measure positions the model never saw; use --seq-len {limit} or less")


def model_identity(model: str | Path) -> dict:
    """What artefacts record to know which model they belong to."""
    config = read_config(model)
    return {"name": str(model), "path": str(resolve_model_path(model)), "model_type": config.get("model_type"),
            "config_hash": config_hash(config)}


def load_model(model: str | Path, device: str = "cpu"):
    """Load a checkpoint in fp32 (bf16 matmuls are 5-20x slower on AVX2 CPUs), in eval mode.

    A ``premoe compile --export compact`` checkpoint (layers with different
    expert counts, which ``from_pretrained`` cannot build) goes through
    :func:`premoe.compile.load_compact`, so eval, serve and verify take it too.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from premoe.progress import loading

    path = resolve_model_path(model)
    config = check_config(path)
    if isinstance(config.get("premoe"), dict) and config["premoe"].get("export") == "compact":
        from premoe.compile import load_compact

        return load_compact(path).to(device)
    try:
        with loading(path):  # transformers' "Loading weights" bar: only for a long load on a terminal
            loaded, info = AutoModelForCausalLM.from_pretrained(path, config=_transformers_config(path, config),
                                                                dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # SafetensorError: a truncated shard
        raise CheckpointError(f"could not load the checkpoint in {path}: {str(e).splitlines()[0]}") from e
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers fills them with random weights: a silently wrong model
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{path}: the weights lack {len(missing)} tensors config.json asks for ({shown}); "
                              "the checkpoint is incomplete or its config.json does not match its shards")
    beyond = _layers_beyond_config(config, info.get("unexpected_keys") or ())
    if beyond:  # transformers drops them: a silently shallower model
        raise CheckpointError(f"{path}: the shards hold decoder layers {beyond[:4]} beyond config.json's "
                              f"num_hidden_layers = {loaded.config.num_hidden_layers}; restore its config.json")
    return loaded.to(device).eval()


def _layers_beyond_config(config: dict, unexpected) -> list[int]:
    """Decoder layer indices of unloaded tensors past the config's layers and its declared MTP layers."""
    from premoe.adapters import REGISTRY, get_adapter
    from premoe.adapters.base import layer_index

    if config.get("model_type") not in REGISTRY:
        return []
    adapter = get_adapter(config)
    last = adapter.num_hidden_layers(config) + adapter.mtp_declared(config)
    return sorted({i for key in unexpected if (i := layer_index(key)) is not None and i >= last})


def load_tokenizer(model: str | Path):
    """The checkpoint's tokenizer, from transformers' own classes (a tokenizer that needs the checkpoint's code
    is refused with transformers' message rather than a prompt to run it)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    config = transformers_config(path)  # transformers would read config.json too, and report a broken one as OSError
    try:
        return AutoTokenizer.from_pretrained(path, config=config, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        hint = ("; premoe never runs a checkpoint's own code: save the tokenizer as tokenizer.json (a "
                "PreTrainedTokenizerFast) in that directory") if "custom code" in str(e) else ""
        reason = str(e).splitlines()[0].rstrip(" .")
        raise CheckpointError(f"could not load the tokenizer in {path}: {reason}{hint}") from e
