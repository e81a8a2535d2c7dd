"""Tiny Mixture-of-Experts models of *every* family the installed transformers can expert-parallelise.

`python -m ep_ds_shim verify` uses this on a user's machine: for each model type whose config carries a
``base_model_ep_plan`` it builds a tiny random checkpoint with the installed release and checks EP loading and
training against a single-process model. It must also work for families this project has never seen, so nothing
here lists families: the config of a type is taken from `AutoConfig.for_model(model_type)` defaults and shrunk by
*attribute-name patterns* (hidden / intermediate / head / expert / layer knobs, however each family spells them),
keeping the relations the default config has (``hidden == heads * head_dim``, ``qk_head_dim == nope + rope``,
vision output size == text hidden size, the mix of dense and MoE / sliding and full layers...). The few per-family
overrides sit in `_FAMILY_OVERRIDES`, each with the reason it cannot be derived.

    types = ep_model_types()
    path = build_tiny_model(cache / t, t)
    model = model_class_for(t).from_pretrained(path, dtype=torch.float32)
    out = model(**sample_inputs(model.config))
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import re
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PreTrainedConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

from ..experts import expert_parameters, local_tensor
from .tiny_moe import built_once, redraw

__all__ = [
    "ep_model_types", "has_ep_plan", "tiny_config", "model_class_for", "sample_inputs", "build_tiny_model", "expert_count",
    "is_multimodal", "SIZES", "build_shrunk_model", "routing_of",
]

SIZES = dict(num_experts=4, top_k=2, hidden_size=32, num_layers=2, expert_size=64, vocab_size=128)
"""Default tiny sizes (the keyword arguments of `tiny_config` / `build_tiny_model`)."""

_MAX_POSITIONS = 256  # seq + image tokens stay far below this
_WINDOW = 4  # a sliding window / attention chunk smaller than the sample sequence, so it actually matters
_RANK = 16  # low-rank projections (MLA q/kv LoRA ranks, gate ranks)
_HEAD_DIM_DIVISOR = 8  # head dims without a fixed relation to hidden_size: 128 -> 16, 64 -> 8 (rope sections fit)
_VISION = dict(hidden_size=32, intermediate_size=64, num_heads=4, depth=2, patch_size=4, image_size=16)

def _last_is(first: str, last: str):
    """A per-layer list for n tiny layers: `first` everywhere but the last layer."""
    return lambda n: [first] * (n - 1) + [last] if n > 1 else [last]


# Per-family settings that cannot be derived from attribute names. Keep this small; each entry says why. Nested
# dicts apply to the sub-config of that name (``text_config``); a callable gets the tiny layer count.
_FAMILY_OVERRIDES: dict[str, dict] = {
    # The default config leaves layer_types None and the model indexes it per layer (upstream default is not
    # buildable); its values ("conv" / "full_attention") cannot be guessed from the config.
    "lfm2_moe": {"layer_types": _last_is("conv", "full_attention")},
    # The default text config leaves mlp_layer_types None and the decoder indexes it per layer ("dense"/"sparse").
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": _last_is("dense", "sparse")}},
    "deepseek_ocr2_text": {"mlp_layer_types": _last_is("dense", "sparse")},
    # The projector maps a number of image patches to a number of queries through a dict keyed by the released
    # patch counts (1225, 4900); a tiny 16 x 16 image with 4 x 4 patches has 16, which needs its own entry.
    "aria": {"projector_patch_to_query_dict": {"16": 4}, "max_value_projector_patch_to_query_dict": 4},
    # The default layer_types contain "indexed_attention" layers but the QSA indexer sizes default to None, which
    # the indexed layers cannot be built with; the config validator requires indexer_kv_heads=1 and
    # budget % compress_ratio == 0, and an index head at least as wide as the rotary dims.
    "qwen4_exp": {"text_config": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 32,
                                  "indexer_budget": 4, "indexer_compress_ratio": 2}},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 32, "indexer_budget": 4,
                       "indexer_compress_ratio": 2},
    # (5.25) The indexer scores keys with the first index_num_heads query heads of key head 0 (default 12); the
    # config validator requires at most num_attention_heads // num_key_value_heads, which the tiny sizes make small.
    "kolibri1_1": {"index_num_heads": 1},
}


# ----------------------------------------------------------------------------------------------------------------
# Which model types, which head class
# ----------------------------------------------------------------------------------------------------------------


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


def _sub_configs(config) -> dict[str, PreTrainedConfig]:
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


def _text_config(config) -> PreTrainedConfig:
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:
            return get()
    return config


def is_multimodal(config) -> bool:
    """A composite config (its text decoder lives in a sub-config, next to a vision / audio tower)."""
    return _text_config(config) is not config or any(
        "vision" in key or "audio" in key for key in _sub_configs(config)
    )


def _has_ep_plan(config) -> bool:
    seen = [config, _text_config(config), *_sub_configs(config).values()]
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


# ----------------------------------------------------------------------------------------------------------------
# Shrinking a config
# ----------------------------------------------------------------------------------------------------------------

_LAYER_COUNT_KEYS = ("num_hidden_layers", "depth", "n_layers", "num_layers", "encoder_layers", "n_layer")
_TOKEN_KEY = re.compile(r"(^|_)token_(id|ids|index|idx)$")
_EXPERT_COUNT_KEY = re.compile(
    r"^(n|num|moe_num|moe_n|num_moe|num_routed|n_routed|num_local|moe_num_routed)_(routed_|local_)?experts?$"
    r"|^expert_num$|^num_expert$"
)
_TOPK_KEY = re.compile(
    r"experts_per_tok(en)?$|^moe_k$|^moe_top_?k$|^top_?k_experts?$|^num_selected_experts$|^router_top_?k$"
)
_SHARED_COUNT_KEY = re.compile(r"^(n|num|moe_num|moe_n)_shared_experts?$")
_GROUP_KEY = re.compile(r"^(n_group|num_expert_group|n_expert_groups?|topk_group|topk_groups)$")
_INDEX_LIST_KEY = re.compile(r"(layers|indexes|indices|layer_ids|_idx|_ids)$")
# Sizes of a vision / audio tower's output, which feed the text decoder: they must equal the text hidden size.
_TO_TEXT_HIDDEN_KEYS = ("out_hidden_size", "output_dim", "text_hidden_size", "adapter_out_dim", "out_dim",
                        "output_hidden_size", "llm_hidden_size", "text_dim", "text_hidden_dim")
_DENSE_PREFIX_KEY = re.compile(r"^(first_k_dense_replace|num_dense_layers|first_k_dense|n_dense_layers)$")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _even(value: float, minimum: int = 2) -> int:
    return max(minimum, int(round(value / 2)) * 2)


def _collect_token_ids(tree: dict, out: set) -> None:
    for key, value in tree.items():
        if not isinstance(key, str) or key in ("id2label", "label2id"):
            continue
        if isinstance(value, dict):
            _collect_token_ids(value, out)
        elif _TOKEN_KEY.search(key):
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if _is_int(v) and v >= 0:
                    out.add(v)


class _Context:
    def __init__(self, sizes: dict, tree: dict):
        self.sizes = sizes
        ids: set = set()
        _collect_token_ids(tree, ids)
        vocab = sizes["vocab_size"]
        if len(ids) > vocab // 4:
            raise ValueError(f"{len(ids)} special token ids do not fit a vocabulary of {vocab}")
        # Every special token id moves to the top of the tiny vocabulary (same order as before), so random text
        # drawn from [0, vocab - len(ids)) never contains one, and equal ids stay equal.
        self.token_map = {old: vocab - len(ids) + i for i, old in enumerate(sorted(ids))}
        self.anchors: dict[int, int] = {}  # original size -> tiny size (text / vision hidden sizes)

    def token(self, value):
        if isinstance(value, (list, tuple)):
            return type(value)(self.token(v) for v in value)
        return self.token_map.get(value, value) if _is_int(value) else value


def _layer_count(d: dict) -> tuple[str | None, int | None]:
    for key in _LAYER_COUNT_KEYS:
        if _is_int(d.get(key)) and d[key] > 0:
            return key, d[key]
    return None, None


def _per_layer_lists(d: dict, n_layers: int) -> dict:
    return {
        k: v for k, v in d.items()
        if isinstance(v, (list, tuple)) and len(v) == n_layers and n_layers > 1 and not _TOKEN_KEY.search(k)
    }


def _index_lists(d: dict, n_layers: int, per_layer: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k in per_layer or not isinstance(v, (list, tuple)) or not _INDEX_LIST_KEY.search(k) or _TOKEN_KEY.search(k):
            continue
        if all(_is_int(x) and 0 <= x < n_layers for x in v):
            out[k] = set(v)
    return out


def _per_layer_overrides(d: dict) -> dict[int, dict]:
    plc = d.get("per_layer_config")
    if not isinstance(plc, dict):
        return {}
    return {int(k): v for k, v in plc.items() if isinstance(v, dict)}


def _select_layers(d: dict, n_layers: int, keep: int) -> list[int]:
    """Which of the original layers the tiny model keeps: a MoE layer first, then one of each distinct layer kind
    (attention type, MLP type, membership of per-layer index lists, per-layer overrides), in order."""
    if n_layers <= keep:
        return list(range(n_layers))
    per_layer = _per_layer_lists(d, n_layers)
    index_lists = _index_lists(d, n_layers, per_layer)
    overrides = _per_layer_overrides(d)
    dense_prefix = next((d[k] for k in d if _DENSE_PREFIX_KEY.match(k) and _is_int(d[k])), 0)

    def signature(i):
        return (
            tuple(str(v[i]) for v in per_layer.values()),
            tuple(i in s for s in index_lists.values()),
            json.dumps(overrides.get(i), sort_keys=True, default=str),
            i < dense_prefix,
        )

    moe_start = next((d[k] for k in d if _is_int(d[k]) and re.search(r"(moe|expert|sparse).*start|start.*(moe|expert)", k)), 0)

    def is_dense(i):
        if i < dense_prefix or i < moe_start:
            return True
        if any(i in s for k, s in index_lists.items() if "only" in k or "dense" in k):
            return True
        return any("dense" in str(v[i]).lower() for k, v in per_layer.items() if not k.startswith("layer_types"))

    chosen: list[int] = []
    first_moe = next((i for i in range(n_layers) if not is_dense(i)), None)
    if first_moe is not None:
        chosen.append(first_moe)
    seen = {signature(i) for i in chosen}
    for i in range(n_layers):
        if len(chosen) >= keep:
            break
        if signature(i) not in seen:
            chosen.append(i)
            seen.add(signature(i))
    for i in range(n_layers):
        if len(chosen) >= keep:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _scale_sections(sections, half: int):
    """mrope-style sections rescaled to sum to `half` (largest remainder, each >= 1 where possible)."""
    sections = list(sections)
    total = sum(sections) or 1
    raw = [s * half / total for s in sections]
    out = [max(1, int(x)) if half >= len(sections) else int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(out) < half:
        out[order[i % len(out)]] += 1
        i += 1
    while sum(out) > half:
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


def _default_sections(half: int) -> list[int]:
    """Three mrope sections summing to `half` as [a, a, half - 2a]: families read them as (t, h, w) or as
    (h, w, t) with h and w interleaved (which needs the first two equal)."""
    a = max(1, (half + 2) // 3)
    if half - 2 * a < 1:
        a = max(1, (half - 1) // 2)
    return [a, a, half - 2 * a]


def _shrink_rope(rope, rotary_dim_of):
    """rope_parameters / rope_scaling: mrope sections (possibly per layer type) made to fit the tiny head dims."""
    if not isinstance(rope, dict):
        return rope
    rope = dict(rope)
    if rope and all(isinstance(v, dict) or v is None for v in rope.values()):  # per layer type
        return {k: _shrink_rope(v, rotary_dim_of) for k, v in rope.items()}
    for key in ("mrope_section", "mrope_sections"):
        if isinstance(rope.get(key), (list, tuple)):
            half = rotary_dim_of(rope.get("partial_rotary_factor")) // 2
            rope[key] = _scale_sections(rope[key], half)
    return rope


class _Level:
    """Shrinks one config level (a plain config, or one sub-config of a composite one), as a dict."""

    def __init__(self, d: dict, cls, role: str, ctx: _Context):
        self.d, self.cls, self.role, self.ctx = d, cls, role, ctx
        self.orig = copy.deepcopy(d)
        self.amap = dict(getattr(cls, "attribute_map", {}) or {})
        s = ctx.sizes
        if role == "text":
            # 4 heads of hidden/4, but keep head dims >= 8 for small hidden sizes (rotary sections need room)
            self.hidden, self.inter = s["hidden_size"], s["expert_size"]
            self.heads = max(1, min(4, s["hidden_size"] // 8))
            self.keep_layers = s["num_layers"]
        else:
            self.hidden, self.inter, self.heads = _VISION["hidden_size"], _VISION["intermediate_size"], _VISION["num_heads"]
            self.keep_layers = min(s["num_layers"], _VISION["depth"])

    # -- helpers ------------------------------------------------------------------------------------------------
    def orig_heads(self, key: str) -> int | None:
        """The query-head count that goes with a head-count or head-dim key (``swa_`` / ``linear_`` prefixes)."""
        prefix = key.split("num_")[0] if "num_" in key else ""
        for cand in (f"{prefix}num_attention_heads", f"{prefix}num_heads", "num_attention_heads", "num_heads",
                     "attention_heads", "n_head", "n_heads"):
            if _is_int(self.orig.get(cand)):
                return self.orig[cand]
        return None

    def new_heads(self, key: str, value: int) -> int:
        if value <= 1:
            return value
        lowered = key.lower()
        kv_like = "key_value" in lowered or "kv_heads" in lowered or re.search(r"(^|_)kv(_|$)", lowered)
        if kv_like:
            q = self.orig_heads(key)
            if q is not None and value == q:  # MHA / MLA: as many kv heads as query heads
                return self.heads
            return max(1, self.heads // 2)
        if "key_heads" in lowered:  # linear attention: fewer key heads than value heads
            values = [v for k, v in self.orig.items() if "value_heads" in k and _is_int(v)]
            if values and value == values[0]:
                return self.heads
            return max(1, self.heads // 2)
        return self.heads

    # -- the rules ----------------------------------------------------------------------------------------------
    def shrink(self) -> dict:
        d = self.d
        _, n_layers = _layer_count(d)
        sel = _select_layers(d, n_layers, self.keep_layers) if n_layers else None
        self.sel = sel
        hidden_key = "hidden_size" if "hidden_size" in d else next(
            (k for k in ("d_model", "n_embd", "dim", "model_dim") if _is_int(d.get(k))), None)
        if hidden_key and _is_int(d.get(hidden_key)):
            self.ctx.anchors.setdefault(d[hidden_key], self.hidden)

        new = {}
        for key, value in d.items():
            new[key] = self.rule(key, value, n_layers, sel)
        # Relations the default config had, re-established on the tiny values.
        self.fix_relations(new)
        return new

    def rule(self, key, value, n_layers, sel):
        ctx = self.ctx
        canon = self.amap.get(key, key)
        lowered = key.lower()
        if isinstance(value, dict) and key == "per_layer_config":
            return self.per_layer_config(value, sel)
        if key in ("rope_parameters", "rope_scaling"):
            return value  # after the head dims are known (fix_relations)
        if _TOKEN_KEY.search(key):
            return ctx.token(value)
        if isinstance(value, (bool, str)):
            return self.bool_rule(key, value)
        # per-layer lists (layer_types, mlp_layer_types, no_rope_layers, per-layer head counts ...)
        if sel is not None and isinstance(value, (list, tuple)) and len(value) == n_layers and n_layers > 1:
            picked = [value[i] for i in sel]
            if _INDEX_LIST_KEY.search(key) and all(_is_int(x) and 0 <= x < n_layers for x in value) \
                    and max(value) > 1:
                # per-layer *layer indices* (e.g. the layer whose KV cache each layer reads): renumber them
                picked = [sel.index(x) if x in sel else pos for pos, x in enumerate(picked)]
            elif all(_is_int(x) for x in picked):
                picked = [self.scalar(key, canon, x, n_layers, sel) for x in picked]
            return type(value)(picked) if isinstance(value, tuple) else picked
        if sel is not None and isinstance(value, (list, tuple)) and _INDEX_LIST_KEY.search(key) \
                and value and all(_is_int(x) and 0 <= x < n_layers for x in value):
            return [pos for pos, i in enumerate(sel) if i in set(value)]
        if isinstance(value, (list, tuple)) and value and all(_is_int(x) for x in value):
            if "intermediate" in lowered or "ffn" in lowered:
                return [self.inter] * len(value)
            if "patch_size" in lowered:
                return [min(x, _VISION["patch_size"]) for x in value]
            if self.role != "text" and "channels" in lowered:
                return [min(x, self.hidden) for x in value]
            return value
        if _is_int(value) or (value is None and (_EXPERT_COUNT_KEY.match(canon) or _TOPK_KEY.search(canon))):
            return self.scalar(key, canon, value, n_layers, sel)
        if value is None and self.role == "text":
            return self.none_rule(key, lowered)
        return value

    def none_rule(self, key, lowered):
        """Knobs a default config leaves None although the model needs them once MoE / all layer kinds are on."""
        if _SHARED_COUNT_KEY.match(key):
            return 1
        if "intermediate" in lowered:
            return self.inter
        return None

    def bool_rule(self, key, value):
        if isinstance(value, bool):
            lowered = key.lower()
            # MoE blocks that default to off (e.g. a dense default with an optional MoE block)
            if re.match(r"^(enable|use)_(moe|experts?|sparse_moe)(_block|_layers?)?$", lowered):
                return True
            # fused CUDA / mamba kernels are not available on a CPU machine
            if lowered.startswith("use_") and lowered.endswith("_kernels"):
                return False
        return value

    def scalar(self, key, canon, value, n_layers, sel):
        s, lowered = self.ctx.sizes, key.lower()
        n_new = len(sel) if sel is not None else None
        # experts
        if _EXPERT_COUNT_KEY.match(canon) or _EXPERT_COUNT_KEY.match(key):
            if value is None:
                return s["num_experts"] if self.role == "text" else None
            return s["num_experts"] if value >= 1 else value  # 0: MoE off in a dense variant
        if _TOPK_KEY.search(canon) or _TOPK_KEY.search(key):
            return s["top_k"] if value is None else min(value, s["top_k"])
        if _SHARED_COUNT_KEY.match(canon) or _SHARED_COUNT_KEY.match(key):
            return min(value, 1)
        if _GROUP_KEY.match(canon) or _GROUP_KEY.match(key):
            return 1
        # heads and head dims
        if "heads" in lowered or lowered in ("n_head", "num_heads", "attention_heads"):
            return self.new_heads(key, value)
        if "head_dim" in lowered or "d_head" in lowered or lowered.endswith("head_size"):
            if value == 0:
                return 0
            return _even(value / _HEAD_DIM_DIVISOR)
        # layers
        if key in _LAYER_COUNT_KEYS and n_new is not None:
            return n_new
        if sel is not None and _DENSE_PREFIX_KEY.match(key):
            return sum(1 for i in sel if i < value)
        layerish = ("layer" in lowered and not any(w in lowered for w in ("hidden", "vocab", "dim", "intermediate"))) \
            or any(w in lowered for w in ("_period", "_interval", "_every_n", "sparse_step", "_freq", "pattern"))
        if sel is not None and layerish:
            return self.layer_scalar(key, value, n_layers, sel)
        if "lora_rank" in lowered or lowered.endswith("_rank") and "dt_rank" not in lowered:
            return min(value, _RANK)
        if "dt_rank" in lowered:
            return min(value, 8)
        if "d_state" in lowered or "state_size" in lowered:
            return min(value, 8)
        if lowered in ("n_groups", "mamba_n_groups", "num_groups") or lowered.endswith("_n_groups"):
            return 1
        # vocabulary / positions / windows
        if "vocab_size" in lowered:
            return min(value, s["vocab_size"])
        if lowered in ("max_position_embeddings", "model_max_length", "max_seq_len", "max_sequence_length",
                       "seq_length", "n_positions"):
            return min(value, _MAX_POSITIONS)
        if lowered == "num_position_embeddings":
            return (_VISION["image_size"] // _VISION["patch_size"]) ** 2
        if lowered == "posemb_grid_size":
            return _VISION["image_size"] // _VISION["patch_size"]
        if ("sliding_window" in lowered and "pattern" not in lowered) or lowered == "attention_chunk_size":
            return min(value, _WINDOW) if value > 0 else value
        if lowered == "image_size":
            return _VISION["image_size"]
        if lowered == "patch_size":
            return min(value, _VISION["patch_size"])
        # widths
        if key == "hidden_size" or key in ("d_model", "n_embd"):
            return self.hidden
        if self.role != "text" and lowered in _TO_TEXT_HIDDEN_KEYS:
            # a tower's output width: the text hidden size, or k x a tower's hidden size (merged patches)
            if value in self.ctx.anchors:
                return self.ctx.anchors[value]
            for orig, tiny in sorted(self.ctx.anchors.items(), reverse=True):
                if value % orig == 0 and 2 <= value // orig <= 16:
                    return tiny * (value // orig)
            return s["hidden_size"]
        if self.role != "text" and "channels" in lowered and lowered not in ("num_channels", "in_channels"):
            return min(value, self.hidden)
        if lowered in ("position_embedding_size", "max_num_patches", "num_patches"):
            return min(value, _MAX_POSITIONS)
        if lowered == "max_image_size":
            return min(value, 4 * _VISION["image_size"])
        if value in self.ctx.anchors and ("size" in lowered or "dim" in lowered or "hidden" in lowered):
            return self.ctx.anchors[value]
        if any(w in lowered for w in ("intermediate", "ffn", "mlp_dim", "expert_dim", "moe_hidden", "shared_expert",
                                      "share_expert", "hidden_size", "hidden_dim", "projection", "projector")):
            return min(value, self.inter) if value > 0 else value
        return value

    def layer_scalar(self, key, value, n_layers, sel):
        """Layer indices, periods and counts of the original stack, mapped onto the kept layers."""
        lowered, n_new = key.lower(), len(sel)
        if value is None or value < 0:
            return value
        if "start" in lowered or "begin" in lowered:
            return sum(1 for i in sel if i < value)
        if "end" in lowered or "stop" in lowered:
            return n_new - 1 if value >= n_layers - 1 else max(0, sum(1 for i in sel if i < value))
        if lowered.endswith("offset"):
            return min(value, n_new - 1)
        if any(w in lowered for w in ("period", "interval", "every_n", "step", "freq", "pattern", "group_size",
                                      "per_", "window_layers")):
            return max(1, min(value, n_new))
        if lowered.startswith(("num_", "n_")) and value > n_new:
            return n_new
        return value

    def per_layer_config(self, plc: dict, sel) -> dict:
        if sel is None:
            return plc
        out = {}
        width = max((len(k) for k in plc), default=2)
        for pos, i in enumerate(sel):
            overrides = plc.get(str(i).zfill(width)) or plc.get(str(i)) or plc.get(i)
            if isinstance(overrides, dict):
                sub = _Level(dict(overrides), self.cls, self.role, self.ctx)
                sub.orig = {**self.orig, **overrides}
                out[str(pos).zfill(width)] = {
                    k: sub.rule(k, v, None, None) for k, v in overrides.items()
                }
        return out

    def fix_relations(self, new: dict) -> None:
        o = self.orig
        heads_key = next((k for k in ("num_attention_heads", "num_heads", "attention_heads", "n_head")
                          if _is_int(o.get(k))), None)
        hidden_key = next((k for k in ("hidden_size", "d_model", "n_embd") if _is_int(o.get(k))), None)
        # hidden == heads * head_dim in the default config: keep it so.
        if heads_key and hidden_key and _is_int(o.get("head_dim")) and o["head_dim"] > 0 \
                and o[heads_key] * o["head_dim"] == o[hidden_key]:
            new["head_dim"] = new[hidden_key] // new[heads_key]
        # the same for other (heads, head_dim) pairs tied to the hidden size: swa / linear / mamba / index ...
        for hk in [k for k in o if "heads" in k and _is_int(o[k]) and k != heads_key]:
            stem = hk.replace("num_", "").replace("n_", "").replace("heads", "")
            for dk in [k for k in o if _is_int(o[k]) and o[k] > 0 and ("head_dim" in k or "d_head" in k)]:
                if dk == "head_dim" and not stem.startswith(("swa", "sliding")):
                    continue
                dstem = dk.replace("head_dim", "").replace("d_head", "")
                if not (stem.startswith(dstem) or dstem.startswith(stem)) or not stem or not dstem:
                    continue
                if hidden_key and o[hk] * o[dk] in (o[hidden_key], 2 * o[hidden_key]) and new[hk] > 0:
                    ratio = o[hk] * o[dk] // o[hidden_key]
                    expand = o.get("mamba_expand", o.get("expand"))
                    if ratio == 2 and _is_int(expand) and expand != 2:
                        continue
                    new[dk] = max(2, ratio * new[hidden_key] // new[hk])
        # head_dim None in the default config: the model reads config.head_dim, so give it hidden // heads.
        if "head_dim" in o and o["head_dim"] is None and heads_key and hidden_key and self.role == "text":
            new["head_dim"] = new[hidden_key] // new[heads_key]
        # MLA: head_dim is the rope part in several families, nope + rope in others; qk_head_dim = nope + rope.
        if _is_int(o.get("qk_rope_head_dim")) and _is_int(o.get("head_dim")) and _is_int(o.get("qk_nope_head_dim")):
            if o["head_dim"] == o["qk_rope_head_dim"]:
                new["head_dim"] = new["qk_rope_head_dim"]
            elif o["head_dim"] == o["qk_rope_head_dim"] + o["qk_nope_head_dim"]:
                new["head_dim"] = new["qk_rope_head_dim"] + new["qk_nope_head_dim"]
        if _is_int(o.get("qk_head_dim")) and _is_int(new.get("qk_nope_head_dim")) and _is_int(new.get("qk_rope_head_dim")):
            new["qk_head_dim"] = new["qk_nope_head_dim"] + new["qk_rope_head_dim"]
        # mamba2 style: n_heads * head_dim == expand * hidden
        for hk, dk in (("mamba_n_heads", "mamba_head_dim"), ("mamba_num_heads", "mamba_head_dim"),
                       ("mamba_n_heads", "mamba_d_head")):
            exp = o.get("mamba_expand", o.get("expand"))
            if _is_int(o.get(hk)) and _is_int(o.get(dk)) and _is_int(exp) and hidden_key \
                    and o[hk] * o[dk] == exp * o[hidden_key]:
                new[dk] = 8
                new[hk] = exp * new[hidden_key] // 8
        # rope
        def rotary_dim(partial):
            base = None
            for k in ("qk_rope_head_dim", "head_dim"):
                if _is_int(new.get(k)) and new[k] > 0:
                    base = new[k]
                    break
            if base is None and heads_key and hidden_key:
                base = new[hidden_key] // new[heads_key]
            base = base or 8
            partial = partial if partial is not None else new.get("partial_rotary_factor") or 1.0
            return int(base * partial)
        for key in ("rope_parameters", "rope_scaling"):
            if key in new:
                new[key] = _shrink_rope(new[key], rotary_dim)
        # Multimodal rope whose sections the modeling code defaults (sized for the released head_dim) when the
        # config has none: the config class says it reads them (`ignore_keys_at_rope_validation`).
        if "mrope_section" in (getattr(self.cls, "ignore_keys_at_rope_validation", None) or ()) \
                and isinstance(new.get("rope_parameters"), dict) and "mrope_section" not in new["rope_parameters"] \
                and not any(isinstance(v, dict) for v in new["rope_parameters"].values()):
            partial = new["rope_parameters"].get("partial_rotary_factor")
            new["rope_parameters"] = {**new["rope_parameters"],
                                      "mrope_section": _default_sections(rotary_dim(partial) // 2)}
        # a sliding window the default leaves None although some layer types are sliding
        types = [t for k, v in new.items() if k.endswith("layer_types") and isinstance(v, list) for t in v]
        # (or whose model names sliding-attention knobs and builds a sliding mask regardless)
        if any("sliding" in str(t) for t in types) or any("sliding" in k and k not in ("sliding_window",
                                                           "sliding_window_size") and new[k] for k in new):
            for key in ("sliding_window", "sliding_window_size"):
                if key in new and new[key] is None:
                    new[key] = _WINDOW
        for key in ("mrope_section",):
            if isinstance(new.get(key), (list, tuple)):
                new[key] = _scale_sections(new[key], rotary_dim(None) // 2)
        # settings every tiny model shares
        for key, value in (("initializer_range", 0.2), ("use_cache", False), ("tie_word_embeddings", False)):
            if key in new:
                new[key] = value


def _shrink_tree(tree: dict, config, ctx: _Context, text_config) -> dict:
    """Shrink a config dict and its sub-config dicts; the text decoder first (its sizes are anchors for the rest)."""
    subs = _sub_configs(config)
    text_key = next((k for k, v in subs.items() if v is text_config), None)
    role = "text" if config is text_config else ("top" if subs else "other")
    order = ([text_key] if text_key else []) + [k for k in subs if k != text_key]
    shrunk_subs = {}
    for key in order:
        if isinstance(tree.get(key), dict):
            shrunk_subs[key] = _shrink_tree(tree[key], subs[key], ctx, text_config)
    level = _Level({k: v for k, v in tree.items() if k not in shrunk_subs}, type(config), role, ctx)
    out = level.shrink()
    out.update(shrunk_subs)
    return out


def _apply_overrides(tree: dict, overrides: dict, num_layers: int) -> None:
    """Family overrides; a callable value is called with the tiny layer count (per-layer lists)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict) and key not in ("rope_parameters", "rope_scaling"):
            _apply_overrides(tree[key], value, num_layers)
        else:
            tree[key] = value(num_layers) if callable(value) else copy.deepcopy(value)


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


