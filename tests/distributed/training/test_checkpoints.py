"""Issues #19 and #20: DeepSpeed checkpoints of EP engines move to another DP x EP layout with their optimizer, and
nothing half-written is ever resumed.

Every run is real: torchrun gloo jobs on tiny locally built checkpoints, DeepSpeed's own save and (universal) load,
compared with the single-process oracle; every fault is a real SIGKILL of one rank in the middle of a save or a
conversion, followed by a fresh job that resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ep_ds_shim.testing import run_job, torchrun

from ...conftest import REPO
from .test_saving import FINETUNE, assert_same_model, finetune

HERE = Path(__file__).parent
WORKER = HERE / "worker_checkpoints.py"


@pytest.fixture
def checkpoint8(tiny_checkpoint):
    return tiny_checkpoint("qwen3_moe", num_experts=8)


def worker(nproc: int, model, checkpoint_dir, *args, timeout: int = 900):
    return run_job(torchrun(nproc, WORKER, model, checkpoint_dir, "{json}", *map(str, args)), nproc=nproc, cwd=REPO,
                   timeout=timeout)


def same_error_everywhere(reports, nproc: int, kind: str, *needles: str) -> str:
    """Every rank raised `kind` with the same message, which names every needle; returns the message."""
    assert len(reports) == nproc, reports
    messages = {report.get("message") for report in reports}
    assert {report.get("raised") for report in reports} == {kind} and len(messages) == 1, reports
    message = messages.pop()
    for needle in needles:
        assert needle in message, message
    return message


# --- issue 19: another layout, the optimizer carried over, exactly ----------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("before, after, extra", [
    ((2, 2), (4, 4), ["--grad-accum", "2"]),  # ep=2 -> ep=4 (and 2 -> 4 ranks), with gradient accumulation
    ((2, 2), (4, 2), []),                      # 2 ranks dp=1 x ep=2 -> 4 ranks dp=2 x ep=2
    ((4, 2), (2, 2), []),                      # ... and back
    ((4, 4), (4, 2), []),                      # the same world, another EP size
], ids=["2xep2-to-4xep4", "2xep2-to-dp2xep2", "dp2xep2-to-2xep2", "4xep4-to-dp2xep2"])
def test_resume_on_another_layout_equals_the_uninterrupted_run(before, after, extra, checkpoint8, tmp_path):
    """N steps, a checkpoint, a job with another layout resumes with one call on every rank (the checkpoint is
    converted on the fly), M more steps: the loss of every step and the exported weights equal N+M uninterrupted steps
    of a single process on every rank's batches (fp32, 1e-5); the step count, Adam moments and LR schedule carried
    over (a restarted optimizer or schedule moves the loss by ~1e-2 here)."""
    result, stdout = finetune(tmp_path, checkpoint8, "--total-steps", 6, "--resume-at", 3, "--ep-size", before[1],
                              "--resume-nproc", after[0], "--resume-ep-size", after[1], *extra, nproc=before[0])
    assert result["resume_max_diff"] <= 1e-5 and len(result["resumed_losses"]) == 6, stdout
    assert result["export"]["loading_problems"] == {} and result["export"]["max_param_diff"] <= 1e-5, result
    assert result["ok"], stdout
    universal = Path(result["checkpoint"]) / "global_step3" / "universal"
    assert (universal / "ep_ds_shim_universal.json").is_file()  # the conversion, cached next to the checkpoint


@pytest.mark.distributed
def test_resume_on_another_layout_bf16(checkpoint8, tmp_path):
    """DeepSpeed bf16: 2 ranks -> 4 ranks, compared with a single-process DeepSpeed bf16 run that resumes with the
    new job's batches, within the bf16 tolerance the oracle states (the state itself moves exactly: fp32 master
    weights and moments)."""
    from ep_ds_shim.testing.oracle import BF16_LOSS_TOLERANCE, BF16_PARAM_TOLERANCE

    result, stdout = finetune(tmp_path, checkpoint8, "--bf16", "--total-steps", 6, "--resume-at", 3, "--ep-size", 2,
                              "--resume-nproc", 4, nproc=2)
    assert result["resume_max_diff"] <= BF16_LOSS_TOLERANCE, stdout
    assert result["export"]["max_param_diff"] <= BF16_PARAM_TOLERANCE and result["ok"], stdout


def merged_state(states: list[dict]) -> dict:
    """The whole model's training state from every rank's `full_state` report (ranks holding the same part agree)."""
    parameters, rest = {}, []
    for state in states:
        for name, digests in state["parameters"].items():
            assert parameters.setdefault(name, digests) == digests, name
        rest.append({key: value for key, value in state.items() if key != "parameters"})
    assert all(entry == rest[0] for entry in rest), rest
    return {"parameters": parameters, **rest[0]}


@pytest.mark.distributed
@pytest.mark.parametrize("options", [["--param-groups", 2], ["--bf16"]], ids=["fp32-two-groups", "bf16"])
def test_the_training_state_moves_to_another_layout_and_back_bit_for_bit(options, checkpoint8, tmp_path):
    """2 ranks (ep=2) -> 4 ranks (dp=2 x ep=2) -> saved there -> 2 ranks: every parameter's fp32 master weights and
    both Adam moments (experts compared expert by expert), each parameter group's hyperparameters (two groups with
    their own learning rate and weight decay), Adam's step, the step count and the schedule are identical at every
    stop. In bf16 that is the whole state DeepSpeed trains from (its bf16 weights are cast from the fp32 master)."""
    saved = worker(2, checkpoint8, tmp_path / "first", "--mode", "save", "--save-at", 2, *options)
    assert saved.returncode == 0 and len(saved.reports) == 2, saved
    there = worker(4, checkpoint8, tmp_path / "first", "--mode", "resume", "--save-to", tmp_path / "back", *options)
    assert len(there.reports) == 4 and all(r["raised"] is None for r in there.reports), there
    back = worker(2, checkpoint8, tmp_path / "back", "--mode", "resume", *options)
    assert len(back.reports) == 2 and all(r["raised"] is None for r in back.reports), back
    original = merged_state([report["saves"][-1]["state"] for report in saved.reports])
    assert len(original["groups"]) == (2 if "--param-groups" in options else 1)
    assert merged_state([report["state"] for report in there.reports]) == original
    assert merged_state([report["state"] for report in back.reports]) == original


@pytest.fixture
def saved(checkpoint8, tmp_path):
    """A checkpoint of 2 steps on 2 ranks (dp=1 x ep=2): its directory and what each rank reported at the save."""
    directory = tmp_path / "saved"
    run = worker(2, checkpoint8, directory, "--mode", "save", "--save-at", 2)
    assert run.returncode == 0 and len(run.reports) == 2, run
    return directory, {report["rank"]: report["saves"][-1] for report in run.reports}


@pytest.mark.distributed
def test_load_module_only_loads_the_weights_in_any_layout(saved, checkpoint8):
    """load_module_only=True: the weights, not the optimizer state or step (DeepSpeed's own loads nothing under
    ZeRO-3); the loss on a fixed batch equals the saved run's, in the layout that wrote it and in another."""
    directory, at_save = saved
    same = worker(2, checkpoint8, directory, "--mode", "resume", "--module-only")
    assert same.returncode == 0 and all(report["raised"] is None for report in same.reports), same
    for report in same.reports:
        assert abs(report["loss"] - at_save[report["rank"]]["loss"]) <= 1e-6, (report, at_save)
        assert report["step"] == 0  # weights only
    other = worker(4, checkpoint8, directory, "--mode", "resume", "--module-only")
    assert other.returncode == 0 and all(report["raised"] is None for report in other.reports), other
    for report in other.reports:  # ranks 0-1 see the saved ranks' batches
        if report["rank"] in at_save:
            assert abs(report["loss"] - at_save[report["rank"]]["loss"]) <= 1e-5, (report, at_save)


