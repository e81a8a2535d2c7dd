"""Issues #22 and #20: the export streams, is written by every rank, is atomic and verified, and fails clearly.

Every case is a real torchrun job over gloo with DeepSpeed ZeRO-3 (`worker_export.py`), and every export that
succeeds is reloaded in a plain single process and compared with the single-process model (the oracle: the
checkpoint as transformers loads it, fp32): "it saved" proves nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ep_ds_shim.testing import run_job, torchrun

from ...conftest import REPO, checkpoint_path

WORKER = Path(__file__).with_name("worker_export.py")
FAMILIES = ["gpt_oss", "qwen3_moe", "mixtral", "qwen3_vl_moe"]


@pytest.fixture(scope="session")
def family_checkpoint(tiny_checkpoint):
    """Factory: an 8-expert tiny checkpoint of a matrix family (the multimodal one from `tiny_models`)."""
    from ep_ds_shim.testing.tiny_models import build_tiny_model

    def build(family: str, **sizes) -> Path:
        sizes = {"num_experts": 8, **sizes}
        if family == "qwen3_vl_moe":
            return build_tiny_model(checkpoint_path(family, **sizes), family, **sizes)
        return tiny_checkpoint(family, **sizes)

    return build


def export_job(checkpoint, mode, target, *extra, nproc=2, env=None, timeout=900):
    return run_job(torchrun(nproc, WORKER, checkpoint, mode, target, "{json}", *map(str, extra)), nproc=nproc,
                   cwd=REPO, env=env, timeout=timeout)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def reload(directory: Path):
    """(the model's parameters, loading problems) of a plain single-process load."""
    from transformers import AutoConfig

    from ep_ds_shim.testing.tiny_models import model_class_for

    model_class = model_class_for(AutoConfig.from_pretrained(directory).model_type)
    model, info = model_class.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    return {name: param.detach() for name, param in model.named_parameters()}, {k: v for k, v in info.items() if v}


def assert_equals_oracle(directory: Path, checkpoint: Path, tolerance: float = 1e-6):
    exported, problems = reload(directory)
    oracle, _ = reload(checkpoint)
    assert not problems, problems
    assert exported.keys() == oracle.keys()
    worst = max(float((exported[name] - oracle[name]).abs().max()) for name in oracle)
    assert worst <= tolerance, worst


# --- the same output as the previous export -----------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("family,nproc,extra", [
    *[(family, 2, ()) for family in FAMILIES],
    ("mixtral", 4, ("--ep-size", 2)),
    ("qwen3_moe", 2, ("--as-loaded",)),
    ("gpt_oss", 4, ("--ep-size", 2, "--no-zero3")),
], ids=[*FAMILIES, "mixtral-dp2xep2", "qwen3_moe-as-loaded", "gpt_oss-dtensors-dp2xep2"])
def test_streaming_export_equals_the_gather_to_rank_0_export(family, nproc, extra, family_checkpoint, tmp_path):
    """Key for key and value for value (bit-identical), with the same index metadata (total_parameters of the exported
    model, total_size) and the same config; the release's reverse conversion (mixtral: `block_sparse_moe.experts.N.w1`)
    is applied; and the export reloads equal to the oracle."""
    checkpoint = family_checkpoint(family)
    run = export_job(checkpoint, "compare", tmp_path, "--max-shard-size", "20KB", *extra, nproc=nproc)
    assert run.returncode == 0 and len(run.reports) == nproc, run
    stream, reference = tmp_path / "stream", tmp_path / "reference"
    mine, theirs = tensors(stream), tensors(reference)
    assert mine.keys() == theirs.keys()
    assert all(mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]) for key in theirs)
    if family == "mixtral":
        assert any(".block_sparse_moe.experts.7.w1." in key for key in mine), sorted(mine)[:8]
    index = json.loads((stream / "model.safetensors.index.json").read_text())
    assert index["metadata"] == json.loads((reference / "model.safetensors.index.json").read_text())["metadata"]
    assert set(index["weight_map"]) == set(mine)
    assert all(key in tensors_of(stream / file) for key, file in index["weight_map"].items())
    assert len(set(index["weight_map"].values())) > 2  # sharded, every rank wrote some
    config = json.loads((stream / "config.json").read_text())
    assert config == json.loads((reference / "config.json").read_text())
    assert not {"distributed_config", "tp_plan", "ep_size", "tp_size"} & set(config), config
    assert_equals_oracle(stream, checkpoint)


