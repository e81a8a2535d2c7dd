"""Per-family settings that cannot be derived from attribute names. Keep this small; each entry says why.

Nested dicts apply to the sub-config of that name (``text_config``); a callable gets the tiny layer count."""

from __future__ import annotations

import copy


def _last_is(first: str, last: str):
    """A per-layer list for n tiny layers: `first` everywhere but the last layer."""
    return lambda n: [first] * (n - 1) + [last] if n > 1 else [last]


FAMILY_OVERRIDES: dict[str, dict] = {
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


def apply_overrides(tree: dict, model_type: str, num_layers: int) -> None:
    """`model_type`'s family overrides, applied to its shrunk config dict in place."""
    _apply(tree, FAMILY_OVERRIDES.get(model_type, {}), num_layers)


def _apply(tree: dict, overrides: dict, num_layers: int) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict) and key not in ("rope_parameters", "rope_scaling"):
            _apply(tree[key], value, num_layers)
        else:
            tree[key] = value(num_layers) if callable(value) else copy.deepcopy(value)
