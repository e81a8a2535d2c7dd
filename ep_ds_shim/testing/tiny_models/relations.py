"""Relations the default config had between its knobs, re-established on the tiny values: ``hidden == heads *
head_dim``, ``qk_head_dim == nope + rope``, mamba's ``heads * head_dim == expand * hidden``, rope sections that fill
the rotary dims, a sliding window where layers slide."""

from __future__ import annotations

from .knobs import SHARED_SETTINGS, WINDOW, is_int
from .rope import default_sections, scale_sections, shrink_rope


def restore_relations(orig: dict, new: dict, cls, role: str) -> None:
    """`new` (the shrunk config dict of one level) made to keep the relations `orig` (its default) had."""
    heads_key = next((k for k in ("num_attention_heads", "num_heads", "attention_heads", "n_head")
                      if is_int(orig.get(k))), None)
    hidden_key = next((k for k in ("hidden_size", "d_model", "n_embd") if is_int(orig.get(k))), None)
    _head_dims(orig, new, heads_key, hidden_key, role)
    _latent_attention(orig, new)
    _mamba(orig, new, hidden_key)
    _rope(new, cls, heads_key, hidden_key)
    _sliding_window(new)
    for key, value in SHARED_SETTINGS:
        if key in new:
            new[key] = value


def _head_dims(o: dict, new: dict, heads_key, hidden_key, role: str) -> None:
    # hidden == heads * head_dim in the default config: keep it so.
    if heads_key and hidden_key and is_int(o.get("head_dim")) and o["head_dim"] > 0 \
            and o[heads_key] * o["head_dim"] == o[hidden_key]:
        new["head_dim"] = new[hidden_key] // new[heads_key]
    # the same for other (heads, head_dim) pairs tied to the hidden size: swa / linear / mamba / index ...
    for hk in [k for k in o if "heads" in k and is_int(o[k]) and k != heads_key]:
        stem = hk.replace("num_", "").replace("n_", "").replace("heads", "")
        for dk in [k for k in o if is_int(o[k]) and o[k] > 0 and ("head_dim" in k or "d_head" in k)]:
            if dk == "head_dim" and not stem.startswith(("swa", "sliding")):
                continue
            dstem = dk.replace("head_dim", "").replace("d_head", "")
            if not (stem.startswith(dstem) or dstem.startswith(stem)) or not stem or not dstem:
                continue
            if hidden_key and o[hk] * o[dk] in (o[hidden_key], 2 * o[hidden_key]) and new[hk] > 0:
                ratio = o[hk] * o[dk] // o[hidden_key]
                expand = o.get("mamba_expand", o.get("expand"))
                if ratio == 2 and is_int(expand) and expand != 2:
                    continue
                new[dk] = max(2, ratio * new[hidden_key] // new[hk])
    # head_dim None in the default config: the model reads config.head_dim, so give it hidden // heads.
    if "head_dim" in o and o["head_dim"] is None and heads_key and hidden_key and role == "text":
        new["head_dim"] = new[hidden_key] // new[heads_key]


def _latent_attention(o: dict, new: dict) -> None:
    """MLA: head_dim is the rope part in several families, nope + rope in others; qk_head_dim = nope + rope."""
    if is_int(o.get("qk_rope_head_dim")) and is_int(o.get("head_dim")) and is_int(o.get("qk_nope_head_dim")):
        if o["head_dim"] == o["qk_rope_head_dim"]:
            new["head_dim"] = new["qk_rope_head_dim"]
        elif o["head_dim"] == o["qk_rope_head_dim"] + o["qk_nope_head_dim"]:
            new["head_dim"] = new["qk_rope_head_dim"] + new["qk_nope_head_dim"]
    if is_int(o.get("qk_head_dim")) and is_int(new.get("qk_nope_head_dim")) and is_int(new.get("qk_rope_head_dim")):
        new["qk_head_dim"] = new["qk_nope_head_dim"] + new["qk_rope_head_dim"]


def _mamba(o: dict, new: dict, hidden_key) -> None:
    """mamba2 style: n_heads * head_dim == expand * hidden."""
    for hk, dk in (("mamba_n_heads", "mamba_head_dim"), ("mamba_num_heads", "mamba_head_dim"),
                   ("mamba_n_heads", "mamba_d_head")):
        exp = o.get("mamba_expand", o.get("expand"))
        if is_int(o.get(hk)) and is_int(o.get(dk)) and is_int(exp) and hidden_key \
                and o[hk] * o[dk] == exp * o[hidden_key]:
            new[dk] = 8
            new[hk] = exp * new[hidden_key] // 8


def _rope(new: dict, cls, heads_key, hidden_key) -> None:
    def rotary_dim(partial):
        base = None
        for k in ("qk_rope_head_dim", "head_dim"):
            if is_int(new.get(k)) and new[k] > 0:
                base = new[k]
                break
        if base is None and heads_key and hidden_key:
            base = new[hidden_key] // new[heads_key]
        base = base or 8
        partial = partial if partial is not None else new.get("partial_rotary_factor") or 1.0
        return int(base * partial)

    for key in ("rope_parameters", "rope_scaling"):
        if key in new:
            new[key] = shrink_rope(new[key], rotary_dim)
    # Multimodal rope whose sections the modeling code defaults (sized for the released head_dim) when the
    # config has none: the config class says it reads them (`ignore_keys_at_rope_validation`).
    rope = new.get("rope_parameters")
    if "mrope_section" in (getattr(cls, "ignore_keys_at_rope_validation", None) or ()) and isinstance(rope, dict) \
            and "mrope_section" not in rope and not any(isinstance(v, dict) for v in rope.values()):
        new["rope_parameters"] = {**rope, "mrope_section": default_sections(rotary_dim(rope.get("partial_rotary_factor")) // 2)}
    if isinstance(new.get("mrope_section"), (list, tuple)):
        new["mrope_section"] = scale_sections(new["mrope_section"], rotary_dim(None) // 2)


def _sliding_window(new: dict) -> None:
    """A sliding window the default leaves None although some layer types are sliding (or whose model names
    sliding-attention knobs and builds a sliding mask regardless)."""
    types = [t for k, v in new.items() if k.endswith("layer_types") and isinstance(v, list) for t in v]
    if any("sliding" in str(t) for t in types) or any("sliding" in k and k not in ("sliding_window",
                                                       "sliding_window_size") and new[k] for k in new):
        for key in ("sliding_window", "sliding_window_size"):
            if key in new and new[key] is None:
                new[key] = WINDOW