@pytest.mark.distributed
def test_another_model_is_refused_on_every_rank(saved, tiny_checkpoint):
    directory, _ = saved
    run = worker(2, tiny_checkpoint("qwen3_moe"), directory, "--mode", "resume")  # 4 experts, not 8
    same_error_everywhere(run.reports, 2, "CheckpointLayoutError", "another model", "model.layers.0.mlp.experts",
                          "[8, 32, 64] in the checkpoint, [4, 32, 64] here")


@pytest.mark.distributed
def test_another_zero_stage_is_refused_on_every_rank(checkpoint8, tmp_path):
    """A checkpoint of a plain DeepSpeed ZeRO-2 run: named from DeepSpeed's file names, nothing unpickled."""
    written = run_job(torchrun(1, FINETUNE, "--phase", "train", "--no-ep", "--stage", 2, "--model-dir", checkpoint8,
                               "--checkpoint-dir", tmp_path / "stage2", "--resume-at", 1), nproc=1, cwd=REPO)
    assert written.returncode == 0, written
    run = worker(2, checkpoint8, tmp_path / "stage2", "--mode", "resume")
    same_error_everywhere(run.reports, 2, "CheckpointLayoutError", "ZeRO stage 1 or 2", "ZeRO stage 3 only")


@pytest.mark.distributed
def test_an_ep_size_that_does_not_divide_the_experts_is_refused_on_every_rank(saved, checkpoint8):
    """8 experts over ep=3: the job that would resume cannot even load the model with that EP size."""
    directory, _ = saved
    run = run_job(torchrun(3, FINETUNE, "--phase", "resume", "--model-dir", checkpoint8, "--ep-size", 3,
                           "--checkpoint-dir", directory, "--steps", 1), nproc=3, cwd=REPO)
    assert run.returncode != 0
    refusals = [line for line in run.output.splitlines() if "ep_ds_shim.errors.EPRequestError:" in line]
    assert len(refusals) == 3 and all("8 experts" in line and "ep_size=3" in line for line in refusals), run