def tiny_config(model_type: str, *, num_experts: int = 4, top_k: int = 2, hidden_size: int = 32, num_layers: int = 2,
                expert_size: int = 64, vocab_size: int = 128, base: PreTrainedConfig | None = None):
    """A tiny config of `model_type`: its `AutoConfig.for_model` defaults (or `base`, e.g. a user's own config) with
    every size knob shrunk."""
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
        ctx = _Context(sizes, tree)
        text = _text_config(default)
        shrunk = _shrink_tree(tree, default, ctx, text)
        _apply_overrides(shrunk, _FAMILY_OVERRIDES.get(model_type, {}), num_layers)
        for key in ("transformers_version", "architectures", "_name_or_path"):
            shrunk.pop(key, None)
        config = type(default).from_dict(shrunk)
    # top-level copies of the shared settings (a composite config keeps its own tie_word_embeddings)
    for key, value in (("initializer_range", 0.2), ("use_cache", False), ("tie_word_embeddings", False)):
        try:
            setattr(config, key, value)
        except Exception:
            pass
    return config


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def _special_ids(config) -> set[int]:
    ids: set = set()
    _collect_token_ids(config.to_dict(), ids)
    return ids


def _first_attr(configs, names):
    for c in configs:
        for name in names:
            try:
                value = getattr(c, name, None)
            except Exception:
                value = None
            if value is not None:
                return value
    return None


