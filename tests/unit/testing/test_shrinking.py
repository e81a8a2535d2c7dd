"""Shrinking a config (ep_ds_shim/testing/tiny_models: knobs, layers, rope, relations, level, shrink): the pure
pieces on plain dicts, and every family of the installed release shrunk with the relations its default config has."""

from __future__ import annotations

import functools
import warnings

import pytest
from transformers import AutoConfig

from ep_ds_shim.testing import tiny_models
from ep_ds_shim.testing.tiny_models import knobs, layers, rope
from ep_ds_shim.testing.tiny_models.families import text_config
from ep_ds_shim.testing.tiny_models.level import Context
from ep_ds_shim.testing.tiny_models.relations import restore_relations


@pytest.mark.parametrize("sections,half", [([16, 24, 24], 8), ([24, 20, 20], 4), ([2, 1, 1], 3), ([8, 8], 1)])
def test_rope_sections_fill_half_the_rotary_dims(sections, half):
    scaled = rope.scale_sections(sections, half)
    assert sum(scaled) == half and len(scaled) == len(sections)
    if half >= len(sections):
        assert min(scaled) >= 1


@pytest.mark.parametrize("half", [2, 3, 4, 8, 12])
def test_default_rope_sections_have_equal_first_two(half):
    a, b, c = rope.default_sections(half)
    assert a == b and a + b + c == half and c >= 0


def test_per_layer_type_rope_is_shrunk_per_type():
    shrunk = rope.shrink_rope({"full": {"mrope_section": [16, 24, 24]}, "sliding": None}, lambda partial: 8)
    assert shrunk == {"full": {"mrope_section": [1, 2, 1]}, "sliding": None}


def test_layers_kept_are_a_moe_layer_then_one_of_each_kind():
    d = {"num_hidden_layers": 8, "first_k_dense_replace": 2,
         "layer_types": ["sliding", "sliding", "sliding", "full", "sliding", "full", "sliding", "full"]}
    # the first MoE layer (after the dense prefix), then the first layer of another kind: a dense one, a full one
    assert layers.select_layers(d, 8, 2) == [0, 2]
    assert layers.select_layers(d, 8, 3) == [0, 2, 3]
    assert layers.select_layers({**d, "first_k_dense_replace": 0}, 8, 2) == [0, 3]
    assert layers.select_layers(d, 2, 4) == [0, 1]  # fewer layers than asked: all


def test_layer_scalars_are_mapped_onto_the_kept_layers():
    sel = [2, 3]
    assert layers.layer_scalar("moe_layer_start_index", 2, 8, sel) == 0
    assert layers.layer_scalar("moe_layer_end_index", 7, 8, sel) == 1
    assert layers.layer_scalar("decoder_sparse_step", 4, 8, sel) == 2
    assert layers.kept_indices([0, 3, 5], sel) == [1]
    # per-layer entries that are layer indices (which layer's KV cache a layer reads) are renumbered: layers 2 and 3
    # both read layer 2's, kept as layer 0
    assert layers.kept_entries("kv_shared_layer_ids", [0, 1, 2, 2, 4, 5, 6, 7], 8, sel, size=lambda x: x) == [0, 0]
    assert layers.kept_entries("num_heads_per_layer", [8, 8, 16, 32, 8, 8, 8, 8], 8, sel, size=lambda x: x // 8) \
        == [2, 4]


def test_special_token_ids_move_to_the_top_of_the_tiny_vocabulary():
    tree = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "text_config": {"image_token_id": 151655},
            "id2label": {"0": "LABEL_0"}}
    assert knobs.token_ids(tree) == {151643, 151645, 151655}
    ctx = Context(dict(tiny_models.SIZES, vocab_size=128), tree)
    assert ctx.token(151643) == 125 and ctx.token([151645, 151643]) == [126, 125] and ctx.token(7) == 7
    with pytest.raises(ValueError, match="do not fit a vocabulary of 8"):
        Context(dict(tiny_models.SIZES, vocab_size=8), tree)


def test_relations_are_restored_on_plain_dicts():
    orig = {"hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "qk_head_dim": 192, "sliding_window": None, "layer_types": ["sliding_attention"],
            "initializer_range": 0.02}
    new = {"hidden_size": 32, "num_attention_heads": 4, "head_dim": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
           "qk_head_dim": 24, "sliding_window": None, "layer_types": ["sliding_attention"], "initializer_range": 0.02}
    restore_relations(orig, new, object, "text")
    assert new["qk_head_dim"] == new["qk_nope_head_dim"] + new["qk_rope_head_dim"]
    assert new["sliding_window"] == knobs.WINDOW and new["initializer_range"] == 0.2


