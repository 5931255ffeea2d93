"""Registry of per-family adapters, keyed by ``config.model_type``.

Adding a family: write one :class:`MoEAdapter` in ``families.py``, add it to
``ALL``, and add its tiny random config to ``tests/families.py``.
"""
from __future__ import annotations

from premoe.adapters.base import MoEAdapter, MoELayer
from premoe.adapters.families import ALL
from premoe.errors import UnsupportedModelError

REGISTRY: dict[str, MoEAdapter] = {t: a for a in ALL for t in a.model_types}


def supported() -> list[str]:
    """Names of the supported families, for messages and ``--help``."""
    return [a.name for a in ALL]


def get_adapter(config) -> MoEAdapter:
    """The adapter for a transformers config (or a config.json dict).

    >>> get_adapter(AutoConfig.from_pretrained("testbed")).name
    'Qwen3-MoE'
    """
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    text_config = config.get("text_config") if isinstance(config, dict) else getattr(config, "text_config", None)
    if model_type not in REGISTRY and text_config is not None:
        return get_adapter(text_config)
    if model_type not in REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported Mixture-of-Experts family; supported: "
            f"{', '.join(supported())}. To add one, write an adapter in premoe/adapters/families.py"
        )
    return REGISTRY[model_type]


__all__ = ["MoEAdapter", "MoELayer", "REGISTRY", "get_adapter", "supported"]
