"""Registry of per-family adapters, keyed by ``config.model_type``.

Adding a family: write one :class:`MoEAdapter` in ``families.py``, add it to
``ALL``, and add its tiny random config to ``FAMILIES`` in ``tests/tiny.py``;
``tests/test_adapters.py`` then checks it end to end. Unknown model types with
the common transformers-5 layout get a generic adapter (with a warning).
"""
from __future__ import annotations

from premoe.adapters.base import MoEAdapter, MoELayer, prune_in_memory
from premoe.adapters.families import ALL
from premoe.errors import UnsupportedModelError

REGISTRY: dict[str, MoEAdapter] = {t: a for a in ALL for t in a.model_types}


def supported() -> list[str]:
    """Names of the supported families, for messages and ``--help``."""
    return [a.name for a in ALL]


def get_adapter(config, model=None) -> MoEAdapter:
    """The adapter for a transformers config (or a config.json dict).

    A registered ``model_type`` (or that of its ``text_config``) wins;
    otherwise the layout is read off ``model`` (or a meta-device model built
    from the config) by :func:`~premoe.adapters.generic.generic_adapter`,
    which warns about its guesses or raises :class:`UnsupportedModelError`.

    >>> get_adapter(AutoConfig.from_pretrained("testbed")).name
    'Qwen3-MoE'
    """
    model_type = _field(config, "model_type")
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    text_config = _field(config, "text_config")
    if text_config is not None and _field(text_config, "model_type") in REGISTRY:
        return REGISTRY[_field(text_config, "model_type")]
    if not model_type:
        raise UnsupportedModelError("the config has no model_type; is this a Hugging Face config.json? Supported "
                                    f"families: {', '.join(supported())}")
    from premoe.adapters.generic import generic_adapter

    try:
        return generic_adapter(config, model)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{str(e).rstrip('.')}. Supported families: {', '.join(supported())}") from e


def _field(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


__all__ = ["MoEAdapter", "MoELayer", "REGISTRY", "get_adapter", "prune_in_memory", "supported"]
