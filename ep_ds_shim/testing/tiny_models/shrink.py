"""A tiny config of any family: its default config (or a given one) shrunk by attribute-name patterns, keeping the
relations the default config has; the few per-family overrides on top (`overrides`)."""

from __future__ import annotations

import copy
import warnings

from transformers import AutoConfig, PreTrainedConfig

from .families import sub_configs, text_config
from .knobs import EXPERT_COUNT_KEY, SHARED_SETTINGS, SIZES, TOPK_KEY, is_int
from .level import Context, Level
from .overrides import apply_overrides


def tiny_config(model_type: str, *, num_experts: int = SIZES["num_experts"], top_k: int = SIZES["top_k"],
                hidden_size: int = SIZES["hidden_size"], num_layers: int = SIZES["num_layers"],
                expert_size: int = SIZES["expert_size"], vocab_size: int = SIZES["vocab_size"],
                base: PreTrainedConfig | None = None):
    """A tiny config of `model_type`: its `AutoConfig.for_model` defaults (or `base`, e.g. a user's own config) with
    every size knob shrunk. Experts per token: the family's own, at most `top_k` (a top-1 family stays top-1)."""
    sizes = dict(num_experts=num_experts, top_k=top_k, hidden_size=hidden_size, num_layers=num_layers,
                 expert_size=expert_size, vocab_size=vocab_size)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} > num_experts={num_experts}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if base is not None:
            default = copy.deepcopy(base)
        else:
            default = AutoConfig.for_model(model_type)
            _add_optional_vision(default)
        tree = default.to_dict()
        shrunk = _shrink_tree(tree, default, Context(sizes, tree), text_config(default))
        apply_overrides(shrunk, model_type, num_layers)
        for key in ("transformers_version", "architectures", "_name_or_path"):
            shrunk.pop(key, None)
        config = type(default).from_dict(shrunk)
    # top-level copies of the shared settings (a composite config keeps its own tie_word_embeddings)
    for key, value in SHARED_SETTINGS:
        try:
            setattr(config, key, value)
        except Exception:
            pass
    return config


def routing_of(config) -> dict[str, int]:
    """The routed-expert count and experts per token a config declares (its text config for a composite one),
    however the family spells them; missing ones are left out."""
    found: dict[str, int] = {}
    for key, value in text_config(config).to_dict().items():
        if not is_int(value) or value < 1:
            continue
        if EXPERT_COUNT_KEY.match(key):
            found.setdefault("num_experts", value)
        elif TOPK_KEY.search(key):
            found.setdefault("top_k", value)
    return found


def _shrink_tree(tree: dict, config, ctx: Context, text) -> dict:
    """Shrink a config dict and its sub-config dicts; the text decoder first (its sizes are anchors for the rest)."""
    subs = sub_configs(config)
    text_key = next((k for k, v in subs.items() if v is text), None)
    role = "text" if config is text else ("top" if subs else "other")
    order = ([text_key] if text_key else []) + [k for k in subs if k != text_key]
    shrunk_subs = {}
    for key in order:
        if isinstance(tree.get(key), dict):
            shrunk_subs[key] = _shrink_tree(tree[key], subs[key], ctx, text)
    level = Level({k: v for k, v in tree.items() if k not in shrunk_subs}, type(config), role, ctx)
    out = level.shrink()
    out.update(shrunk_subs)
    return out


def _add_optional_vision(config) -> None:
    """A composite config whose vision tower is optional and absent by default (e.g. gemma4) gets its default
    vision sub-config, so the tiny model has a vision tower and image inputs exercise it."""
    for key, spec in (getattr(type(config), "sub_configs_defaults", None) or {}).items():
        if "vision" not in key or getattr(config, key, None) is not None or not getattr(spec, "optional", False):
            continue
        try:
            sub, _ = spec.create_subconfig(key, None)
            setattr(config, key, sub)
        except Exception:  # keep the default (text only)
            pass