def _vision_int(vision, names, default):
    value = _first_attr([vision], names)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if _is_int(value) else default


def _image_candidates(config, vision, batch: int, generator, params: set):
    """Candidate image inputs, most common layout first: (name, kwargs for the vision path)."""
    patch = _vision_int(vision, ("patch_size", "native_patch_size"), _VISION["patch_size"])
    merge = _vision_int(vision, ("spatial_merge_size", "merge_size", "adapter_merge_size"), 1)
    temporal = _vision_int(vision, ("temporal_patch_size", "patch_temporal"), 1)
    channels = _vision_int(vision, ("in_channels", "num_channels", "in_chans"), 3)
    out = []
    if "image_grid_thw" in params:
        grid = (1, 2 * merge, 2 * merge)
        n = grid[0] * grid[1] * grid[2]
        thw = torch.tensor([grid] * batch)
        for t in dict.fromkeys((temporal, 1)):
            # Qwen-VL layout: one row per patch, (channels, temporal, patch, patch) flattened
            out.append((f"grid-flat-t{t}", {"pixel_values": torch.randn(batch * n, channels * t * patch * patch,
                                                                          generator=generator),
                                            "image_grid_thw": thw}))
        # merged-token layout: one (merge*patch, merge*patch, channels) block per merged token, grid in tokens
        tokens = (1, 2, 2)
        out.append(("grid-blocks", {"pixel_values": torch.randn(batch * 4, merge * patch, merge * patch, channels,
                                                                generator=generator),
                                    "image_grid_thw": torch.tensor([tokens] * batch)}))
    if "image_position_ids" in params:
        # patch sequence + (x, y) patch positions, pooled by pooling_kernel_size: a (2k x 2k) patch grid -> 4 tokens
        k = _vision_int(vision, ("pooling_kernel_size",), 1)
        side = 2 * k
        xy = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)
        out.append(("patches-positions", {
            "pixel_values": torch.rand(batch, side * side, channels * patch * patch, generator=generator),
            "image_position_ids": xy.unsqueeze(0).repeat(batch, 1, 1)}))
    size = _vision_int(vision, ("image_size",), patch * 4)
    fixed = {"pixel_values": torch.randn(batch, channels, size, size, generator=generator)}
    if "image_sizes" in params:
        fixed["image_sizes"] = torch.tensor([[size, size]] * batch)
    out.append(("fixed", fixed))
    return out