def tensors_of(file: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return set(handle.keys())


# --- memory -------------------------------------------------------------------------------------------------------

MEMORY_SIZES = dict(num_experts=16, hidden_size=256, num_layers=16, expert_size=256, vocab_size=1024)


@pytest.mark.distributed
def test_export_memory_stays_within_one_shard_and_one_tensor(family_checkpoint, tmp_path):
    """Every rank's peak RSS growth during the export (the kernel's high-water mark, reset right before it) stays
    within max_shard_size + the largest tensor + 10%, for a model more than 8x that bound; the export reloads equal
    to the oracle."""
    checkpoint = family_checkpoint("qwen3_moe", **MEMORY_SIZES)
    model_bytes = sum(file.stat().st_size for file in checkpoint.glob("*.safetensors"))
    shard = model_bytes // 16
    run = export_job(checkpoint, "memory", tmp_path / "export", "--max-shard-size", shard, timeout=1200)
    assert run.returncode == 0 and len(run.reports) == 2, run
    for report in run.reports:
        bound = 1.1 * (report["max_shard_size"] + report["largest_tensor"])
        assert report["model_bytes"] >= 8 * bound, report
        assert report["growth_bytes"] <= bound, (report["growth_bytes"] / bound, report)
    assert_equals_oracle(tmp_path / "export", checkpoint)


# --- faults: SIGKILL of one rank at several points ------------------------------------------------------------------

OLD_SEED = 1


@pytest.fixture(scope="session")
def old_checkpoint(tiny_checkpoint):
    """The same architecture with other weights, saved by transformers unsharded: the older export in the target."""
    return tiny_checkpoint("qwen3_moe", num_experts=8, seed=OLD_SEED)


def outcome(target: Path, new: Path, old: Path | None) -> str:
    """'new', 'old' or 'refused' (a clear error from from_pretrained); anything else fails the test (a mix)."""
    if not target.exists():
        return "refused"
    try:
        params, problems = reload(target)
    except OSError as error:  # transformers, for a directory without weights
        assert "no file named model.safetensors" in str(error), error
        return "refused"
    assert not problems, problems
    counts = {}
    for name, wanted in (("new", new), ("old", old)):
        if wanted is not None:
            reference, _ = reload(wanted)
            counts[name] = sum(torch.equal(params[key], reference[key]) for key in reference)
            if counts[name] == len(reference):
                return name
    raise AssertionError(f"a mix: tensors equal to each model {counts} of {len(params)}")


FAULTS = [
    # (target holds an older export, kill point @ rank, what reloading must give)
    (False, "gather:2@1", "refused"),
    (False, "partial:1@1", "refused"),
    (False, "commit@0", "refused"),
    (False, "committed@0", "new"),
    (True, "gather:2@0", "old"),
    (True, "write:1@1", "old"),
    (True, "verify@0", "old"),
    (True, "commit@0", "refused"),
    (True, "committed@0", "new"),
    (True, None, "new"),
]


@pytest.mark.distributed
@pytest.mark.parametrize("older,kill,expected", FAULTS,
                         ids=[f"{'old' if o else 'fresh'}-{k or 'no-fault'}" for o, k, _ in FAULTS])
def test_a_killed_export_leaves_the_old_model_the_new_one_or_a_clear_error(older, kill, expected, family_checkpoint,
                                                                          old_checkpoint, tmp_path):
    """A rank SIGKILLed while gathering, after writing a shard, inside a torn shard, before the verification, in the
    middle of the move into place or right after it: the target reloads as exactly the old model, exactly the new one,
    or from_pretrained refuses it clearly, never a mix. An older unsharded export (model.safetensors) never survives
    a new sharded one; files that are not the model's (a tokenizer file here) are kept."""
    checkpoint = family_checkpoint("qwen3_moe")
    target = tmp_path / "target"
    if older:
        shutil.copytree(old_checkpoint, target)
        (target / "tokenizer_config.json").write_text("{}")
        assert (target / "model.safetensors").exists()
    run = export_job(checkpoint, "export", target, "--max-shard-size", "20KB", *(("--kill", kill) if kill else ()))
    assert (run.returncode == 0) == (kill is None), run
    assert outcome(target, checkpoint, old_checkpoint if older else None) == expected, run
    if expected == "new":
        assert not (target / "model.safetensors").exists()  # the old unsharded file did not survive
        assert_equals_oracle(target, checkpoint)
        assert not list(tmp_path.glob(".target.ep_ds_shim-export-*"))
    if older:
        assert (target / "tokenizer_config.json").read_text() == "{}"


# --- clear errors instead of hangs, silent returns or a gloo abort --------------------------------------------------


@pytest.mark.distributed
def test_a_target_that_is_a_file_or_cannot_be_written_is_refused_on_every_rank_before_any_gather(
        family_checkpoint, tmp_path):
    checkpoint = family_checkpoint("qwen3_moe")
    occupied = tmp_path / "a-file"
    occupied.write_text("not a directory")
    run = export_job(checkpoint, "bad-targets", occupied)
    assert run.returncode == 0 and len(run.reports) == 2, run
    for report in run.reports:
        assert report["file"]["raised"] == "ExportError", report
        assert "exists and is not a directory" in report["file"]["message"], report
        assert report["unwritable"]["raised"] == "ExportError", report
        assert "cannot be written" in report["unwritable"]["message"], report
        assert report["gathered"] == 0, report  # refused before anything was gathered
    assert occupied.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.distributed
@pytest.mark.parametrize("mode,call,extra", [("one-rank", "ep_ds_shim.save_pretrained", ()),
                                             ("one-rank-verify", "verify_expert_integrity", ()),
                                             ("one-rank-initialize", "the DeepSpeed hand-over", ("--as-loaded",))])
def test_a_collective_called_on_rank_0_only_names_the_missing_rank_within_the_timeout(mode, call, extra,
                                                                                      family_checkpoint, tmp_path):
    """`if rank == 0: ep_ds_shim.save_pretrained(...)` (or the integrity check, or the hand-over): rank 0 raises
    within EP_DS_SHIM_TIMEOUT, naming rank 1, instead of hanging; nothing is left in the target's directory."""
    checkpoint = family_checkpoint("qwen3_moe")
    run = export_job(checkpoint, mode, tmp_path / "target", *extra, env={"EP_DS_SHIM_TIMEOUT": "20"}, timeout=300)
    assert run.returncode != 0, run
    first = next(report for report in run.reports if report["rank"] == 0)
    assert first["raised"] == "CollectiveTimeoutError", first
    assert "ranks [1] did not reach" in first["message"] and call in first["message"], first
    assert 20 <= first["seconds"] <= 60, first
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


@pytest.mark.distributed
def test_a_rank_that_exits_instead_of_exporting_is_named(family_checkpoint, tmp_path):
    """Rank 1's script ends without the export: rank 0 is told at once which rank exited (not a gloo "Connection
    closed by peer", not a wait for the timeout)."""
    checkpoint = family_checkpoint("qwen3_moe")
    run = export_job(checkpoint, "rank-exits", tmp_path / "target", env={"EP_DS_SHIM_TIMEOUT": "600"}, timeout=300)
    first = next(report for report in run.reports if report["rank"] == 0)
    assert first["raised"] == "RankExitedError", first
    assert "ranks [1] exited without reaching ep_ds_shim.save_pretrained" in first["message"], first
    assert first["seconds"] < 60, first
    assert not (tmp_path / "target").exists()
