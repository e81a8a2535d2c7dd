"""The shrinking rules for one config level (a plain config, or one sub-config of a composite one), as a dict: each
knob is recognised by its attribute name and given its tiny value; `relations` then restores what tied them."""

from __future__ import annotations

import copy
import re

from . import layers
from .knobs import (
    DENSE_PREFIX_KEY, EXPERT_COUNT_KEY, GROUP_KEY, HEAD_DIM_DIVISOR, LAYER_COUNT_KEYS, MAX_POSITIONS,
    RANK, SHARED_COUNT_KEY, TO_TEXT_HIDDEN_KEYS, TOKEN_KEY, TOPK_KEY, VISION, WINDOW, even, is_int, matches,
    token_ids,
)
from .relations import restore_relations

_NO_RULE = object()  # a rule group that does not apply to the knob (None is a legitimate tiny value)


class Context:
    """What the levels of one config share: the sizes asked for, the special token ids' new places, and the
    released widths already shrunk (text / vision hidden sizes), which other levels' widths refer to."""

    def __init__(self, sizes: dict, tree: dict):
        self.sizes = sizes
        ids = token_ids(tree)
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
        return self.token_map.get(value, value) if is_int(value) else value


class Level:
    """Shrinks one config level; `role` is "text" for the text decoder, anything else for a tower or a wrapper."""

    def __init__(self, d: dict, cls, role: str, ctx: Context):
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
            self.hidden, self.inter, self.heads = VISION["hidden_size"], VISION["intermediate_size"], VISION["num_heads"]
            self.keep_layers = min(s["num_layers"], VISION["depth"])

    def shrink(self) -> dict:
        d = self.d
        _, n_layers = layers.layer_count(d)
        sel = layers.select_layers(d, n_layers, self.keep_layers) if n_layers else None
        hidden_key = "hidden_size" if "hidden_size" in d else next(
            (k for k in ("d_model", "n_embd", "dim", "model_dim") if is_int(d.get(k))), None)
        if hidden_key and is_int(d.get(hidden_key)):
            self.ctx.anchors.setdefault(d[hidden_key], self.hidden)
        new = {key: self.rule(key, value, n_layers, sel) for key, value in d.items()}
        restore_relations(self.orig, new, self.cls, self.role)
        return new

    # -- by the kind of value ---------------------------------------------------------------------------------------
    def rule(self, key, value, n_layers, sel):
        canon = self.amap.get(key, key)
        lowered = key.lower()
        if isinstance(value, dict) and key == "per_layer_config":
            return self.per_layer_config(value, sel)
        if key in ("rope_parameters", "rope_scaling"):
            return value  # after the head dims are known (relations)
        if TOKEN_KEY.search(key):
            return self.ctx.token(value)
        if isinstance(value, (bool, str)):
            return self.bool_rule(key, value)
        if sel is not None and layers.is_per_layer_list(key, value, n_layers):
            return layers.kept_entries(key, value, n_layers, sel,
                                       lambda x: self.scalar(key, canon, x, n_layers, sel))
        if sel is not None and value and layers.is_layer_index_list(key, value, n_layers):
            return layers.kept_indices(value, sel)
        if isinstance(value, (list, tuple)) and value and all(is_int(x) for x in value):
            return self.list_rule(lowered, value)
        if is_int(value) or (value is None and (EXPERT_COUNT_KEY.match(canon) or TOPK_KEY.search(canon))):
            return self.scalar(key, canon, value, n_layers, sel)
        if value is None and self.role == "text":
            return self.none_rule(key, lowered)
        return value

    def list_rule(self, lowered, value):
        """A list of sizes that is not per layer (per-stage widths, patch sizes ...)."""
        if "intermediate" in lowered or "ffn" in lowered:
            return [self.inter] * len(value)
        if "patch_size" in lowered:
            return [min(x, VISION["patch_size"]) for x in value]
        if self.role != "text" and "channels" in lowered:
            return [min(x, self.hidden) for x in value]
        return value

    def none_rule(self, key, lowered):
        """Knobs a default config leaves None although the model needs them once MoE / all layer kinds are on."""
        if SHARED_COUNT_KEY.match(key):
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
        """An integer knob (or an expert count / top-k left None): the first group of rules that knows it."""
        lowered = key.lower()
        for group in (lambda: self.routing(key, canon, value), lambda: self.attention(key, lowered, value),
                      lambda: self.stack(key, lowered, value, n_layers, sel), lambda: self.low_rank(lowered, value),
                      lambda: self.extent(lowered, value), lambda: self.width(key, lowered, value)):
            tiny = group()
            if tiny is not _NO_RULE:
                return tiny
        return value

    # -- integer knobs, by what they size ---------------------------------------------------------------------------
    def routing(self, key, canon, value):
        s = self.ctx.sizes
        if matches(EXPERT_COUNT_KEY, canon, key):
            if value is None:
                return s["num_experts"] if self.role == "text" else None
            return s["num_experts"] if value >= 1 else value  # 0: MoE off in a dense variant
        if TOPK_KEY.search(canon) or TOPK_KEY.search(key):
            return s["top_k"] if value is None else min(value, s["top_k"])
        if matches(SHARED_COUNT_KEY, canon, key):
            return min(value, 1)
        if matches(GROUP_KEY, canon, key):
            return 1
        return _NO_RULE

    def attention(self, key, lowered, value):
        if "heads" in lowered or lowered in ("n_head", "num_heads", "attention_heads"):
            return self.new_heads(key, value)
        if "head_dim" in lowered or "d_head" in lowered or lowered.endswith("head_size"):
            return 0 if value == 0 else even(value / HEAD_DIM_DIVISOR)
        return _NO_RULE

    def stack(self, key, lowered, value, n_layers, sel):
        if sel is None:
            return _NO_RULE
        if key in LAYER_COUNT_KEYS:
            return len(sel)
        if DENSE_PREFIX_KEY.match(key):
            return sum(1 for i in sel if i < value)
        if layers.is_layerish(lowered):
            return layers.layer_scalar(key, value, n_layers, sel)
        return _NO_RULE

    @staticmethod
    def low_rank(lowered, value):
        if "lora_rank" in lowered or lowered.endswith("_rank") and "dt_rank" not in lowered:
            return min(value, RANK)
        if "dt_rank" in lowered:
            return min(value, 8)
        if "d_state" in lowered or "state_size" in lowered:
            return min(value, 8)
        if lowered in ("n_groups", "mamba_n_groups", "num_groups") or lowered.endswith("_n_groups"):
            return 1
        return _NO_RULE

    def extent(self, lowered, value):
        """Vocabulary, positions, windows, and the image geometry."""
        if "vocab_size" in lowered:
            return min(value, self.ctx.sizes["vocab_size"])
        if lowered in ("max_position_embeddings", "model_max_length", "max_seq_len", "max_sequence_length",
                       "seq_length", "n_positions"):
            return min(value, MAX_POSITIONS)
        if lowered == "num_position_embeddings":
            return (VISION["image_size"] // VISION["patch_size"]) ** 2
        if lowered == "posemb_grid_size":
            return VISION["image_size"] // VISION["patch_size"]
        if ("sliding_window" in lowered and "pattern" not in lowered) or lowered == "attention_chunk_size":
            return min(value, WINDOW) if value > 0 else value
        if lowered == "image_size":
            return VISION["image_size"]
        if lowered == "patch_size":
            return min(value, VISION["patch_size"])
        return _NO_RULE

    def width(self, key, lowered, value):
        if key == "hidden_size" or key in ("d_model", "n_embd"):
            return self.hidden
        if self.role != "text" and lowered in TO_TEXT_HIDDEN_KEYS:
            # a tower's output width: the text hidden size, or k x a tower's hidden size (merged patches)
            if value in self.ctx.anchors:
                return self.ctx.anchors[value]
            for orig, tiny in sorted(self.ctx.anchors.items(), reverse=True):
                if value % orig == 0 and 2 <= value // orig <= 16:
                    return tiny * (value // orig)
            return self.ctx.sizes["hidden_size"]
        if self.role != "text" and "channels" in lowered and lowered not in ("num_channels", "in_channels"):
            return min(value, self.hidden)
        if lowered in ("position_embedding_size", "max_num_patches", "num_patches"):
            return min(value, MAX_POSITIONS)
        if lowered == "max_image_size":
            return min(value, 4 * VISION["image_size"])
        if value in self.ctx.anchors and ("size" in lowered or "dim" in lowered or "hidden" in lowered):
            return self.ctx.anchors[value]
        if any(w in lowered for w in ("intermediate", "ffn", "mlp_dim", "expert_dim", "moe_hidden", "shared_expert",
                                      "share_expert", "hidden_size", "hidden_dim", "projection", "projector")):
            return min(value, self.inter) if value > 0 else value
        return _NO_RULE

    # -- heads --------------------------------------------------------------------------------------------------
    def orig_heads(self, key: str) -> int | None:
        """The query-head count that goes with a head-count or head-dim key (``swa_`` / ``linear_`` prefixes)."""
        prefix = key.split("num_")[0] if "num_" in key else ""
        for cand in (f"{prefix}num_attention_heads", f"{prefix}num_heads", "num_attention_heads", "num_heads",
                     "attention_heads", "n_head", "n_heads"):
            if is_int(self.orig.get(cand)):
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
            values = [v for k, v in self.orig.items() if "value_heads" in k and is_int(v)]
            if values and value == values[0]:
                return self.heads
            return max(1, self.heads // 2)
        return self.heads

    def per_layer_config(self, plc: dict, sel) -> dict:
        """Per-layer overrides of the kept layers, renumbered and shrunk by the same rules."""
        if sel is None:
            return plc
        out = {}
        width = max((len(k) for k in plc), default=2)
        for pos, i in enumerate(sel):
            overrides = plc.get(str(i).zfill(width)) or plc.get(str(i)) or plc.get(i)
            if isinstance(overrides, dict):
                sub = Level(dict(overrides), self.cls, self.role, self.ctx)
                sub.orig = {**self.orig, **overrides}
                out[str(pos).zfill(width)] = {k: sub.rule(k, v, None, None) for k, v in overrides.items()}
        return out