def _count_image_tokens(model, kwargs: dict, batch: int, hidden: int) -> int | None:
    """Placeholder tokens per image: the release's own `get_image_features` output, in text-hidden-sized rows."""
    get = getattr(model, "get_image_features", None) or getattr(getattr(model, "model", None), "get_image_features", None)
    if get is None:
        return None
    accepted = set(inspect.signature(get).parameters)
    call = {k: v for k, v in kwargs.items() if k in accepted or "kwargs" in accepted}
    out = get(**call)
    feats = out
    if hasattr(out, "pooler_output") and getattr(out, "pooler_output", None) is not None:
        feats = out.pooler_output
    elif hasattr(out, "last_hidden_state"):
        feats = out.last_hidden_state
    tensors = list(feats) if isinstance(feats, (list, tuple)) else [feats]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    total = sum(t.numel() for t in tensors)
    if total % (hidden * batch):
        return None
    return total // (hidden * batch)


_IMAGE_PLANS: dict[str, tuple] = {}
IMAGE_FALLBACKS: dict[str, str] = {}
"""Multimodal model types whose sample inputs fell back to text only, with the reason (filled by `sample_inputs`)."""


def _image_plan(config, batch: int, params: set):
    """(layout name, tokens per image) that this release's model accepts, found by running the vision path of a
    throw-away tiny model on each candidate layout; None when no layout works (text-only inputs)."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str) + f"|{batch}"
    if key in _IMAGE_PLANS:
        return _IMAGE_PLANS[key]
    from transformers.modeling_utils import set_zero3_state

    vision = _first_attr([config], ("vision_config",))
    hidden = _text_config(config).hidden_size
    plan, errors = None, []
    with torch.random.fork_rng(), torch.no_grad(), warnings.catch_warnings(), set_zero3_state():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = model_class_for(config.model_type)(copy.deepcopy(config)).eval()
        generator = torch.Generator().manual_seed(0)
        for name, kwargs in _image_candidates(config, vision, batch, generator, params):
            try:
                n = _count_image_tokens(model, kwargs, batch, hidden)
                if not n:
                    errors.append(f"{name}: no image features")
                    continue
                ids, extra = _with_images(config, [[0] * 4] * batch, kwargs, n)
                model(input_ids=ids, **extra, **_type_ids(ids, config, params))
                plan = (name, n)
                break
            except Exception as e:  # this layout is not the one the model takes
                errors.append(f"{name}: {type(e).__name__}: {str(e)[:160]}")
    if plan is None:
        IMAGE_FALLBACKS[config.model_type] = "; ".join(errors) or "no image layout"
    _IMAGE_PLANS[key] = plan
    return plan


def _with_images(config, rows, image_kwargs: dict, n_tokens: int):
    image_token = _first_attr([config], ("image_token_id", "image_token_index"))
    start = _first_attr([config], ("vision_start_token_id", "image_start_token_id", "boi_token_id"))
    end = _first_attr([config], ("vision_end_token_id", "image_end_token_id", "eoi_token_id"))
    tokens = ([start] if start is not None else []) + [image_token] * n_tokens + ([end] if end is not None else [])
    ids = torch.tensor([row[:2] + tokens + row[2:] for row in rows])
    return ids, dict(image_kwargs)


def _type_ids(input_ids, config, params: set) -> dict:
    out = {}
    image_token = _first_attr([config], ("image_token_id", "image_token_index"))
    if "mm_token_type_ids" in params:
        out["mm_token_type_ids"] = (input_ids == image_token).int() if image_token is not None \
            else torch.zeros_like(input_ids, dtype=torch.int)
    if "token_type_ids" in params:
        out["token_type_ids"] = (input_ids == image_token).long() if image_token is not None \
            else torch.zeros_like(input_ids)
    return out


def sample_inputs(config, *, batch: int = 2, seq: int = 8, seed: int = 1234, images: bool | None = None) -> dict:
    """Forward keyword arguments (with ``labels``) for a tiny model of `config`.

    Text: ``input_ids`` drawn outside the special token ids. Multimodal configs also get one small image per sample
    (``images=None``: when this release's model accepts one of the known layouts, else text only, recorded in
    `IMAGE_FALLBACKS`; ``images=True`` raises instead). The layout (Qwen-VL flattened patches + ``image_grid_thw``,
    merged-token blocks, or a fixed-size ``(B, C, H, W)`` image) and the number of image tokens per image are found
    by running the vision path of a throw-away tiny model, so nothing is hard-coded per family.
    ``mm_token_type_ids`` / ``token_type_ids`` are added when the forward takes them.
    """
    generator = torch.Generator().manual_seed(seed)
    text = _text_config(config)
    specials = _special_ids(config)
    allowed = torch.tensor([i for i in range(text.vocab_size) if i not in specials])
    rows = allowed[torch.randint(len(allowed), (batch, seq), generator=generator)].tolist()
    try:
        params = set(inspect.signature(model_class_for(config.model_type).forward).parameters)
    except Exception:
        params = set()
    extra: dict = {}
    input_ids = torch.tensor(rows)
    want = images if images is not None else True
    if want and is_multimodal(config) and "pixel_values" in params \
            and _first_attr([config], ("vision_config",)) is not None \
            and _first_attr([config], ("image_token_id", "image_token_index")) is not None:
        plan = _image_plan(config, batch, params)
        if plan is None and images:
            raise ValueError(f"{config.model_type}: no image layout works: {IMAGE_FALLBACKS.get(config.model_type)}")
        if plan is not None:
            name, n_tokens = plan
            candidates = dict(_image_candidates(config, _first_attr([config], ("vision_config",)), batch,
                                                generator, params))
            input_ids, extra = _with_images(config, rows, candidates[name], n_tokens)
    inputs = {"input_ids": input_ids, **extra, **_type_ids(input_ids, config, params)}
    labels = input_ids.clone()
    labels[torch.isin(labels, torch.tensor(sorted(specials) or [-1]))] = -100
    inputs["labels"] = labels
    return inputs


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def expert_count(model, *, local: bool = False) -> int | None:
    """The routed-expert count of a model read from its weights: dim 0 of the first expert tensor (a DTensor's
    global shape, or with ``local=True`` this rank's shard). Robust to however the config names the count."""
    for _, param in sorted(expert_parameters(model).items()):
        if param.dim() >= 2:
            return int((local_tensor(param) if local else param).shape[0])
    return None


def _check_dims_patterns(model) -> list[tuple[str, int, int]]:
    """(target pattern, dim0, dim1) of every `Transpose(check_dims=True)` conversion the release applies when
    loading `model` (for qwen3_vl_moe in 5.23/5.24: the fused expert tensors)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Transpose
    except ImportError:
        return []
    out = []
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:
        return []
    for transform in transforms or []:
        for op in getattr(transform, "operations", None) or []:
            if isinstance(op, Transpose) and getattr(op, "check_dims", False):
                targets = getattr(transform, "target_patterns", None) or []
                for target in [targets] if isinstance(targets, str) else targets:
                    out.append((target, op.dim0, op.dim1))
    return out


def _to_hub_layout(path: Path, patterns) -> int:
    """Rewrite the saved tensors a `Transpose(check_dims=True)` conversion targets into the transposed (released
    hub) layout. Returns how many tensors were rewritten.

    Upstream bug (transformers 5.23/5.24, not the shim's): `Transpose(check_dims=True)` decides whether to transpose
    by comparing the loaded tensor with `model.get_parameter(...).shape`, which under EP is the DTensor's *global*
    shape while the tensor is already this rank's shard, so they never match and a checkpoint in model layout
    (what `save_pretrained` writes) is transposed wrongly -> size-mismatch RuntimeError. Released hub checkpoints
    store the transposed layout, which loads correctly both single-process and under EP, so the tiny checkpoint is
    written that way too.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    rewritten = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        changed = False
        for key, tensor in tensors.items():
            for pattern, dim0, dim1 in patterns:
                if re.search(pattern, key) and tensor.dim() > max(dim0, dim1) and tensor.shape[dim0] != tensor.shape[dim1]:
                    tensors[key] = tensor.transpose(dim0, dim1).contiguous()
                    changed = True
                    rewritten += 1
                    break
        if changed:
            save_file(tensors, str(file), metadata=metadata)
    return rewritten


def routing_of(config) -> dict[str, int]:
    """The routed-expert count and experts per token a config declares (its text config for a composite one),
    however the family spells them; missing ones are left out."""
    found: dict[str, int] = {}
    for key, value in _text_config(config).to_dict().items():
        if not _is_int(value) or value < 1:
            continue
        if _EXPERT_COUNT_KEY.match(key):
            found.setdefault("num_experts", value)
        elif _TOPK_KEY.search(key):
            found.setdefault("top_k", value)
    return found


def build_shrunk_model(path: str | os.PathLike, base: PreTrainedConfig, *, num_experts: int, seed: int = 0) -> Path:
    """`build_tiny_model` for a given architecture (`base`, e.g. a user's own config): the same model type, expert
    routing and options, shrunk. It keeps the experts per token (up to the tiny expert count, which grows in steps
    of `num_experts` / 2 to hold them)."""
    top_k = routing_of(base).get("top_k", SIZES["top_k"])
    step = max(1, num_experts // 2)
    while num_experts < top_k:
        num_experts += step
    return build_tiny_model(path, base.model_type, seed=seed, base=base, num_experts=num_experts, top_k=top_k)


def build_tiny_model(path: str | os.PathLike, model_type: str, *, seed: int = 0, base: PreTrainedConfig | None = None,
                     **sizes) -> Path:
    """Build (once) and save a tiny random checkpoint of `model_type` at `path`; return the path.

    Same scheme as `tiny_moe.build_tiny_moe` (`built_once`): rebuilt when the transformers release, type, seed or
    sizes differ from the stamp in `path`. After saving, a single-process `from_pretrained` must reload it
    identically, else it raises.
    """
    # The config's own digest too: a change of the shrinking rules (or of the release's defaults) rebuilds.
    config = tiny_config(model_type, base=base, **sizes)
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()
    stamp = {"transformers": transformers.__version__, "model_type": model_type, "seed": seed, "config": digest[:16],
             **sizes}
    return built_once(path, stamp, lambda: _build(Path(path), model_type, seed, config))


def _build(path: Path, model_type: str, seed: int, config) -> None:
    if is_deepspeed_zero3_enabled():
        raise RuntimeError("build the tiny checkpoint before ZeRO-3 is signalled (an HfDeepSpeedConfig is alive)")
    head = model_class_for(model_type)
    torch.manual_seed(seed)
    model = head._from_config(config, dtype=torch.float32)
    redraw(model, seed)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(path)
    patterns = _check_dims_patterns(model)
    if patterns:
        _to_hub_layout(path, patterns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = head.from_pretrained(path, dtype=torch.float32)
    mine, theirs = model.state_dict(), reloaded.state_dict()
    bad = sorted(k for k in mine if k not in theirs or mine[k].shape != theirs[k].shape
                 or not torch.equal(mine[k], theirs[k]))
    missing = sorted(set(theirs) - set(mine))
    if bad or missing:
        raise RuntimeError(f"{model_type}: the saved checkpoint does not reload identically: differs {bad[:5]}, "
                           f"unexpected {missing[:5]}")