# --- issue 20: nothing half-written is resumed --------------------------------------------------------------------


@pytest.mark.distributed
def test_wrong_or_damaged_checkpoints_fail_the_same_way_on_every_rank(checkpoint8, tmp_path):
    """Each case was a silent (None, None), a mix of returns and errors across ranks, a misleading message, or an
    unpickled record before; now every rank raises the same error naming what it found."""
    run = worker(2, checkpoint8, tmp_path / "ckpt", "--mode", "cases")
    assert run.returncode == 0 and len(run.reports) == 2, run
    cases = {name: [report["cases"][name] for report in run.reports] for name in run.reports[0]["cases"]}
    expected = {
        "missing_dir": ("CheckpointIntegrityError", "there is no checkpoint directory"),
        "no_latest": ("CheckpointIntegrityError", "has no 'latest' file", "(None, None)"),
        "missing_tag": ("CheckpointIntegrityError", "has no checkpoint tag 'C'", "'A', 'B'"),
        "tag_per_rank": ("CheckpointIntegrityError", "different checkpoints", "rank 0: tag 'A', step 1",
                         "rank 1: tag 'B', step 2"),
        "partial_file": ("CheckpointIntegrityError", "rank 1: its file", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                         "partial"),
        "swapped_file": ("CheckpointIntegrityError", "rank 1: its file", "another SHA-256"),
        "no_record": ("CheckpointIntegrityError", "has no record ep_ds_shim_checkpoint.json", "earlier tag"),
        "pickle_record": ("CheckpointIntegrityError", "is not valid JSON"),
        "traversal_record": ("CheckpointIntegrityError", "is malformed", "ranks[1].files['optim_states']"),
        "stage2_record": ("CheckpointLayoutError", "written at ZeRO stage 2, this engine runs stage 3"),
        "no_optimizer_states": ("EpShimError", "load_module_only=True"),
        "save_tag_per_rank": ("CheckpointIntegrityError", "same tag", "rank 0: tag 'rank0'", "rank 1: tag 'rank1'"),
        "save_into_file": ("CheckpointIntegrityError", "exists and is not a directory", "nothing was written"),
    }
    assert set(cases) == set(expected)
    for name, (kind, *needles) in expected.items():
        same_error_everywhere(cases[name], 2, kind, *needles)
    listing = run.reports[0]["listing"]
    assert not [name for name in listing if name.startswith(".")], listing  # no staging left by the refused saves
    assert not (tmp_path / "ckpt" / "rank0").exists() and not (tmp_path / "ckpt" / "rank1").exists()


KILLS = [  # tag, the rank killed, where in save_checkpoint, what a resume must find
    ("new", 1, "deepspeed-write", "old"),      # its model states written, its optimizer states not
    ("new", 1, "before-digest", "old"),        # all its files written, not flushed or agreed
    ("new", 0, "before-record", "old"),        # every rank agreed, no record yet
    ("new", 0, "before-latest", "old"),        # the new tag complete and in place, `latest` still the old one
    ("fixed", 1, "deepspeed-write", "old"),    # overwriting tag "fixed": the old one untouched
    ("fixed", 0, "before-record", "old"),
    ("fixed", 0, "before-latest", "new"),      # swapped in atomically: the new one
    ("fixed", 0, "mid-swap-fallback", "error"),  # no atomic exchange: between the two renames
]