# ---- every family of the installed release --------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _families() -> tuple[str, ...]:
    return tuple(tiny_models.ep_model_types())


def _default(model_type: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(model_type)


def _heads_and_hidden(c) -> tuple[int | None, int | None, int | None]:
    d = c.to_dict()  # (a heterogeneous config refuses a global read of its per-layer attributes)
    heads = next((d[k] for k in ("num_attention_heads", "num_heads") if knobs.is_int(d.get(k))), None)
    return heads, d["head_dim"] if knobs.is_int(d.get("head_dim")) else None, d.get("hidden_size")


def test_every_family_keeps_the_relations_of_its_default_config():
    problems = []
    for model_type in _families():
        default, tiny = text_config(_default(model_type)), text_config(tiny_models.tiny_config(model_type))
        heads, head_dim, hidden = _heads_and_hidden(default)
        t_heads, t_head_dim, t_hidden = _heads_and_hidden(tiny)
        latent = knobs.is_int(default.to_dict().get("qk_rope_head_dim"))  # MLA: head_dim is rope (+ nope) there
        if heads and head_dim and heads * head_dim == hidden and not latent and t_heads * t_head_dim != t_hidden:
            problems.append(f"{model_type}: hidden {t_hidden} != {t_heads} heads x {t_head_dim}")
        if knobs.is_int(default.to_dict().get("qk_head_dim")):
            d = tiny.to_dict()
            if d["qk_head_dim"] != d["qk_nope_head_dim"] + d["qk_rope_head_dim"]:
                problems.append(f"{model_type}: qk_head_dim {d['qk_head_dim']} != nope + rope")
        if t_hidden != tiny_models.SIZES["hidden_size"] or t_hidden >= hidden:
            problems.append(f"{model_type}: text hidden size {t_hidden}")
        routing = tiny_models.routing_of(tiny)
        if routing.get("num_experts") != tiny_models.SIZES["num_experts"] or \
                routing.get("top_k", 0) > tiny_models.SIZES["top_k"]:
            problems.append(f"{model_type}: routing {routing}")
        _, layers_now = layers.layer_count(tiny.to_dict())
        if layers_now is not None and layers_now > tiny_models.SIZES["num_layers"]:
            problems.append(f"{model_type}: {layers_now} layers")
        ids = knobs.token_ids(tiny_models.tiny_config(model_type).to_dict())  # all levels' (they share one map)
        if ids and (max(ids) >= tiny.vocab_size or min(ids) < tiny.vocab_size - len(ids)):
            problems.append(f"{model_type}: special token ids {sorted(ids)} outside the top of {tiny.vocab_size}")
    assert not problems, problems


def test_every_multimodal_family_feeds_its_text_decoder_at_the_tiny_width():
    problems = []
    for model_type in _families():
        tiny = tiny_models.tiny_config(model_type)
        vision = getattr(tiny, "vision_config", None)
        if not tiny_models.is_multimodal(tiny) or vision is None:
            continue
        hidden = text_config(tiny).hidden_size
        for key in knobs.TO_TEXT_HIDDEN_KEYS:
            value = getattr(vision, key, None)
            if knobs.is_int(value) and value != hidden and value % vision.hidden_size:
                problems.append(f"{model_type}: vision {key}={value}, text hidden {hidden}")
    assert not problems, problems


def test_the_size_knobs_size_the_tiny_config():
    sizes = dict(num_experts=6, top_k=3, hidden_size=64, num_layers=3, expert_size=48, vocab_size=256)
    for model_type in tiny_models.MODEL_TYPES:
        if model_type not in _families():
            continue
        tiny = tiny_models.tiny_config(model_type, **sizes)
        family_top_k = tiny_models.routing_of(_default(model_type))["top_k"]  # kept, at most top_k
        assert tiny_models.routing_of(tiny) == {"num_experts": 6, "top_k": min(family_top_k, 3)}, model_type
        assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.vocab_size) == (64, 3, 256), model_type
    with pytest.raises(ValueError, match="top_k=3 > num_experts=2"):
        tiny_models.tiny_config("qwen3_moe", num_experts=2, top_k=3)
