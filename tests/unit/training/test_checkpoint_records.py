"""The parts of checkpointing that need no process group: the JSON record and what is refused in it, putting a
directory in place (atomic exchange, and the two-rename fallback whose gap a resume reports), naming a tag that is
missing, and how a conversion shares and finds its work."""

from __future__ import annotations

import json
import os

import pytest

from ep_ds_shim.training.checkpoints import durable, manifest, resolve, sources, universal


def record(**changes) -> dict:
    """A valid record of a 2-rank (dp=1 x ep=2) checkpoint with one dense and one expert sub-group."""
    files = lambda rank: {  # noqa: E731
        "model_states": {"name": f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", "sha256": "a" * 64, "bytes": 1},
        "optim_states": {"name": f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", "sha256": "b" * 64, "bytes": 2}}
    payload = {
        "format": manifest.FORMAT, "version": manifest.VERSION, "tag": "global_step2", "step": 2, "zero_stage": 3,
        "precision": "fp32", "layout": {"world_size": 2, "dp_size": 1, "ep_size": 2},
        "model": {"class": "M", "parameters": {"w": [4, 3], "e": [8, 2]}, "expert_rows": {"e": 8}},
        "optimizer": {"class": "AdamW", "param_groups": 1, "hyperparameters": [{"lr": 0.1}]},
        "partitions": [{"partition_count": 2, "param_group": 0, "expert": False, "params": [["w", [4, 3], 6]]},
                       {"partition_count": 1, "param_group": 0, "expert": True, "params": [["e", [4, 2], 8]]}],
        "ranks": [{"rank": rank, "ep_rank": rank, "files": files(rank), "partition_ranks": [rank, 0]}
                  for rank in range(2)],
    }
    payload.update(changes)
    return payload


def write(tmp_path, payload) -> str:
    tmp_path.joinpath(manifest.NAME).write_text(json.dumps(payload))
    return str(tmp_path)


def test_a_valid_record_reads_back(tmp_path):
    assert manifest.read(write(tmp_path, record())) == record()


@pytest.mark.parametrize("payload, needle", [
    ([], "expected a JSON object"),
    (record(format="something else"), "format is 'something else'"),
    (record(version=99), "version 99"),
    (record(step="2"), "'step' is missing or not a int"),
    (record(step=True), "'step' is missing or not a int"),
    (record(layout={"world_size": 2, "dp_size": 2, "ep_size": 2}), "dp_size x ep_size != world_size"),
    (record(ranks=record()["ranks"][:1]), "1 rank entries for world_size 2"),
    (record(partitions=[{"partition_count": 0, "param_group": 0, "expert": False, "params": []}]), "partitions[0]"),
], ids=["not-an-object", "format", "version", "step-string", "step-bool", "layout", "ranks", "partitions"])
def test_a_malformed_record_is_refused_naming_what(tmp_path, payload, needle):
    with pytest.raises(manifest.ManifestProblem, match="malformed") as raised:
        manifest.read(write(tmp_path, payload))
    assert needle in str(raised.value)


@pytest.mark.parametrize("name", ["../A/zero_pp_rank_1_mp_rank_00_optim_states.pt", "/etc/passwd", "x.pt",
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt/.."])
def test_a_record_naming_files_outside_its_tag_is_refused(tmp_path, name):
    payload = record()
    payload["ranks"][1]["files"]["optim_states"]["name"] = name
    with pytest.raises(manifest.ManifestProblem, match=r"ranks\[1\]\.files\['optim_states'\]"):
        manifest.read(write(tmp_path, payload))


def test_a_record_that_is_a_pickle_is_not_unpickled(tmp_path):
    marker = tmp_path / "ran"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    tmp_path.joinpath(manifest.NAME).write_bytes(payload)
    with pytest.raises(manifest.ManifestProblem, match="not valid JSON"):
        manifest.read(str(tmp_path))
    assert not marker.exists()


def test_a_missing_record_is_named(tmp_path):
    with pytest.raises(manifest.ManifestProblem, match=f"no record {manifest.NAME}"):
        manifest.read(str(tmp_path))


def _tree(path, content: str) -> None:
    path.mkdir()
    path.joinpath("file").write_text(content)


def test_put_in_place_renames_a_new_directory(tmp_path):
    _tree(tmp_path / "staging", "new")
    durable.put_in_place(tmp_path / "staging", tmp_path / "tag", outgoing=tmp_path / "out")
    assert (tmp_path / "tag" / "file").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["tag"]


def test_put_in_place_swaps_an_existing_directory_atomically(tmp_path):
    _tree(tmp_path / "tag", "old")
    _tree(tmp_path / "staging", "new")
    assert durable.exchange_paths(tmp_path / "staging", tmp_path / "tag")  # this file system can (ext4 here)
    assert (tmp_path / "tag" / "file").read_text() == "new" and (tmp_path / "staging" / "file").read_text() == "old"
    durable.put_in_place(tmp_path / "staging", tmp_path / "tag", outgoing=tmp_path / "out")
    assert (tmp_path / "tag" / "file").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["tag"]


def test_put_in_place_falls_back_to_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "exchange_paths", lambda first, second: False)
    _tree(tmp_path / "tag", "old")
    _tree(tmp_path / "staging", "new")
    durable.put_in_place(tmp_path / "staging", tmp_path / "tag", outgoing=tmp_path / "out")
    assert (tmp_path / "tag" / "file").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["tag"]


def test_write_atomic_replaces_the_whole_file(tmp_path):
    target = tmp_path / "latest"
    target.write_text("global_step1")
    durable.write_atomic(target, b"global_step2")
    assert target.read_text() == "global_step2" and sorted(os.listdir(tmp_path)) == ["latest"]


def test_a_tag_lost_between_two_renames_names_both_copies(tmp_path):
    for name in (".fixed.outgoing-0a1b", ".fixed.incoming-0a1b"):
        (tmp_path / name).mkdir()
        write(tmp_path / name, record())
    (tmp_path / "latest").write_text("fixed")
    with pytest.raises(resolve.Problem) as raised:
        resolve.resolve(tmp_path, None)
    message = str(raised.value)
    assert "interrupted" in message and ".fixed.outgoing-0a1b holds the previous one" in message
    assert ".fixed.incoming-0a1b the new one" in message and "rename the one to resume" in message


def test_no_latest_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "global_step4").mkdir()
    write(tmp_path / "global_step4", record())
    with pytest.raises(resolve.Problem, match=r"no 'latest' file .*\(None, None\).*\['global_step4'\]"):
        resolve.resolve(tmp_path, None)


def test_a_checkpoint_of_another_zero_stage_is_named_from_its_file_names(tmp_path):
    (tmp_path / "t").mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (tmp_path / "t" / name).write_bytes(b"\x80")  # never read: a pickle is not opened to find out
    with pytest.raises(resolve.Problem) as raised:
        resolve.resolve(tmp_path, "t")
    assert raised.value.kind == "layout" and "ZeRO stage 1 or 2" in str(raised.value)


def test_conversion_work_is_shared_by_size_and_covers_every_parameter():
    payload = record()
    payload["model"]["parameters"].update({"big": [100, 10]})
    payload["partitions"][0]["params"].append(["big", [100, 10], 500])
    shares = universal.shares(payload, 2)
    assert sorted(sum(shares, [])) == ["big", "e", "w"] and shares[0] == ["big"]


def test_state_indices_follow_the_parameter_groups():
    groups = [{"param_group": group} for group in (0, 1, 0, 1)]
    # the base optimizer's state dict numbers group 0's sub-groups (0, 2) before group 1's (1, 3)
    assert sources.state_indices(groups) == [0, 2, 1, 3]