@pytest.mark.distributed
@pytest.mark.parametrize("tag, victim, point, expected", KILLS, ids=[f"{k[0]}-rank{k[1]}-{k[2]}" for k in KILLS])
def test_a_rank_killed_during_save_leaves_the_old_or_the_new_checkpoint(tag, victim, point, expected, checkpoint8,
                                                                        tmp_path):
    """A save at step 2, one more step, and a second save in which one rank is SIGKILLed at `point`; a new job
    resumes with `load_checkpoint(dir)`: every rank's whole training state is exactly the old one or exactly the
    new one, or every rank raises the same clear error. Never a mix, never a silent return."""
    directory = tmp_path / "ckpt"
    tag_args = ["--tag", "fixed"] if tag == "fixed" else []
    killed = worker(2, checkpoint8, directory, "--mode", "save", "--save-at", "2,3", *tag_args, "--kill", point,
                    "--victim", victim)
    assert killed.returncode != 0 and len(killed.reports) == 2, killed
    states = {report["rank"]: {"old": report["saves"][0], "new": report["saves"][1]} for report in killed.reports}
    resumed = worker(2, checkpoint8, directory, "--mode", "resume")
    assert len(resumed.reports) == 2, resumed
    if expected == "error":
        message = same_error_everywhere(resumed.reports, 2, "CheckpointIntegrityError", "was interrupted",
                                        "holds the previous one", "the new one")
        copies = [name for name in os.listdir(directory) if name.startswith(".fixed.")]
        assert len(copies) == 2 and all(name in message for name in copies), (copies, message)
        # the advice works: rename the previous copy to the tag, and it resumes as the old state
        os.rename(directory / next(name for name in copies if ".outgoing-" in name), directory / "fixed")
        resumed = worker(2, checkpoint8, directory, "--mode", "resume")
        expected = "old"
    assert all(report["raised"] is None for report in resumed.reports), resumed
    for report in resumed.reports:
        want = states[report["rank"]][expected]
        assert (report["step"], report["fingerprint"]) == (want["step"], want["fingerprint"]), (report, want)


@pytest.mark.distributed
def test_a_conversion_killed_midway_leaves_the_checkpoint_usable(saved, checkpoint8, tmp_path):
    """A rank of the 4-rank job dies while it converts: the checkpoint resumes unchanged in its own layout, and the
    next 4-rank job converts it again and resumes."""
    directory, at_save = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    killed = worker(4, checkpoint8, copy, "--mode", "resume", "--kill", "during-conversion", "--victim", 3)
    assert killed.returncode != 0, killed
    tag_dir = copy / "global_step2"
    assert not (tag_dir / "universal").exists() and [name for name in os.listdir(tag_dir) if name.startswith(".")]
    native = worker(2, checkpoint8, copy, "--mode", "resume")
    assert all(report["raised"] is None for report in native.reports), native
    for report in native.reports:
        assert report["fingerprint"] == at_save[report["rank"]]["fingerprint"], (report, at_save)
    converted = worker(4, checkpoint8, copy, "--mode", "resume")
    assert all(report["raised"] is None and report["step"] == 2 for report in converted.reports), converted
    assert (tag_dir / "universal" / "ep_ds_shim_universal.json").is_file()
    assert not [name for name in os.listdir(tag_dir) if name.startswith(".")]  # the dead conversion's staging is gone


# --- the Trainer and accelerate take the same route ---------------------------------------------------------------


