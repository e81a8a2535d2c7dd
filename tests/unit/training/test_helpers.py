"""The training side's small decisions, in-process: the ZeRO stage a config asks for, which state-dict entries hold
only one rank's expert shard, the cross-rank disagreement lines, and `DPxEPLayout` on a real one-rank gloo group."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from ep_ds_shim.errors import EpShimError, EPRequestError
from ep_ds_shim.rank_agreement import disagreements
from ep_ds_shim.testing import free_port
from ep_ds_shim.training.deepspeed_handover import SUPPORTED_STAGE, stage_error, zero_stage_of
from ep_ds_shim.training.export import shard_only_entries
from ep_ds_shim.training.layout import DPxEPLayout


def test_zero_stage_of_a_dict_a_json_path_and_what_cannot_be_read(tmp_path):
    assert zero_stage_of({"zero_optimization": {"stage": 3}}) == 3
    assert zero_stage_of({"zero_optimization": {"stage": "2"}}) == 2
    assert zero_stage_of({"zero_optimization": None}) == 0  # DeepSpeed's default
    assert zero_stage_of({}) == 0
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert zero_stage_of(str(path)) == 1 and zero_stage_of(path) == 1
    assert zero_stage_of(str(tmp_path / "elsewhere.json")) is None  # a path this side cannot read: checked after
    assert zero_stage_of(None) is None


def test_the_stage_error_names_the_stage_and_the_fix():
    assert SUPPORTED_STAGE == 3
    message = str(stage_error(2))
    assert "ZeRO stage 2" in message and '"zero_optimization": {"stage": 3}' in message


def test_shard_only_entries_are_the_expert_tensors_with_fewer_rows_than_experts():
    record = SimpleNamespace(expert_rows={"experts.gate_up_proj": 8, "experts.down_proj": 8})
    state_dict = {
        "experts.gate_up_proj": torch.zeros(8, 4, 2),  # every expert
        "experts.down_proj": torch.zeros(4, 2, 4),  # one rank's shard (ep 2)
        "embed.weight": torch.zeros(3, 4),  # not an expert tensor: any shape
        "scalar": torch.tensor(1.0),
    }
    assert shard_only_entries(state_dict, record) == ["experts.down_proj"]
    state_dict["experts.down_proj"] = torch.zeros(8, 2, 4)
    assert shard_only_entries(state_dict, record) == []


def test_disagreements_name_each_differing_field_and_which_ranks_have_what():
    summary = {"dtype": "torch.float32", "ep_size": 2, "versions": {"torch": "2.13"}}
    summaries = {
        0: {**summary, "ep group": [0, 1]},
        1: {**summary, "dtype": "torch.bfloat16", "ep group": [0, 1]},
        2: {**summary, "versions": {"torch": "2.13.post1"}, "ep group": [2, 3]},  # per-rank extras are not compared
        3: {**summary, "ep group": [2, 3]},
    }
    assert disagreements(summary, summaries) == [
        "dtype: ranks [0, 2, 3] have 'torch.float32'; ranks [1] have 'torch.bfloat16'",
        "versions: ranks [0, 1, 3] have {'torch': '2.13'}; ranks [2] have {'torch': '2.13.post1'}",
    ]
    assert disagreements(summary, {0: summary, 1: dict(summary)}) == []
    assert disagreements({"model class": "A"}, {0: {"model class": "A"}, 1: {}}) == [
        "model class: ranks [0] have 'A'; ranks [1] have None"]  # a rank that sent nothing for a field


def test_layout_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(EPRequestError, match="needs an initialised torch.distributed process group"):
        DPxEPLayout(1)


@pytest.fixture
def one_rank_gloo():
    dist.init_process_group("gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_layout_on_one_rank(one_rank_gloo):
    layout = DPxEPLayout(1)
    assert (layout.world_size, layout.dp_size, layout.ep_size) == (1, 1, 1)
    assert (layout.rank, layout.dp_rank, layout.ep_rank) == (0, 0, 0)
    assert layout.ep_ranks == (0,) and layout.dp_ranks == (0,)
    assert layout.mesh.mesh_dim_names == ("dp", "ep") and tuple(layout.mesh.shape) == (1, 1)
    assert dist.get_process_group_ranks(layout.ep_group) == [0] == dist.get_process_group_ranks(layout.dp_group)
    assert layout.device_type == "cpu"
    assert repr(layout) == "DPxEPLayout(world=1, dp=1, ep=1, rank=0, dp_rank=0, ep_rank=0)"
    sampler = layout.sampler(list(range(10)), shuffle=False)
    assert (sampler.num_replicas, sampler.rank, list(sampler)) == (1, 0, list(range(10)))
    with pytest.raises(EpShimError, match="mpu\\(\\) was removed in ep-ds-shim 0.3.0"):
        layout.mpu()


@pytest.mark.parametrize("ep_size, match", [(2, "ep_size=2 does not divide the world size 1"),
                                            (0, "positive int"), (True, "positive int"), (1.0, "positive int")])
def test_layout_refuses_sizes_that_cannot_be(one_rank_gloo, ep_size, match):
    with pytest.raises(EPRequestError, match=match):
        DPxEPLayout(ep_size)
