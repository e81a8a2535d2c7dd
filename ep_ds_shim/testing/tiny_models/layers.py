"""Which layers of the released stack a tiny model keeps, and the layer indices, periods and counts mapped onto them."""

from __future__ import annotations

import json
import re

from .knobs import DENSE_PREFIX_KEY, INDEX_LIST_KEY, LAYER_COUNT_KEYS, TOKEN_KEY, is_int


def layer_count(d: dict) -> tuple[str | None, int | None]:
    """(key, value) of a config dict's layer count, however it is spelled; (None, None) without one."""
    for key in LAYER_COUNT_KEYS:
        if is_int(d.get(key)) and d[key] > 0:
            return key, d[key]
    return None, None


def is_per_layer_list(key: str, value, n_layers: int | None) -> bool:
    """A list with one entry per layer (layer_types, mlp_layer_types, per-layer head counts ...)."""
    return isinstance(value, (list, tuple)) and n_layers is not None and len(value) == n_layers and n_layers > 1 \
        and not TOKEN_KEY.search(key)


def is_layer_index_list(key: str, value, n_layers: int | None) -> bool:
    """A list of layer indices (mlp_only_layers, no_rope_layers given as indices ...)."""
    return isinstance(value, (list, tuple)) and n_layers is not None and bool(INDEX_LIST_KEY.search(key)) \
        and not TOKEN_KEY.search(key) and all(is_int(x) and 0 <= x < n_layers for x in value)


def _per_layer_lists(d: dict, n_layers: int) -> dict:
    return {k: v for k, v in d.items() if is_per_layer_list(k, v, n_layers)}


def _index_lists(d: dict, n_layers: int, per_layer: dict) -> dict:
    return {k: set(v) for k, v in d.items() if k not in per_layer and is_layer_index_list(k, v, n_layers)}


def _per_layer_overrides(d: dict) -> dict[int, dict]:
    plc = d.get("per_layer_config")
    if not isinstance(plc, dict):
        return {}
    return {int(k): v for k, v in plc.items() if isinstance(v, dict)}


def select_layers(d: dict, n_layers: int, keep: int) -> list[int]:
    """Which of the original layers the tiny model keeps: a MoE layer first, then one of each distinct layer kind
    (attention type, MLP type, membership of per-layer index lists, per-layer overrides), in order."""
    if n_layers <= keep:
        return list(range(n_layers))
    per_layer = _per_layer_lists(d, n_layers)
    index_lists = _index_lists(d, n_layers, per_layer)
    overrides = _per_layer_overrides(d)
    dense_prefix = next((d[k] for k in d if DENSE_PREFIX_KEY.match(k) and is_int(d[k])), 0)

    def signature(i):
        return (
            tuple(str(v[i]) for v in per_layer.values()),
            tuple(i in s for s in index_lists.values()),
            json.dumps(overrides.get(i), sort_keys=True, default=str),
            i < dense_prefix,
        )

    moe_start = next((d[k] for k in d if is_int(d[k]) and re.search(r"(moe|expert|sparse).*start|start.*(moe|expert)", k)), 0)

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


def kept_entries(key: str, value, n_layers: int, sel: list[int], size):
    """A per-layer list cut down to the kept layers: entries that are layer indices (e.g. the layer whose KV cache
    each layer reads) renumbered, integer entries that are sizes shrunk by `size`, others kept."""
    picked = [value[i] for i in sel]
    if INDEX_LIST_KEY.search(key) and all(is_int(x) and 0 <= x < n_layers for x in value) and max(value) > 1:
        picked = [sel.index(x) if x in sel else pos for pos, x in enumerate(picked)]
    elif all(is_int(x) for x in picked):
        picked = [size(x) for x in picked]
    return type(value)(picked) if isinstance(value, tuple) else picked


def kept_indices(value, sel: list[int]) -> list[int]:
    """A list of original layer indices mapped to the positions of the kept layers among them."""
    return [pos for pos, i in enumerate(sel) if i in set(value)]


def is_layerish(lowered: str) -> bool:
    """A scalar about the layer stack (an index, a period, a count), not a width."""
    return ("layer" in lowered and not any(w in lowered for w in ("hidden", "vocab", "dim", "intermediate"))) \
        or any(w in lowered for w in ("_period", "_interval", "_every_n", "sparse_step", "_freq", "pattern"))


def layer_scalar(key: str, value, n_layers: int, sel: list[int]):
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
