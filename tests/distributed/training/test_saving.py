"""Issue #9: the trained model leaves the cluster whole. Export, every usual save path, resume, and real runs (many
steps, gradient accumulation, clipping, a schedule, bf16, optimizer offload, gradient checkpointing, two nodes),
each compared with a single-process run, and every saved file reloaded and compared: "it saved" proves nothing.

The runs are the shipped example (`examples/finetune.py`), the Trainer and accelerate workers next to this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ep_ds_shim.testing import run_job, run_nodes, torchrun

from ...conftest import REPO

HERE = Path(__file__).parent
FINETUNE = REPO / "examples" / "finetune.py"


def finetune(tmp_path, path, *args, nproc=2):
    """The example's driver; returns its JSON summary (it asserts nothing itself, the test does)."""
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, FINETUNE, "--model-dir", path, "--nproc", str(nproc), "--work-dir",
                           tmp_path, "--json", summary, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=2400)
    assert summary.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(summary.read_text()), proc.stdout


def assert_run_matches(result, stdout, *, loss_tolerance=1e-5, param_tolerance=1e-5, resumed=True):
    assert result["curve_max_diff"] <= loss_tolerance, stdout
    if result["grad_norm_max_rel_diff"] is not None:  # fp32: every step's gradients, through the clipped norm
        assert result["grad_norm_max_rel_diff"] <= 1e-5, stdout
    assert len(result["full_losses"]) == len(result["reference"]), stdout
    if resumed:  # N steps + checkpoint + a new job that resumes == N + M uninterrupted steps
        assert result["resume_max_diff"] <= 1e-6 and len(result["resumed_losses"]) == len(result["reference"]), stdout
    export = result["export"]
    assert export["loading_problems"] == {}, export  # no missing, unexpected or mismatched keys
    assert export["max_param_diff"] <= param_tolerance, export
    assert result["export_vs_trained"] <= 1e-6, result  # the export is the model each rank trained
    assert result["ok"], stdout


@pytest.fixture
def checkpoint8(tiny_checkpoint):
    return tiny_checkpoint("qwen3_moe", num_experts=8)


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4], ids=["dp1xep2", "dp2xep2"])
def test_real_run_resume_and_export_fp32(nproc, checkpoint8, tmp_path):
    """20 steps, gradient accumulation 2, clipping 1.0, warm-up + decay schedule, ZeRO-3; checkpoint at step 4, a
    new job resumes; the loss curve, the resumed curve and the export all equal the single-process run."""
    result, stdout = finetune(tmp_path, checkpoint8, "--total-steps", 20, "--grad-accum", 2, "--ep-size", 2,
                              nproc=nproc)
    assert_run_matches(result, stdout)
    assert result["train_batch_size"] == 2 * 2 * nproc  # DeepSpeed counts ranks: micro x accumulation x world
    export = Path(result["export_dir"])
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded by max_shard_size
    config = json.loads((export / "config.json").read_text())
    assert not {"distributed_config", "tp_plan", "ep_size", "tp_size", "base_model_ep_plan"} & set(config), config


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4], ids=["dp1xep2", "dp2xep2"])
def test_real_run_bf16(nproc, checkpoint8, tmp_path):
    """DeepSpeed bf16, 20 steps: the curve equals a single-process DeepSpeed bf16 run of the same steps within the
    tolerance the README justifies (measured: identical)."""
    from ep_ds_shim.testing.oracle import BF16_LOSS_TOLERANCE, BF16_PARAM_TOLERANCE

    result, stdout = finetune(tmp_path, checkpoint8, "--bf16", "--total-steps", 20, "--grad-accum", 2, "--ep-size",
                              2, "--skip-resume", nproc=nproc)
    assert_run_matches(result, stdout, loss_tolerance=BF16_LOSS_TOLERANCE, param_tolerance=BF16_PARAM_TOLERANCE,
                       resumed=False)


@pytest.mark.distributed
@pytest.mark.parametrize("option", ["--offload-optimizer", "--gradient-checkpointing"])
def test_offload_and_gradient_checkpointing_match(option, checkpoint8, tmp_path):
    result, stdout = finetune(tmp_path, checkpoint8, option, "--total-steps", 6, "--skip-resume")
    assert_run_matches(result, stdout, resumed=False)


@pytest.mark.distributed
def test_two_nodes_dp2_x_ep2(checkpoint8, tmp_path):
    """Two torchrun agents on this machine (--nnodes 2, c10d rendezvous on 127.0.0.1): global ranks 2-3 have local
    ranks 0-1, and the run still equals the single-process one."""
    from ep_ds_shim.testing import oracle

    export = tmp_path / "export"
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2",
              "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", FINETUNE,
              "--phase", "full", "--model-dir", checkpoint8, "--ep-size", "2", "--total-steps", "6",
              "--export-dir", export, "--json", "{json}"] for node in (0, 1)]
    run = run_nodes(nodes, nproc=4, cwd=REPO, timeout=1200)
    assert run.returncode == 0 and len(run.reports) == 4, run
    reference = oracle.reference_run(checkpoint8, steps=6, grad_accum=1, world=4)
    assert sorted(r["rank"] for r in run.reports) == [0, 1, 2, 3]
    curve = [sum(values) / 4 for values in zip(*(r["losses"] for r in run.reports))]
    assert max(abs(a - b) for a, b in zip(curve, reference["losses"])) <= 1e-5, (curve, reference["losses"])
    assert all(r["export_vs_trained"] <= 1e-6 for r in run.reports)


