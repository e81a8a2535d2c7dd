"""The benchmark's pure helpers (benchmarks/common.py, benchmarks/render.py): how a step's global batch is split over
ranks, how ZeRO-3 state is attributed to dense and expert parameters, the memory estimate that holds large jobs back
on a shared machine, and the verdicts the tables print. Timings are measured in benchmarks/, never asserted here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import render  # noqa: E402

assert Path(common.__file__).parent == BENCH and Path(render.__file__).parent == BENCH


# --- batches --------------------------------------------------------------------------------------------------


def test_split_batches_partition_the_global_batch_in_rank_order():
    batch = common.step_batch(0, vocab_size=1024, sequences=4)
    assert batch.shape == (4, common.SEQ)
    parts = [common.rank_batch(batch, rank, 2, "split") for rank in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    assert torch.equal(torch.cat(parts), batch)  # what the single-process reference trains on, in order


def test_same_batches_give_every_rank_all_of_it():
    batch = common.step_batch(3, vocab_size=1024, sequences=4)
    assert all(common.rank_batch(batch, rank, 4, "same") is batch for rank in range(4))
    assert common.per_rank_sequences(4, 4, "same") == 4


def test_step_batches_are_fixed_by_step_and_differ_between_steps():
    assert torch.equal(common.step_batch(1, 1024, 4), common.step_batch(1, 1024, 4))
    assert not torch.equal(common.step_batch(1, 1024, 4), common.step_batch(2, 1024, 4))


def test_a_global_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="does not split over 4 ranks"):
        common.per_rank_sequences(2, 4, "split")
    with pytest.raises(ValueError, match="batch mode 'shared'"):
        common.per_rank_sequences(4, 2, "shared")


def test_the_ds_config_carries_the_per_rank_micro_batch():
    assert common.ds_config(micro=1)["train_micro_batch_size_per_gpu"] == 1
    assert common.ds_config()["zero_optimization"] == {"stage": 3}
    assert common.ds_config(autoep_size=2, micro=2)["expert_parallel"]["autoep_size"] == 2


# --- ZeRO-3 state -----------------------------------------------------------------------------------------------


class _Param:
    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def test_experts_are_told_by_deepspeed_marker_or_module_name():
    plain = _Param()
    assert common.is_expert_parameter("model.layers.0.mlp.experts.gate_up_proj", plain)  # 0.2: untagged
    assert common.is_expert_parameter("model.layers.0.mlp.w1", _Param(allreduce=False))  # tagged MoE parameter
    assert not common.is_expert_parameter("model.layers.0.mlp.gate.weight", plain)  # the router is dense
    assert not common.is_expert_parameter("model.layers.0.mlp.gate.weight", _Param(allreduce=True))
    assert not common.is_expert_parameter("model.experts_norm.weight", plain)  # a module path part, not a prefix


def _rows(dense_held, dense_full, expert_held):
    return [{"expert": False, "held": dense_held, "full": dense_full, "element_size": 4},
            {"expert": False, "held": dense_held, "full": dense_full, "element_size": 4},
            {"expert": True, "held": expert_held, "full": expert_held, "element_size": 4}]


def test_dense_state_partitioned_over_every_rank():
    # 2 ranks: each dense parameter of 100 elements is held as 50; one sub-group for the dense, one for the experts
    rows = _rows(50, 100, 400)
    subgroups = [{"dense": 100, "total": 100, "state_bytes": 100 * 8},  # Adam's two fp32 moments
                 {"dense": 0, "total": 400, "state_bytes": 400 * 8}]
    summary = common.zero3_summary(rows, subgroups, world=2)
    assert summary["dense_fraction"] == 0.5
    assert summary["dense_whole_params"] == 0
    assert summary["dense_held_bytes"] == 400 and summary["expert_held_bytes"] == 1600
    assert summary["dense_optimizer_bytes"] == 800
    assert summary["dense_optimizer_full_bytes"] == 1600  # 200 dense elements x 8 bytes
    assert summary["optimizer_bytes"] == 4000
    over, met = render.dense_verdict(summary["dense_fraction"], 2)
    assert over == 1.0 and met


def test_dense_state_held_whole_in_a_mixed_subgroup():
    # 0.2.0 at dp 1: nothing partitioned, dense and experts in one sub-group; the dense share is by elements
    rows = _rows(100, 100, 400)
    subgroups = [{"dense": 200, "total": 600, "state_bytes": 600 * 8}]
    summary = common.zero3_summary(rows, subgroups, world=2)
    assert summary["dense_fraction"] == 1.0 and summary["dense_whole_params"] == 2
    assert summary["dense_optimizer_bytes"] == pytest.approx(1600)
    assert summary["dense_optimizer_full_bytes"] == pytest.approx(1600)
    assert render.dense_verdict(summary["dense_fraction"], 2) == (2.0, False)


def test_dense_target_allows_padding_up_to_ten_percent():
    assert render.dense_verdict(0.27, 4)[1]  # 1.08 x 1/world
    assert not render.dense_verdict(0.28, 4)[1]  # 1.12 x 1/world


def test_training_memory_estimate_scales_with_what_a_rank_holds():
    bytes_ = {"dense": 100 * 2**20, "experts": 1600 * 2**20}
    two, four = common.training_memory_mb(bytes_, 2), common.training_memory_mb(bytes_, 4)
    assert two == pytest.approx(2 * (common.TRAINING_RSS_PER_HELD_BYTE * 900 + common.PROCESS_BASE_MB))
    assert four == pytest.approx(4 * (common.TRAINING_RSS_PER_HELD_BYTE * 500 + common.PROCESS_BASE_MB))


# --- verdicts and the table -------------------------------------------------------------------------------------


def test_round_verdicts_need_every_round_on_one_side():
    assert render.round_verdict(common.spread([0.8, 0.95])) == "met (every round)"
    assert render.round_verdict(common.spread([1.05, 1.2])) == "missed (every round)"
    assert render.round_verdict(common.spread([0.9, 1.1])).startswith("undecided")


def _side(step_s, fraction, world=2, *, losses=(2.0, 1.9, 1.8, 1.7)):
    zero3 = {"world": world, "dense_params": 2, "dense_fraction": fraction, "dense_whole_params": int(fraction == 1),
             "dense_held_bytes": 1e6 * fraction, "dense_optimizer_bytes": 2e6 * fraction,
             "dense_optimizer_full_bytes": 2e6, "expert_held_bytes": 8e6, "optimizer_bytes": 18e6}
    phase = {"s": 1.0, "peak_mb": 500.0}
    return [{"rank": rank, "load": phase, "initialize": phase, "zero3": zero3,
             "steps": {"losses": list(losses), "s": [3.0, 2.0, step_s, step_s], "cpu_s": [1.0] * 4,
                       "peak_mb": 900.0}} for rank in range(world)]


def test_shard_table_states_the_targets_from_the_reports():
    run = {"checkpoint": "qwen3_moe-small-64", "size": "small-64", "bytes": {"dense": 2**20, "experts": 7 * 2**20,
                                                                            "total": 8 * 2**20},
           "ranks": 2, "steps": 4, "reference": {"losses": [2.0, 1.9, 1.8, 1.7]},
           "rounds": [{"shim": _side(1.0, 0.5), "shim-0.2.0": _side(1.5, 1.0), "autoep-plain-split": _side(1.1, 0.5)},
                      {"shim": _side(1.2, 0.5), "shim-0.2.0": _side(1.5, 1.0), "autoep-plain-split": _side(1.0, 0.5)}]}
    lines, verdicts = render.shard_tables({"transformers": "5.22.2", "sequences": 4, "runs": [run],
                                           "baseline": {"version": "0.2.0", "commit": "04aa7ff"}})
    text = "\n".join(lines)
    assert "| dense parameters held / whole (ds_tensor.numel() / ds_numel, largest rank) | 0.500 | 1.000 | 0.500 |" in text
    assert "| dense parameters held whole on a rank (of all dense parameters) | 0 of 2 | 1 of 2 | 0 of 2 |" in text
    dense = verdicts["dense state per rank, qwen3_moe-small-64, 2 ranks"]
    assert dense["met"] and dense["value"]["median"] == 1.0
    step = verdicts["steady-state step, qwen3_moe-small-64, 2 ranks"]
    assert step["value"]["min"] == pytest.approx(1 / 1.1) and step["value"]["max"] == pytest.approx(1.2)
    assert step["verdict"].startswith("undecided") and not step["met"]


def test_shard_table_names_a_side_that_was_skipped_for_memory():
    run = {"checkpoint": "qwen3_moe-large-64", "size": "large-64", "bytes": {"dense": 2**20, "experts": 7 * 2**20,
                                                                            "total": 8 * 2**20},
           "ranks": 2, "steps": 4, "reference": {"losses": [2.0, 1.9, 1.8, 1.7]},
           "rounds": [{"shim": _side(1.0, 0.5), "shim-0.2.0": [], "autoep-plain-split": _side(1.1, 0.5)}]}
    lines, verdicts = render.shard_tables({"transformers": "5.22.2", "sequences": 4, "runs": [run], "baseline": {}})
    assert any("Not measured" in line and "ep-ds-shim 0.2.0" in line for line in lines)
    assert verdicts["steady-state step, qwen3_moe-large-64, 2 ranks"]["verdict"] == "met (every round)"


def test_step_profile_sums_each_category_per_step():
    c10d = "/x/site-packages/torch/distributed/distributed_c10d.py"
    stats = {
        (c10d, 10, "all_to_all_single"): (2, 2, 0.1, 0.2, {}),
        ("~", 0, "<built-in method torch._ops._c10d_functional.all_to_all_single>"): (8, 8, 0.1, 0.2, {}),
        ("~", 0, "<built-in method torch._ops._c10d_functional.wait_tensor>"): (8, 8, 0.4, 0.4, {}),
        (c10d, 20, "all_gather_into_tensor"): (4, 4, 0.1, 0.4, {}),
        (c10d, 30, "_all_gather_base"): (2, 2, 0.0, 0.2, {}),
        ("/x/site-packages/deepspeed/comm/torch.py", 40, "all_to_all_single"): (8, 8, 0.0, 0.9, {}),  # a wrapper
        ("~", 0, "<method 'item' of 'torch._C.TensorBase' objects>"): (6, 6, 0.06, 0.06, {}),
        ("/x/site-packages/deepspeed/runtime/engine.py", 50, "step"): (2, 2, 0.0, 3.0, {}),
    }
    rows = {e["what"]: e for e in render.step_profile(stats, steps=2)}
    dispatch = rows["token all-to-all (c10d calls, functional collectives and their waits)"]
    assert dispatch["s"] == pytest.approx(0.4) and dispatch["calls"] == 9
    assert rows["ZeRO-3 parameter all-gathers"]["s"] == pytest.approx(0.3)
    assert rows["host reads of tensors (.item / .tolist / .cpu)"]["calls"] == 3
    assert rows["optimizer step (engine.step: ZeRO-3 gradient reductions, clipping, Adam)"]["s"] == 1.5
    assert rows["all_reduce (losses, norms)"] == {"what": "all_reduce (losses, norms)", "s": 0.0, "calls": 0.0}


# --- results.md -----------------------------------------------------------------------------------------------


def _overhead_results(command: str, value: float) -> dict:
    return {"command": command, "mode": "full", "date": "2026-12-03T10:00:00", "seconds": 60,
            "machine": {"cpus": 2, "memory_gib": 23.5, "load_average_at_start": [1.0, 1.0, 1.0]},
            "sections": {"overhead": {"enter_exit_install_us": value, "enter_exit_installed_us": 1.0,
                                      "wrapped_call_outside_block_ns": 10.0, "unwrapped_call_ns": 5.0}}}


def test_a_partial_run_carries_the_sections_it_left_out_under_their_own_command():
    previous = "\n".join([
        "Command: `./run.sh bench` (full run), 2026-11-25T21:51:52; 2 CPUs.", "",
        render.HEADINGS["growth"], "", "| growth table |", "",
        render.HEADINGS["overhead"], "", "| old overhead |", "",
        "### Targets", "", "| old targets |",
    ])
    text = render.markdown(_overhead_results("./run.sh bench --sections overhead", 123.0), previous=previous)
    # the section it ran is the new one; the one it left out is still there, saying which run measured it
    assert "old overhead" not in text and "123 us" in text
    growth = text[text.index(render.HEADINGS["growth"]):]
    assert "| growth table |" in growth
    assert growth.splitlines()[2] == "Measured by: `./run.sh bench` (full run), 2026-11-25T21:51:52; 2 CPUs."
    assert "old targets" not in text  # the targets are this run's verdicts only
    # and a later partial run keeps both, each under its own line
    again = render.markdown(_overhead_results("./run.sh bench --sections overhead", 99.0), previous=text)
    assert again.count(render.HEADINGS["growth"]) == 1 and "| growth table |" in again and "99 us" in again
    assert again.index(render.HEADINGS["growth"]) < again.index(render.HEADINGS["overhead"])  # the sections' order
