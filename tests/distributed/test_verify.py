"""`python -m ep_ds_shim verify` under a launcher (torchrun here), on 2 and 4 CPU ranks: it passes on this release
(a refused family counts as known, not as a failure), every rank exits with the same status, and it FAILs, exit
status 1, when the shim is broken: the expert groups not applied, or a gradient off by a relative 1e-3."""

from __future__ import annotations

import re

import pytest

from ep_ds_shim.testing import torchrun

SUMMARY = re.compile(r"^(\d+) model type\(s\), (\d+) checks: (\d+) pass, (\d+) known, (\d+) FAIL$", re.M)


def summary(output: str) -> tuple[int, int, int]:
    found = SUMMARY.findall(output)
    assert len(found) == 1, output[-3000:]  # printed once, by rank 0
    _, _, passed, known, failed = map(int, found[0])
    return passed, known, failed


def outcomes(report: dict) -> dict:
    return {(label, check): outcome["outcome"] for label, by_check in report["outcomes"].items()
            for check, outcome in by_check.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,ep_size,model_types", [
    (2, 2, ["qwen3_moe", "qwen3_vl_moe", "muse_spark"]),
    (4, 2, ["mixtral"]),
], ids=["2-ranks", "dp2xep2"])
def test_verify_passes_under_torchrun(nproc, ep_size, model_types, run_command, tmp_path):
    types = [arg for t in model_types for arg in ("--model-type", t)]
    run = run_command(torchrun(nproc, "-m", "ep_ds_shim", "verify", "--ep-size", ep_size, *types, "--work-dir",
                               tmp_path, "--json", "{json}"), nproc=nproc, timeout=1800)
    assert run.returncode == 0, run
    assert len(run.reports) == nproc, run
    refused = {"muse_spark"}
    for report in run.reports:
        assert set(report["results"]) == set(model_types)
        assert outcomes(report) == outcomes(run.reports[0])  # every rank concluded the same
        for (label, check), outcome in outcomes(report).items():
            assert outcome == ("known" if label in refused else "pass"), (label, check, report["outcomes"][label])
    passed, known, failed = summary(run.output)
    assert (passed, known, failed) == (3 * len(set(model_types) - refused), 3 * len(refused & set(model_types)), 0)
    assert "Traceback" not in run.output and "c10d_logger" not in run.output, run.output[-3000:]  # held back


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["expert-groups", "gradient"])
def test_verify_fails_when_the_shim_is_broken(mode, run_command, tmp_path):
    run = run_command(torchrun(2, "tests/distributed/worker_verify_broken.py", mode, "--model-type", "qwen3_moe",
                               "--work-dir", tmp_path, "--json", "{json}"), nproc=2, timeout=1800)
    assert run.returncode != 0, run
    assert len(run.reports) == 2, run  # both ranks got to the end and said so
    for report in run.reports:
        assert outcomes(report)[("qwen3_moe", "step")] == "FAIL", report["outcomes"]
    _, known, failed = summary(run.output)
    assert failed >= 1 and known == 0
    if mode == "gradient":  # the forward is untouched: only the gradients (and what follows from them) differ
        assert outcomes(run.reports[0])[("qwen3_moe", "load")] == "pass"
        step = run.reports[0]["outcomes"]["qwen3_moe"]["step"]["detail"]
        figures = dict(re.findall(r"(\w+)=([0-9.e+-]+)", step))
        assert float(figures["grads"]) > 1e-5 and float(figures["loss"]) == 0.0, step


@pytest.mark.distributed
def test_verify_checks_your_own_architecture(run_command, tmp_path):
    """--model-dir: a full-size mixtral config with 3 experts per token (no weights: verify never reads them), shrunk
    to a tiny model with the same routing, checked like every family."""
    import json

    from transformers import AutoConfig

    config = AutoConfig.for_model("mixtral", num_experts_per_tok=3)
    own = tmp_path / "my-model"
    config.save_pretrained(own)
    run = run_command(torchrun(2, "-m", "ep_ds_shim", "verify", "--model-dir", own, "--work-dir", tmp_path / "work",
                               "--json", "{json}"), nproc=2, timeout=1800)
    assert run.returncode == 0, run
    label = f"mixtral ({own})"
    assert outcomes(run.reports[0]) == {(label, check): "pass" for check in ("load", "step", "export")}
    assert summary(run.output) == (3, 0, 0)
    shrunk = json.loads(next((tmp_path / "work").rglob("own-architecture/config.json")).read_text())
    assert shrunk["num_experts_per_tok"] == 3 and shrunk["num_local_experts"] % 2 == 0
    assert shrunk["num_local_experts"] >= 3 and shrunk["num_hidden_layers"] <= 2
    assert shrunk["hidden_size"] < config.hidden_size and shrunk["model_type"] == "mixtral"
