"""The tiny checkpoint (ep_ds_shim/testing/tiny_models: checkpoint, presets, inputs): built once per stamp, seeded and
deterministic, the fixed presets (their own configs) thin calls on the one builder, inputs outside the special token
ids."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from ep_ds_shim import testing
from ep_ds_shim.testing import tiny_models


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_presets_are_the_one_builder(tmp_path):
    sizes = dict(num_experts=3, vocab_size=64)
    preset = testing.build_tiny_moe(tmp_path / "preset", "qwen3_moe", seed=5, **sizes)
    config = AutoConfig.for_model("qwen3_moe", **testing.tiny_config_kwargs("qwen3_moe", **sizes))
    builder = tiny_models.build_checkpoint(tmp_path / "builder", "qwen3_moe", config, seed=5, sizes=sizes)
    stamp = "ep_ds_shim_stamp.json"
    assert json.loads((preset / stamp).read_text()) == json.loads((builder / stamp).read_text())
    assert same(tensors(preset), tensors(builder))
    shrunk = tiny_models.build_tiny_model(tmp_path / "shrunk", "qwen3_moe", seed=5, **sizes)
    assert json.loads((shrunk / stamp).read_text()).keys() == json.loads((preset / stamp).read_text()).keys()


@pytest.mark.parametrize("model_type", testing.MODEL_TYPES)
def test_a_preset_is_its_fixed_config(tmp_path, model_type):
    """The presets keep their hand-written configs (checkpoints as before the builders were merged), not the shrunk
    default config of the family (`tiny_config`), which differs for every one of them."""
    sizes = dict(num_experts=8, hidden_size=64, top_k=1)
    kwargs = testing.tiny_config_kwargs(model_type, **sizes)
    saved = AutoConfig.from_pretrained(testing.build_tiny_moe(tmp_path, model_type, **sizes))
    assert {key: getattr(saved, key) for key in kwargs} == kwargs  # (attribute_map: however the family spells it)
    assert tiny_models.routing_of(saved) == {"num_experts": 8, "top_k": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shrunk = tiny_models.tiny_config(model_type, **sizes).to_dict()
    assert any(shrunk.get(key, getattr(saved, key)) != value for key, value in kwargs.items())


def test_the_project_checkpoint_is_the_preset_or_the_shrunk_default(tmp_path):
    """`build_tiny_checkpoint` (the matrix's): the preset of a family that has one, else `build_tiny_model`."""
    stamp = "ep_ds_shim_stamp.json"
    for model_type, builder in (("mixtral", testing.build_tiny_moe), ("qwen3_vl_moe", tiny_models.build_tiny_model)):
        if not tiny_models.has_ep_plan(model_type):
            continue
        ours = tiny_models.build_tiny_checkpoint(tmp_path / model_type, model_type)
        theirs = builder(tmp_path / f"{model_type}-direct", model_type)
        assert json.loads((ours / stamp).read_text()) == json.loads((theirs / stamp).read_text())
        assert same(tensors(ours), tensors(theirs))


def test_a_preset_of_an_unknown_family_names_the_known_ones_and_the_builder(tmp_path):
    with pytest.raises(ValueError, match="known: gpt_oss, qwen3_moe.*use ep_ds_shim.testing.tiny_models.build_tiny_model"):
        testing.build_tiny_moe(tmp_path / "x", "qwen3_vl_moe")
    with pytest.raises(ValueError, match="unknown MoE family 'nope'"):
        testing.tiny_config_kwargs("nope")
    assert tiny_models.has_ep_plan("qwen3_vl_moe")  # the advice works: the builder builds it (matrix, verify)


def test_the_checkpoint_is_seeded_and_built_once_per_stamp(tmp_path):
    first = tiny_models.build_tiny_model(tmp_path / "a", "qwen3_moe", seed=1)
    again = tiny_models.build_tiny_model(tmp_path / "b", "qwen3_moe", seed=1)
    assert same(tensors(first), tensors(again))  # deterministic
    weights = next(first.glob("*.safetensors"))
    built = weights.stat().st_mtime_ns
    assert tiny_models.build_tiny_model(first, "qwen3_moe", seed=1) == first
    assert weights.stat().st_mtime_ns == built  # the same stamp: not rebuilt
    before = tensors(first)
    tiny_models.build_tiny_model(first, "qwen3_moe", seed=2)  # another seed: rebuilt, other weights
    after = tensors(first)
    assert before.keys() == after.keys() and not any(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((first / "ep_ds_shim_stamp.json").read_text())["seed"] == 2


def test_redraw_makes_every_expert_distinct():
    model = tiny_models.model_class_for("qwen3_moe")._from_config(tiny_models.tiny_config("qwen3_moe"))
    tiny_models.redraw(model, seed=0)
    experts = next(p for name, p in model.named_parameters() if "experts" in name and p.dim() == 3)
    assert experts.shape[0] == tiny_models.SIZES["num_experts"] == tiny_models.expert_count(model)
    assert all(not torch.equal(experts[i], experts[j]) for i in range(len(experts)) for j in range(i))
    norm = next(p for name, p in model.named_parameters() if "norm" in name)
    assert 0.5 < float(norm.detach().mean()) < 1.5  # norms stay near 1


def test_sample_inputs_avoid_special_tokens_and_are_seeded():
    config = tiny_models.tiny_config("mixtral")
    inputs = tiny_models.sample_inputs(config, batch=3, seq=40, seed=7)
    specials = {config.bos_token_id, config.eos_token_id}
    assert specials == {126, 127} and inputs["input_ids"].shape == (3, 40)
    assert not set(inputs["input_ids"].flatten().tolist()) & specials
    assert torch.equal(inputs["labels"], inputs["input_ids"])
    assert torch.equal(tiny_models.sample_inputs(config, batch=3, seq=40, seed=7)["input_ids"], inputs["input_ids"])
    assert not torch.equal(tiny_models.sample_inputs(config, batch=3, seq=40, seed=8)["input_ids"], inputs["input_ids"])
