"""The tiny sizes, and how the config knobs are recognised by their attribute names (however a family spells them)."""

from __future__ import annotations

import re

SIZES = dict(num_experts=4, top_k=2, hidden_size=32, num_layers=2, expert_size=64, vocab_size=128)
"""Default tiny sizes (the keyword arguments of `tiny_config` / `build_tiny_model` / `build_tiny_moe`)."""

MAX_POSITIONS = 256  # seq + image tokens stay far below this
WINDOW = 4  # a sliding window / attention chunk smaller than the sample sequence, so it actually matters
RANK = 16  # low-rank projections (MLA q/kv LoRA ranks, gate ranks)
HEAD_DIM_DIVISOR = 8  # head dims without a fixed relation to hidden_size: 128 -> 16, 64 -> 8 (rope sections fit)
VISION = dict(hidden_size=32, intermediate_size=64, num_heads=4, depth=2, patch_size=4, image_size=16)
SHARED_SETTINGS = (("initializer_range", 0.2), ("use_cache", False), ("tie_word_embeddings", False))
"""Settings every tiny model shares. A wide init makes routing and every expert matter for the logits, so a wrong
expert shard shows up as a large difference instead of hiding under float noise."""

LAYER_COUNT_KEYS = ("num_hidden_layers", "depth", "n_layers", "num_layers", "encoder_layers", "n_layer")
TOKEN_KEY = re.compile(r"(^|_)token_(id|ids|index|idx)$")
EXPERT_COUNT_KEY = re.compile(
    r"^(n|num|moe_num|moe_n|num_moe|num_routed|n_routed|num_local|moe_num_routed)_(routed_|local_)?experts?$"
    r"|^expert_num$|^num_expert$"
)
TOPK_KEY = re.compile(
    r"experts_per_tok(en)?$|^moe_k$|^moe_top_?k$|^top_?k_experts?$|^num_selected_experts$|^router_top_?k$"
)
SHARED_COUNT_KEY = re.compile(r"^(n|num|moe_num|moe_n)_shared_experts?$")
GROUP_KEY = re.compile(r"^(n_group|num_expert_group|n_expert_groups?|topk_group|topk_groups)$")
INDEX_LIST_KEY = re.compile(r"(layers|indexes|indices|layer_ids|_idx|_ids)$")
# Sizes of a vision / audio tower's output, which feed the text decoder: they must equal the text hidden size.
TO_TEXT_HIDDEN_KEYS = ("out_hidden_size", "output_dim", "text_hidden_size", "adapter_out_dim", "out_dim",
                       "output_hidden_size", "llm_hidden_size", "text_dim", "text_hidden_dim")
DENSE_PREFIX_KEY = re.compile(r"^(first_k_dense_replace|num_dense_layers|first_k_dense|n_dense_layers)$")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def even(value: float, minimum: int = 2) -> int:
    return max(minimum, int(round(value / 2)) * 2)


def matches(pattern: re.Pattern, *keys: str) -> bool:
    """`pattern` matches (from the start) one of `keys` (an attribute and its canonical name)."""
    return any(pattern.match(key) for key in keys)


def token_ids(tree: dict, out: set | None = None) -> set[int]:
    """Every special token id a config dict (and its sub-config dicts) names."""
    out = set() if out is None else out
    for key, value in tree.items():
        if not isinstance(key, str) or key in ("id2label", "label2id"):
            continue
        if isinstance(value, dict):
            token_ids(value, out)
        elif TOKEN_KEY.search(key):
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if is_int(v) and v >= 0:
                    out.add(v)
    return out
