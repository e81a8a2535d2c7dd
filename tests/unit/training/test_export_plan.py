"""The export's plan and its move into place, in one process on real transformers models and real directories.

- For every MoE family with an EP plan in the installed release, the plan (on shapes alone) names exactly the keys,
  shapes and dtypes transformers' own single-process `save_pretrained` writes for the same model (its reverse weight
  conversion included), and splits them into conversion units that convert alone: per entry, or, where the release
  joins entries (a fused qkv, one family's text and vision experts), per layer. None falls back to one unit.
- The move into place: a fresh target appears whole; an existing one loses every old model file (no stale unsharded
  `model.safetensors`), keeps everything else, and stays without any model claim if the move stops half-way.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist

from ep_ds_shim.training.export import plan as planning
from ep_ds_shim.training.export import target as targets
from ep_ds_shim.training.export.write import read_header
from ep_ds_shim.training.record import EPModelRecord


@pytest.fixture(scope="module")
def one_process_group():
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def plain_record() -> EPModelRecord:
    """What the plan reads of a record for a model no EP split: no expert rows to gather."""
    return EPModelRecord(ep_size=1, ep_ranks=(0,), ep_mesh=None, line=None, fingerprints={}, expert_rows={})


def tiny(model_type: str):
    from ep_ds_shim.testing.tiny_models import model_class_for, tiny_config

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_class_for(model_type)._from_config(tiny_config(model_type), dtype=torch.float32)


def ep_families() -> list[str]:
    from ep_ds_shim.testing.tiny_models import ep_model_types

    return ep_model_types()


# entries this release only converts together with others (measured on 5.24; a new release may add or remove some)
JOINT_ON_5_24 = {"ernie4_5_vl_moe", "lara_mini", "sarvam_moe", "step3p7", "unlimited_ocr"}


@pytest.mark.parametrize("model_type", ep_families())
def test_the_plan_writes_what_transformers_own_save_writes(model_type, one_process_group, tmp_path):
    try:
        model = tiny(model_type)
    except ImportError as error:  # e.g. inkling_mm_model needs scipy: nothing of ours runs before this
        pytest.skip(f"{model_type} cannot be built in this environment: {error}")
    plan = planning.build_plan(model, plain_record(), max_shard_size="20KB", variant=None, save_original_format=True)
    model.save_pretrained(tmp_path)
    written = {}
    for file in sorted(tmp_path.glob("*.safetensors")):
        written.update(read_header(str(file)))
    assert plan.outputs() == written
    assert not any("does not split" in note for note in plan.notes), plan.notes
    units = [unit for shard in plan.shards for unit in shard.units]
    assert sorted(name for unit in units for name in unit.names) == sorted(plan.entries)
    joint = [unit for unit in units if len(unit.names) > 1]
    for unit in joint:  # grouped by layer, never the whole model
        assert len({planning._layer_of(name) for name in unit.names}) == 1, unit.names
    if _release() == "5.24":
        assert bool(joint) == (model_type in JOINT_ON_5_24), [unit.names for unit in joint]


def _release() -> str:
    import transformers

    return ".".join(transformers.__version__.split(".")[:2])


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_shards_keep_units_whole_and_the_index_states_the_exported_model(model_type, one_process_group):
    model = tiny(model_type)
    plan = planning.build_plan(model, plain_record(), max_shard_size="20KB", variant=None, save_original_format=True)
    assert len(plan.shards) > 2 and plan.index_name == "model.safetensors.index.json"
    for shard in plan.shards:
        assert shard.nbytes <= 20_000 or len(shard.units) == 1, shard.filename
    index = plan.index()
    assert index["metadata"]["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert index["metadata"]["total_size"] == sum(entry.nbytes for entry in plan.entries.values())
    assert set(index["weight_map"]) == set(plan.outputs())
    if model_type == "mixtral":  # the release's own key layout: one tensor per expert
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in index["weight_map"]
    again = planning.build_plan(model, plain_record(), max_shard_size="20KB", variant=None, save_original_format=True)
    assert again.digest() == plan.digest()
    other = planning.build_plan(model, plain_record(), max_shard_size="30KB", variant=None, save_original_format=True)
    assert other.digest() != plan.digest()


def test_without_the_original_format_the_model_keys_are_written(one_process_group):
    model = tiny("mixtral")
    plan = planning.build_plan(model, plain_record(), max_shard_size="5GB", variant="v1", save_original_format=False)
    assert set(plan.outputs()) == set(model.state_dict())
    assert [shard.filename for shard in plan.shards] == ["model.v1.safetensors"] and plan.index_name is None


# --- the target directory -------------------------------------------------------------------------------------------


def staged(target, files: dict[str, str]) -> targets.Staging:
    staging = targets.Staging(str(target))
    staging.create()
    for name, text in files.items():
        with open(os.path.join(staging.path, name), "w") as handle:
            handle.write(text)
    return staging


NEW = {"config.json": "new", "model-00001-of-00002.safetensors": "new", "model-00002-of-00002.safetensors": "new",
       "model.safetensors.index.json": "new"}


def test_a_fresh_target_appears_whole(tmp_path):
    staging = staged(tmp_path / "out", NEW)
    staging.commit()
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def old_export(target):
    target.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "model-00001-of-00003.safetensors",
                 "tokenizer.json"):
        (target / name).write_text("old")
    (target / "checkpoint-500").mkdir()


def test_an_existing_target_loses_every_old_model_file_and_keeps_the_rest(tmp_path):
    target = tmp_path / "out"
    old_export(target)
    staged(target, NEW).commit()
    found = {p.name: (p.read_text() if p.is_file() else "dir") for p in target.iterdir()}
    assert found == {**NEW, "tokenizer.json": "old", "checkpoint-500": "dir"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_move_stopped_half_way_leaves_no_model_claim_and_the_new_export_in_the_sibling(tmp_path, monkeypatch):
    target = tmp_path / "out"
    old_export(target)
    staging = staged(target, NEW)
    moved = []

    def replace(source, destination):
        if len(moved) == 2:
            raise OSError("killed")
        moved.append(os.path.basename(destination))
        os.rename(source, destination)

    monkeypatch.setattr(targets.os, "replace", replace)
    with pytest.raises(OSError):
        staging.commit()
    left = {p.name for p in target.iterdir()}
    assert not any(targets.claims_a_model(name) for name in left), left  # from_pretrained refuses it clearly
    assert "model.safetensors.index.json" not in moved  # the claim moves last
    assert "model.safetensors.index.json" in os.listdir(staging.path)
    assert "tokenizer.json" in left


def test_the_target_problems_and_leftovers(tmp_path):
    occupied = tmp_path / "file"
    occupied.write_text("x")
    assert "exists and is not a directory" in targets.problem_with(str(occupied))
    assert targets.problem_with(str(tmp_path / "new")) is None
    leftover = tmp_path / ".new.ep_ds_shim-export-0123456789ab"
    leftover.mkdir()
    staging = targets.Staging(str(tmp_path / "new"))
    staging.create()
    assert not leftover.exists() and os.path.isdir(staging.path)
    with pytest.raises(OSError):  # its parent is a file
        targets.Staging(str(occupied / "model")).create()


@pytest.mark.parametrize("name,model_file,claim", [
    ("model.safetensors", True, True), ("model-00001-of-00002.safetensors", True, False),
    ("model.safetensors.index.json", True, True), ("pytorch_model.bin", True, True),
    ("pytorch_model-00001-of-00002.bin", True, False), ("model.fp16.safetensors", True, True),
    ("config.json", True, False), ("generation_config.json", True, False), ("tokenizer.json", False, False),
    ("adapter_model.safetensors", False, False),
])
def test_model_files(name, model_file, claim):
    assert targets.is_model_file(name) == model_file
    assert targets.claims_a_model(name) == claim
