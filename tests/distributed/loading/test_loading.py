"""Issue #2: inside the block an EP load under ZeRO-3 equals the EP-only load and the single-process model.

Real transformers, real DeepSpeed config object, two real gloo ranks, tiny checkpoints built here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("worker_load.py")
FAMILIES = ["gpt_oss", "qwen3_moe"]


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_ep_load_under_zero3(family, tiny_checkpoint, run_ranks):
    path = tiny_checkpoint(family)
    run = run_ranks(WORKER, str(path), "{json}", nproc=2)
    assert run.returncode == 0, run
    assert len(run.reports) == 2, run

    for report in run.reports:
        # The released failure, reproduced without the block.
        failure = report["without_block"]
        assert failure["raised"] == "ValueError", failure
        assert "DeepSpeed Zero-3 is not compatible with passing a `device_map`" in failure["message"]

        block = report["with_block"]
        assert block["meta_tensors"] == []
        assert block["buffer_max_diff"] <= 1e-6
        assert block["experts"], "no expert tensors found"
        for name, expert in block["experts"].items():
            # each rank holds exactly its half of the experts, equal to the checkpoint's slice
            assert expert["shape"][0] * 2 == expert["full_shape"][0], (name, expert)
            assert expert["max_diff_vs_slice"] == 0.0, (name, expert)
        assert block["logits_max_diff"] <= 1e-5

        same = report["ep_only_vs_block"]
        assert same["same_names"]
        assert same["param_max_diff"] == 0.0
        assert same["logits_max_diff"] <= 1e-6
        assert same["ep_only_logits_vs_reference"] <= 1e-5