@pytest.mark.distributed
def test_trainer_resumes_on_another_layout(checkpoint8, tmp_path):
    """EPTrainer: checkpoint-2 on 2 ranks (dp=1 x ep=2), `resume_from_checkpoint` on 4 ranks (dp=2 x ep=2): the
    logged losses and the final model equal a single-process Trainer that resumes its own checkpoint-2 with the new
    job's batches (the Trainer logs losses rounded to 1e-4). Weight decay 0.01 with the Trainer's no-decay group:
    each parameter group keeps its own hyperparameters."""
    script = HERE / "worker_trainer_save.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}

    def reference(output, world, *extra):
        subprocess.run([sys.executable, script, checkpoint8, tmp_path / output, tmp_path / f"{output}-{{rank}}.json",
                        "--reference", "--world", str(world), "--data-world", "4", *map(str, extra)], check=True,
                       cwd=REPO, env=env, capture_output=True, timeout=900)
        return json.loads((tmp_path / f"{output}-0.json").read_text())["losses"]

    reference("reference", 2)
    wanted = reference("reference-resumed", 4, "--resume-from", tmp_path / "reference" / "checkpoint-2")
    first = run_job(torchrun(2, script, checkpoint8, tmp_path / "ep", "{json}", "--data-world", 4), nproc=2, cwd=REPO)
    assert first.returncode == 0, first
    checkpoint = tmp_path / "ep" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "latest").is_file()
    assert not [name for name in os.listdir(tmp_path / "ep") if name.startswith(".")]  # no staging folder left
    resumed = run_job(torchrun(4, script, checkpoint8, tmp_path / "resumed", "{json}", "--data-world", 4,
                               "--resume-from", checkpoint), nproc=4, cwd=REPO)
    assert resumed.returncode == 0 and len(resumed.reports) == 4, resumed
    for report in resumed.reports:
        assert len(report["losses"]) == len(wanted), report
        assert max(abs(a - b) for a, b in zip(report["losses"], wanted)) <= 1e-4, (report["losses"], wanted)
    assert_same_model(tmp_path / "resumed" / "final", tmp_path / "reference-resumed" / "final", tolerance=1e-5)


@pytest.mark.distributed
def test_a_trainer_checkpoint_folder_appears_only_when_complete(checkpoint8, tmp_path):
    """Rank 1 is SIGKILLed inside the Trainer's save of checkpoint-4 (after its DeepSpeed files): checkpoint-2 is
    there and whole, checkpoint-4 is not (only a hidden staging folder), so `resume_from_checkpoint=True`
    (`get_last_checkpoint`) picks checkpoint-2, and resuming it gives the uninterrupted run's last steps."""
    from transformers.trainer_utils import get_last_checkpoint

    script = HERE / "worker_trainer_save.py"
    killed = run_job(torchrun(2, script, checkpoint8, tmp_path / "ep", "{json}", "--kill-at-checkpoint", 4), nproc=2,
                     cwd=REPO)
    assert killed.returncode != 0, killed
    names = os.listdir(tmp_path / "ep")
    assert "checkpoint-2" in names and "checkpoint-4" not in names, names
    assert any(name.startswith(".checkpoint-4.incoming-") for name in names), names
    assert get_last_checkpoint(str(tmp_path / "ep")) == str(tmp_path / "ep" / "checkpoint-2")
    resumed = run_job(torchrun(2, script, checkpoint8, tmp_path / "resumed", "{json}", "--resume-from",
                               get_last_checkpoint(str(tmp_path / "ep"))), nproc=2, cwd=REPO)
    assert resumed.returncode == 0 and all(len(report["losses"]) == 4 for report in resumed.reports), resumed


@pytest.mark.distributed
def test_accelerate_load_state_resumes_on_another_layout(checkpoint8, tmp_path):
    """accelerate's save_state on 2 processes, load_state on 4 (the engine's load_checkpoint: converted), then more
    steps: every step's loss equals the single-process run on every rank's batches."""
    from ep_ds_shim.testing import oracle

    accelerate = Path(sys.executable).with_name("accelerate")
    script = HERE / "worker_accelerate_resume.py"

    def launch(nproc, *args):
        return run_job([accelerate, "launch", "--config_file", REPO / "examples" / "launchers" / "accelerate_zero3.yaml",
                        "--num_processes", str(nproc), "--main_process_port", "{port}", script, checkpoint8,
                        tmp_path / "state", "{json}", *map(str, args)], nproc=nproc, cwd=REPO)

    first = launch(2, "--steps", 3)
    assert first.returncode == 0 and len(first.reports) == 2, first
    second = launch(4, "--load", "--start", 3, "--steps", 3)
    assert second.returncode == 0 and len(second.reports) == 4, second
    reference = oracle.reference_run(checkpoint8, steps=6, grad_accum=1, world=[2] * 3 + [4] * 3)["losses"]
    curve = [sum(values) / len(values) for values in zip(*(r["losses"] for r in sorted(first.reports, key=_rank)))]
    curve += [sum(values) / len(values) for values in zip(*(r["losses"] for r in sorted(second.reports, key=_rank)))]
    assert max(abs(a - b) for a, b in zip(curve, reference)) <= 1e-5, (curve, reference)
    assert all(report["step_after_load"] == 3 for report in second.reports), second.reports


def _rank(report):
    return report["rank"]
