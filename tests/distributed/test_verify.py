"""`python -m ep_ds_shim verify` under a launcher (torchrun here), on 2 and 4 CPU ranks: every check passes against
the single-process model, for a text and a multimodal MoE family, and the table and per-rank reports say so."""

from __future__ import annotations

import pytest

from ep_ds_shim.testing import torchrun


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,ep_size,model_types", [
    (2, 2, ["qwen3_moe", "qwen3_vl_moe"]),
    (4, 2, ["mixtral"]),
], ids=["2-ranks", "dp2xep2"])
def test_verify_passes_under_torchrun(nproc, ep_size, model_types, run_command, tmp_path):
    types = [arg for t in model_types for arg in ("--model-type", t)]
    run = run_command(torchrun(nproc, "-m", "ep_ds_shim", "verify", "--ep-size", ep_size, *types, "--work-dir",
                               tmp_path, "--json", "{json}"), nproc=nproc, timeout=1800)
    assert run.returncode == 0, run
    assert len(run.reports) == nproc, run
    for report in run.reports:
        assert set(report["results"]) == set(model_types)
        for model_type, checks in report["results"].items():
            assert set(checks) == {"load", "step", "export"}, checks
            for check, result in checks.items():
                assert result["ok"], (model_type, check, result)
    table = [line for line in run.output.splitlines() if line.split()[:1] and line.split()[0] in model_types]
    assert len(table) == 3 * len(model_types) and all(" pass " in line for line in table), run.output[-3000:]