@pytest.mark.distributed
def test_export_loads_with_another_ep_size(checkpoint8, tmp_path):
    """An export from ep=2 loads with EP over 4 ranks (each holding 2 of 8 experts) and equals a plain load."""
    result, stdout = finetune(tmp_path, checkpoint8, "--total-steps", 2, "--skip-resume")
    run = run_job(torchrun(4, HERE / "worker_reload.py", result["export_dir"], "{json}"), nproc=4, cwd=REPO)
    assert run.returncode == 0 and len(run.reports) == 4, run
    for report in run.reports:
        assert report["expert_rows"] == 2 and report["logits_vs_plain"] <= 1e-5, report


def reload(directory, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True, **kwargs)


def assert_same_model(directory, reference_directory, tolerance=1e-6):
    model, info = reload(directory)
    assert not any(info.values()), info
    reference, _ = reload(reference_directory)
    wanted = dict(reference.named_parameters())
    diffs = {name: float((param.detach() - wanted[name].detach()).abs().max()) for name, param in model.named_parameters()}
    assert max(diffs.values()) <= tolerance, diffs


@pytest.mark.distributed
def test_trainer_checkpoints_and_save_model_hold_the_whole_model(checkpoint8, tmp_path):
    """EPTrainer, saving only on global rank 0 (as on GPUs): checkpoints at steps 2 and 4 (`save_steps`), the final
    `save_model`, and `resume_from_checkpoint`, each compared with a single-process Trainer run."""
    worker = HERE / "worker_trainer_save.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, worker, checkpoint8, tmp_path / "reference", tmp_path / "reference-{rank}.json",
                    "--reference"], check=True, cwd=REPO, env=env, capture_output=True, timeout=900)
    reference_losses = json.loads((tmp_path / "reference-0.json").read_text())["losses"]
    run = run_job(torchrun(2, worker, checkpoint8, tmp_path / "ep", "{json}"), nproc=2, cwd=REPO)
    assert run.returncode == 0 and len(run.reports) == 2, run
    for report in run.reports:
        assert max(abs(a - b) for a, b in zip(report["losses"], reference_losses)) <= 1e-4, report
    for saved in ("checkpoint-2", "checkpoint-4", "final"):
        assert_same_model(tmp_path / "ep" / saved, tmp_path / "reference" / saved, tolerance=1e-5)
    resumed = run_job(torchrun(2, worker, checkpoint8, tmp_path / "resumed", "{json}",
                               "--resume-from", tmp_path / "ep" / "checkpoint-2"), nproc=2, cwd=REPO)
    assert resumed.returncode == 0, resumed
    for report in resumed.reports:  # the log of steps 1-2 comes from the checkpoint, steps 3-4 from the resumed run
        assert len(report["losses"]) == len(reference_losses), report
        assert max(abs(a - b) for a, b in zip(report["losses"], reference_losses)) <= 1e-4, report
    assert_same_model(tmp_path / "resumed" / "final", tmp_path / "ep" / "final", tolerance=1e-6)


@pytest.mark.distributed
def test_trainer_at_zero_stage_2_is_refused_with_the_config_line(checkpoint8, tmp_path):
    worker = HERE / "worker_trainer_save.py"
    run = run_job(torchrun(2, worker, checkpoint8, tmp_path / "ep", "{json}", "--stage", 2), nproc=2, cwd=REPO)
    assert run.returncode != 0 and len(run.reports) == 2, run
    for report in run.reports:
        assert report["raised"] == "EpShimError", report
        assert '"zero_optimization": {"stage": 3}' in report["message"], report


@pytest.mark.distributed
def test_trainer_save_only_model(checkpoint8, tmp_path):
    worker = HERE / "worker_trainer_save.py"
    run = run_job(torchrun(2, worker, checkpoint8, tmp_path / "ep", "{json}", "--save-only-model"), nproc=2, cwd=REPO)
    assert run.returncode == 0, run
    for saved in ("checkpoint-2", "checkpoint-4"):
        model, info = reload(tmp_path / "ep" / saved)
        assert not any(info.values()), info
        assert not (tmp_path / "ep" / saved / "latest").exists()  # weights only, no DeepSpeed state


@pytest.mark.distributed
def test_deepspeed_and_accelerate_save_paths(checkpoint8, tmp_path):
    """accelerate's get_state_dict / save_model (after prepare inside supply_deepspeed_groups) and DeepSpeed's
    save_16bit_model write the whole model."""
    accelerate = Path(sys.executable).with_name("accelerate")
    run = run_job([accelerate, "launch", "--config_file", REPO / "examples" / "launchers" / "accelerate_zero3.yaml",
                   "--zero3_save_16bit_model", "true", "--main_process_port", "{port}",
                   HERE / "worker_accelerate_save.py", checkpoint8, tmp_path, "{json}"], nproc=2, cwd=REPO)
    assert run.returncode == 0 and len(run.reports) == 2, run
    export = tmp_path / "export"
    for report in run.reports:
        returned = report["get_state_dict"]["returned"]
        assert report["get_state_dict"]["raised"] is None and report["save_model"]["raised"] is None, report
        if report["rank"] == 0:
            assert returned and all(shape[0] == 8 for shape in returned.values()), returned
    (tmp_path / "accelerate" / "config.json").write_bytes((export / "config.json").read_bytes())
    assert_same_model(tmp_path / "accelerate", export)
    sixteen = tmp_path / "sixteen"
    assert (sixteen / "pytorch_model.bin").exists()
    (sixteen / "config.json").write_bytes((export / "config.json").read_bytes())
    assert_same_model(sixteen, export)
