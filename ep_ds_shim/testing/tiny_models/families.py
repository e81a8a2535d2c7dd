"""Which model types get a tiny model (those with an EP plan and a head), and which head class builds it."""

from __future__ import annotations

import functools
import warnings

import transformers
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES


def _config_class(model_type: str):
    try:
        return CONFIG_MAPPING[model_type]
    except Exception:  # a config whose module fails to import on this machine
        return None


def _sub_config_classes(cls) -> dict:
    subs = {}
    for attr in ("sub_configs", "sub_configs_defaults"):
        value = getattr(cls, attr, None)
        if isinstance(value, dict):
            subs.update({k: v for k, v in value.items() if isinstance(v, type)})
    return subs


def _has_ep_plan_class(cls) -> bool:
    if cls is None:
        return False
    if getattr(cls, "base_model_ep_plan", None):
        return True
    return any(_has_ep_plan_class(sub) for sub in _sub_config_classes(cls).values() if sub is not cls)


def sub_configs(config) -> dict[str, PreTrainedConfig]:
    """The sub-configs a config holds (text / vision / audio ...), by attribute name."""
    out = {}
    for key in list(getattr(config, "sub_configs", {}) or {}) + list(vars(config)):
        if key in out:
            continue
        try:
            value = getattr(config, key, None)
        except Exception:  # per-layer attributes of heterogeneous configs refuse a global read
            continue
        if isinstance(value, PreTrainedConfig):
            out[key] = value
    return out


def text_config(config) -> PreTrainedConfig:
    """The text decoder's config: a composite config's text sub-config, else `config` itself."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:
            return get()
    return config


def is_multimodal(config) -> bool:
    """A composite config (its text decoder lives in a sub-config, next to a vision / audio tower)."""
    return text_config(config) is not config or any("vision" in key or "audio" in key for key in sub_configs(config))


def _has_ep_plan(config) -> bool:
    seen = [config, text_config(config), *sub_configs(config).values()]
    return any(getattr(c, "base_model_ep_plan", None) for c in seen)


def _head_class_name(model_type: str, multimodal: bool) -> str | None:
    clm = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    itt = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    # A multimodal config is built with its image-text-to-text head, so its vision tower is loaded too; a text
    # config with its causal-LM head (some text families are registered only as image-text-to-text).
    names = (itt, clm) if multimodal else (clm, itt)
    for name in names:
        if isinstance(name, (list, tuple)):
            name = name[0] if name else None
        if name:
            return name
    return None


@functools.lru_cache(maxsize=None)
def model_class_for(model_type: str):
    """The head class a tiny model of `model_type` is built with: the image-text-to-text head for a multimodal
    config, else the causal-LM head (falling back to the other mapping when a type is registered in only one)."""
    cls = _config_class(model_type)
    if cls is None:
        raise ValueError(f"unknown model type {model_type!r}")
    multimodal = is_multimodal(AutoConfig.for_model(model_type))
    name = _head_class_name(model_type, multimodal)
    if name is None:
        raise ValueError(f"{model_type!r} has neither a causal-LM nor an image-text-to-text head")
    head = getattr(transformers, name, None)
    if head is None:
        raise ValueError(f"{model_type!r}: head class {name} is not importable")
    return head


def has_ep_plan(model_type: str) -> bool:
    """`model_type`'s config (or a sub-config) has a non-empty ``base_model_ep_plan`` and the release has a causal-LM
    or image-text-to-text head for it."""
    if model_type not in CONFIG_MAPPING_NAMES or not _has_ep_plan_class(_config_class(model_type)):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.for_model(model_type)
    except Exception:
        return False
    if not _has_ep_plan(config):
        return False
    name = _head_class_name(model_type, is_multimodal(config))
    return name is not None and getattr(transformers, name, None) is not None


def ep_model_types() -> list[str]:
    """Model types of the installed transformers with an EP plan and a head (`has_ep_plan`), sorted.

    A ``<parent>_text`` sub-config type is dropped when its parent type is listed and it has no causal-LM class
    of its own (it is then only reachable through the parent's head)."""
    found = [model_type for model_type in sorted(CONFIG_MAPPING_NAMES) if has_ep_plan(model_type)]
    clm = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return [t for t in found if not (t.endswith("_text") and t[: -len("_text")] in found and t not in clm)]
