"""Off the tested path, every set-up is correct or refused clearly on every rank, before anything is changed: every
ZeRO stage x what was signalled at load time x (the upstream recipe | the library's hand-over), and ranks that
disagree. ZeRO-3 through the library trains exactly; stages 0-2 are refused (DeepSpeed's per-parameter expert groups
exist at stage 3 only). Real DeepSpeed, real gloo ranks, compared with the single-process reference."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
SIGNALS = ("zero3", "zero2", "none")
STAGES = (0, 1, 2, 3)
TOLERANCE = 1e-5
CLEAR_REFUSALS = {"DeepSpeedGroupsError", "EpShimError"}


def cells(signals=SIGNALS, stages=STAGES, routes=("upstream", "layout")):
    return [f"{signal}-{stage}-{route}" for signal in signals for stage in stages for route in routes]


def assert_cell(cell: str, reports: list[dict]) -> None:
    results = [report["cells"][cell] for report in reports]
    if cell.endswith("upstream") or not cell.endswith("3-layout"):
        # refused inside (or, for the stage, before) deepspeed.initialize, on every rank, before DeepSpeed broadcast
        # anything over the experts
        for result in results:
            assert result["raised"] in CLEAR_REFUSALS, (cell, result)
            assert result["stage_reached"] == "initialize", (cell, result)
            assert result["experts_intact"] is True, (cell, result)
            if cell.endswith("upstream"):
                assert "ep_ds_shim.initialize" in result["message"], result
            else:  # the advice names the one stage that works, as a config line
                assert '"zero_optimization": {"stage": 3}' in result["message"], result
    else:
        for result in results:
            assert result["raised"] is None, (cell, result)
            for quantity in ("loss", "logits", "grads", "params"):
                assert result[quantity] <= TOLERANCE, (cell, quantity, result)


def run_matrix(run_ranks, tiny_checkpoint, cell_list, nproc):
    path = tiny_checkpoint("qwen3_moe", num_experts=8)
    run = run_ranks(HERE / "worker_stages.py", str(path), "{json}", *cell_list, nproc=nproc, timeout=2400)
    assert run.returncode == 0 and len(run.reports) == nproc, run
    return run.reports


@pytest.mark.distributed
def test_every_stage_and_signal_is_correct_or_refused(run_ranks, tiny_checkpoint):
    reports = run_matrix(run_ranks, tiny_checkpoint, cells(), nproc=2)
    for cell in cells():
        assert_cell(cell, reports)


@pytest.mark.distributed
def test_dp2_x_ep2_with_nothing_or_zero3_signalled(run_ranks, tiny_checkpoint):
    """4 ranks: the upstream recipe is refused, stage 2 through the library too, and ZeRO-3 trains exactly even when
    nothing was signalled at load time (the DP x EP load itself used to fail there)."""
    subset = ["zero3-1-upstream", "zero3-2-layout", "none-0-upstream", "zero3-3-layout", "none-3-layout"]
    reports = run_matrix(run_ranks, tiny_checkpoint, subset, nproc=4)
    for cell in subset:
        assert_cell(cell, reports)


@pytest.mark.distributed
@pytest.mark.parametrize("mode,error,fragment", [
    ("dtype", "RankDisagreementError", "dtype: ranks [0] have 'torch.float32'; ranks [1] have 'torch.bfloat16'"),
    ("versions", "RankDisagreementError", ".post1"),
    ("no-ep", "CollectiveTimeoutError", "ranks [1] did not reach the EP load"),
])
def test_ranks_that_disagree_hear_why(mode, error, fragment, run_ranks, tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe", num_experts=8)
    run = run_ranks(HERE / "worker_disagree.py", str(path), mode, "{json}", timeout=600,
                    env={"EP_DS_SHIM_TIMEOUT": "20"})
    assert run.returncode != 0, run  # the job ends (no hang) and fails
    by_rank = {report["rank"]: report for report in run.reports}
    if mode == "no-ep":
        # rank 1 never asked for an EP load: rank 0 names it after the timeout, before any collective of its own
        assert by_rank[0]["raised"] == error and fragment in by_rank[0]["message"], by_rank
        assert by_rank[0]["stage"] == "load"
        return
    for rank in (0, 1):  # one clear error on every rank, before the load's first collective
        assert by_rank[rank]["raised"] == error and by_rank[rank]["stage"] == "load", by_rank
        assert fragment in by_rank[rank]["message"], by_rank[rank]["message"]
