"""Load -> deepspeed.initialize -> forward/backward/step, every rank on its own batch, equals a single-process
step on all ranks' batches together; ZeRO-3 holds 1/world of the dense state on each rank; and the upstream recipe
(DeepSpeed without the library's hand-over) is refused instead of training silently wrong.

Real DeepSpeed ZeRO-3, real gloo ranks, fp32, tolerance 1e-5. The training runs are the shipped example.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ...conftest import REPO

EXAMPLE = REPO / "examples" / "train_ep_zero3.py"
GUARD = Path(__file__).with_name("worker_guard.py")
TOLERANCE = 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2), (4, 4)], ids=["dp1xep2", "dp2xep2", "dp1xep4"])
def test_train_step_matches_reference(family, world, ep, tiny_checkpoint, run_ranks):
    path = tiny_checkpoint(family)
    run = run_ranks(EXAMPLE, "--model-dir", str(path), "--ep-size", str(ep), "--json", "{json}", nproc=world)
    assert run.returncode == 0, run
    assert len(run.reports) == world, run
    for report in run.reports:
        for quantity in ("logits", "loss", "grads", "params"):
            assert report[quantity] <= TOLERANCE, (quantity, report)
        # the global gradient norm DeepSpeed clipped with counts dense weights once and every expert shard once
        assert report["grad_norm"] <= TOLERANCE * 10, report
        shapes = report["expert_shapes"]
        assert shapes and all(shape[0] == 4 // ep for shape in shapes.values()), shapes  # 4 experts over ep ranks
        # ZeRO-3 shards everything: dense weights over every rank, expert shards over the same-expert ranks
        # (partitions are padded to equal sizes per tensor, hence the margin)
        assert report["dense_held"] <= 1.1 / world, report
        assert report["expert_held"] <= 1.1 / (world // ep), report


def guard_reports(tiny_checkpoint, run_ranks, mode: str) -> list[dict]:
    """Both ranks' reports of one worker_guard.py mode (every rank must report: none may hang)."""
    run = run_ranks(GUARD, str(tiny_checkpoint("qwen3_moe")), mode, "{json}", nproc=2)
    assert len(run.reports) == 2, run
    return run.reports


@pytest.mark.distributed
def test_upstream_recipe_is_refused_before_any_step(tiny_checkpoint, run_ranks):
    for report in guard_reports(tiny_checkpoint, run_ranks, "upstream"):
        assert report["raised"] == "DeepSpeedGroupsError", report
        # inside deepspeed.initialize, before its broadcast: never reached a forward, backward or step
        assert report["stage"] == "initialize", report
        assert "ep_ds_shim.initialize" in report["message"]


@pytest.mark.distributed
def test_corrupted_expert_shard_is_caught(tiny_checkpoint, run_ranks):
    reports = guard_reports(tiny_checkpoint, run_ranks, "corrupt")
    for report in reports:
        # every rank raises (no rank is left waiting in a collective), the corrupted one names the tensor
        assert report["raised"] == "ExpertIntegrityError", report
        assert report["stage"] == "initialize"
    corrupted = [r for r in reports if "corrupted" in r]
    assert len(corrupted) == 1 and corrupted[0]["corrupted"] in corrupted[0]["message"]


@pytest.mark.distributed
def test_an_mpu_is_refused_before_deepspeed_changes_anything(tiny_checkpoint, run_ranks):
    """0.2's `mpu` made ZeRO-3 partition only over same-expert ranks; now DeepSpeed must see every rank."""
    for report in guard_reports(tiny_checkpoint, run_ranks, "mpu"):
        assert report["raised"] == "DeepSpeedGroupsError", report
        assert report["stage"] == "initialize" and "mpu" in report["message"], report
