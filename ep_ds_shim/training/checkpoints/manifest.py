"""The record of one checkpoint tag: a JSON file next to DeepSpeed's files, written last, by global rank 0, once every
rank has written and flushed its own files.

It holds what a resume needs to know without unpickling anything: the tag and step, the DP x EP layout and ZeRO
stage that wrote it, the model (every parameter's full shape), the optimizer's parameter groups, the ZeRO-3 partition
structure (enough to reassemble any parameter from the ranks' files, `universal.py`), and the SHA-256 and size of
every file each rank wrote. A record that is missing, unreadable or does not have this shape is refused.
"""

from __future__ import annotations

import json
import os
import re

NAME = "ep_ds_shim_checkpoint.json"
FORMAT = "ep-ds-shim/deepspeed-zero3-checkpoint"
VERSION = 1

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# DeepSpeed's own file names of a rank's ZeRO-3 states (no directory part)
_FILE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_\d+_mp_rank_\d+_(model|optim)_states\.pt$")


class ManifestProblem(ValueError):
    """The record is missing or malformed (the message says what and where)."""


def path_in(tag_dir) -> str:
    return os.path.join(tag_dir, NAME)


def read(tag_dir) -> dict:
    """The validated record of the tag directory `tag_dir` (json only: nothing executes)."""
    path = path_in(tag_dir)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(64 << 20)
    except FileNotFoundError:
        raise ManifestProblem(f"it has no record {NAME}") from None
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestProblem(f"its record {path} is not valid JSON ({error})") from None
    problems = list(_shape_problems(payload))
    if problems:
        raise ManifestProblem(f"its record {path} is malformed: {'; '.join(problems[:3])}")
    return payload


def _shape_problems(payload):
    """What makes `payload` not a record this version can use (empty when it is one)."""
    if not isinstance(payload, dict):
        yield f"expected a JSON object, found {type(payload).__name__}"
        return
    if payload.get("format") != FORMAT:
        yield f"format is {payload.get('format')!r}, expected {FORMAT!r}"
        return
    if payload.get("version") != VERSION:
        yield f"version {payload.get('version')!r}; this ep-ds-shim reads version {VERSION}"
        return
    for key, kind in (("tag", str), ("step", int), ("zero_stage", int), ("precision", str), ("layout", dict),
                      ("model", dict), ("optimizer", dict), ("partitions", list), ("ranks", list)):
        if not _is(payload.get(key), kind):
            yield f"{key!r} is missing or not a {kind.__name__}"
    layout = payload.get("layout")
    if isinstance(layout, dict):
        sizes = {key: layout.get(key) for key in ("world_size", "dp_size", "ep_size")}
        if not all(_is(value, int) and value >= 1 for value in sizes.values()):
            yield f"layout {layout!r} is not three positive integers"
        elif sizes["dp_size"] * sizes["ep_size"] != sizes["world_size"]:
            yield f"layout {layout!r}: dp_size x ep_size != world_size"
        elif isinstance(payload.get("ranks"), list) and len(payload["ranks"]) != sizes["world_size"]:
            yield f"{len(payload['ranks'])} rank entries for world_size {sizes['world_size']}"
    model = payload.get("model")
    if isinstance(model, dict):
        params = model.get("parameters")
        if not (isinstance(params, dict) and all(_is_shape(shape) for shape in params.values())):
            yield "model.parameters is not {name: [dims]}"
        rows = model.get("expert_rows")
        if not (isinstance(rows, dict) and all(_is(value, int) and value > 0 for value in rows.values())):
            yield "model.expert_rows is not {name: rows}"
    optimizer = payload.get("optimizer")
    if isinstance(optimizer, dict) and not (_is(optimizer.get("param_groups"), int)
                                            and isinstance(optimizer.get("hyperparameters"), list)):
        yield "optimizer is not {param_groups, hyperparameters}"
    for index, group in enumerate(payload.get("partitions") or []):
        if not (isinstance(group, dict) and _is(group.get("partition_count"), int) and group["partition_count"] >= 1
                and _is(group.get("param_group"), int) and group["param_group"] >= 0
                and isinstance(group.get("expert"), bool) and isinstance(group.get("params"), list)
                and all(_is_param_entry(entry) for entry in group["params"])):
            yield (f"partitions[{index}] is not {{partition_count, param_group, expert, params: [[name, shape, "
                   "numel], ...]}}")
            break
    for index, entry in enumerate(payload.get("ranks") or []):
        problem = _rank_problem(entry, index, len(payload.get("partitions") or []))
        if problem:
            yield problem
            break


def _rank_problem(entry, index: int, sub_groups: int) -> str | None:
    if not isinstance(entry, dict) or entry.get("rank") != index:
        return f"ranks[{index}] is not the entry of rank {index}"
    if not _is(entry.get("ep_rank"), int) or entry["ep_rank"] < 0:
        return f"ranks[{index}].ep_rank is not a rank"
    partition_ranks = entry.get("partition_ranks")
    if not (isinstance(partition_ranks, list) and len(partition_ranks) == sub_groups
            and all(_is(value, int) and value >= 0 for value in partition_ranks)):
        return f"ranks[{index}].partition_ranks is not one rank per partition group"
    files = entry.get("files")
    if not (isinstance(files, dict) and {"model_states", "optim_states"} <= set(files)):
        return f"ranks[{index}].files does not name its model and optimizer states"
    for role, described in files.items():
        if not (isinstance(described, dict) and isinstance(described.get("name"), str)
                and _FILE.match(described["name"]) and _HEX64.match(str(described.get("sha256", "")))
                and _is(described.get("bytes"), int)):
            return f"ranks[{index}].files[{role!r}] is not {{name: DeepSpeed's file name, sha256, bytes}}"
    return None


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(_is(dim, int) and dim >= 0 for dim in value)


def _is_param_entry(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and _is_shape(entry[1])
            and _is(entry[2], int) and entry[2] >= 0)


def rank_files(payload: dict, rank: int) -> dict[str, dict]:
    """{role: {name, sha256, bytes}} of the files `rank` wrote."""
    return payload["ranks"][rank]["files"]
