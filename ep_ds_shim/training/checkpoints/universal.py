"""A checkpoint converted to DeepSpeed's universal format, for a resume on another DP x EP layout.

The format is DeepSpeed's own (`deepspeed/checkpoint/ds_to_universal.py`): ``zero/<parameter>/{fp32,exp_avg,
exp_avg_sq}.pt`` holding each parameter whole, ``zero/optimizer_state.pt`` (loss scaler, Adam's step, parameter
groups) and one model-states file (step count, LR scheduler, client state). Expert tensors are written the way
DeepSpeed writes AutoEP experts (every expert on dim 0, ``is_expert_parameter`` and the expert count), so DeepSpeed's
ZeRO-3 universal loader (`"checkpoint": {"load_universal": true}`) gives each rank its EP rank's experts, partitioned
over its expert-data-parallel group, and every dense weight partitioned over all ranks.

DeepSpeed's converter cannot write it for these checkpoints: its ZeRO-3 path recognises experts only by AutoEP's
parameter names (``<prefix>.w1/w2/w3`` in ``ds_autoep_layers`` metadata), would merge transformers' expert tensors
across EP ranks as if they were one data-parallel group, and loads every rank's files into memory at once. So the
conversion here reads the checkpoint's JSON record for where each piece lives (`sources.py`) and runs on every rank
of the resuming job, each writing a share of the parameters.

It is written under a hidden staging name next to the checkpoint's files (``<tag>/.universal.incoming-<id>``) and put
in place as ``<tag>/universal`` only when every rank has written and flushed its share, with a record of its own
(every file's SHA-256, the checkpoint record it came from). A resume finds it there and reuses it. The checkpoint's
own files are only read: a conversion that dies leaves them as they were.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid

import torch
import torch.distributed as dist

from ...errors import CheckpointIntegrityError
from . import durable, manifest
from .agree import AFTER_WRITE_TIMEOUT, agree, described
from .sources import OPTIMIZER_KEYS, Assembler

FOLDER = "universal"
RECORD = "ep_ds_shim_universal.json"
FORMAT = "ep-ds-shim/deepspeed-universal"
VERSION = 1
_RELATIVE = re.compile(r"^(zero/([^/]+/)?[a-z_0-9]+\.pt|zero_pp_rank_0_mp_rank_\d+_model_states\.pt)$")


def source_id(tag_dir: str) -> str:
    """Identifies the checkpoint a conversion came from: the SHA-256 of its record (which digests every file)."""
    with open(manifest.path_in(tag_dir), "rb") as handle:
        return durable.digest_bytes(handle.read())


def ensure(record: dict, tag_dir: str, root: str) -> None:
    """Every rank: make ``<root>/universal`` the conversion of the checkpoint in `tag_dir` (reusing a complete one)."""
    what = f"converting {tag_dir} for this layout"
    rank, world = dist.get_rank(), dist.get_world_size()
    wanted = source_id(tag_dir)
    target = os.path.join(root, FOLDER)
    problem = None
    try:
        usable = _cached_share_is_valid(target, wanted, rank, world)
    except Exception as error:  # noqa: BLE001 - shared below
        usable, problem = False, described(error)
    outcomes = agree("universal_cached", problem, what=what, error=CheckpointIntegrityError,
                     prefix=f"{what}: ", payload={"usable": usable, "token": uuid.uuid4().hex[:12]})
    if all(outcome["usable"] for outcome in outcomes.values()):
        return
    staging = os.path.join(root, f".{FOLDER}.incoming-{outcomes[0]['token']}")
    problem = None
    if rank == 0:
        try:
            for leftover in os.listdir(root) if os.path.isdir(root) else ():
                if leftover.startswith(f".{FOLDER}.incoming-") or leftover.startswith(f".{FOLDER}.outgoing-"):
                    durable.remove_tree(os.path.join(root, leftover))
            os.makedirs(os.path.join(staging, "zero"))
        except OSError as error:
            problem = (f"cannot write the conversion into {root} ({described(error)}); pass conversion_dir=<a "
                       "writable directory every rank can read> to load_checkpoint")
    agree("universal_begin", problem, what=what, error=CheckpointIntegrityError, prefix=f"{what}: ")

    problem = None
    try:  # every file is checked against the record (each rank a share) before any rank reads one
        _verify_sources(record, tag_dir, rank, world)
    except Exception as error:  # noqa: BLE001 - shared below
        problem = described(error)
    agree("universal_sources", problem, what=what, error=CheckpointIntegrityError,
          prefix=f"cannot convert {tag_dir}: ", timeout=AFTER_WRITE_TIMEOUT)
    problem, written = None, {}
    try:
        written = _write_share(record, tag_dir, staging, rank, world)
    except Exception as error:  # noqa: BLE001 - shared below
        problem = described(error)
    outcomes = agree("universal_written", problem, what=what, error=CheckpointIntegrityError,
                     prefix=f"{what} failed; the checkpoint itself is untouched. ", payload={"files": written},
                     timeout=AFTER_WRITE_TIMEOUT)
    problem = None
    if rank == 0:
        try:
            files = {path: digest for outcome in outcomes.values() for path, digest in outcome["files"].items()}
            durable.write_json_atomic(os.path.join(staging, RECORD), {
                "format": FORMAT, "version": VERSION, "source": wanted, "files": files})
            durable.fsync_dir(staging)
            durable.put_in_place(staging, target, outgoing=os.path.join(root, f".{FOLDER}.outgoing-{uuid.uuid4().hex[:12]}"))
        except Exception as error:  # noqa: BLE001 - shared below
            problem = described(error)
            durable.remove_tree(staging)
    agree("universal_commit", problem, what=what, error=CheckpointIntegrityError, prefix=f"{what}: ",
          timeout=AFTER_WRITE_TIMEOUT)


def _cached_share_is_valid(target: str, wanted: str, rank: int, world: int) -> bool:
    """A complete conversion of this checkpoint is in `target`: its record names this checkpoint, and this rank's
    share of its files has the recorded digests."""
    path = os.path.join(target, RECORD)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as handle:
        try:
            payload = json.loads(handle.read(256 << 20))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT and payload.get("version") == VERSION
            and payload.get("source") == wanted and isinstance(payload.get("files"), dict)):
        return False
    files = sorted(payload["files"].items())
    if not all(_RELATIVE.match(name) and ".." not in name.split("/") and isinstance(digest, dict)
               for name, digest in files):
        return False
    for index, (name, digest) in enumerate(files):
        if index % world == rank:
            full = os.path.join(target, name)
            if not os.path.isfile(full) or durable.digest_file(full) != digest:
                return False
    return True


def _verify_sources(record: dict, tag_dir: str, rank: int, world: int) -> None:
    """This rank's share of the checkpoint's files have the digests its record gives (ranks r = rank mod world)."""
    for entry in record["ranks"]:
        if entry["rank"] % world != rank:
            continue
        for described_file in entry["files"].values():
            path = os.path.join(tag_dir, described_file["name"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} (written by rank {entry['rank']}) is missing")
            found = durable.digest_file(path)
            if found != {"sha256": described_file["sha256"], "bytes": described_file["bytes"]}:
                raise ValueError(f"{path} (written by rank {entry['rank']}) is not the file its record describes "
                                 f"({found['bytes']} bytes, sha256 {found['sha256'][:12]}..., recorded "
                                 f"{described_file['bytes']} bytes, {described_file['sha256'][:12]}...)")


def shares(record: dict, world: int) -> list[list[str]]:
    """Every parameter assigned to one rank of the converting job, balancing their sizes (largest first, each to the
    least loaded rank); the same on every rank."""
    sizes = {}
    for group in record["partitions"]:
        for name, shape, _ in group["params"]:
            sizes[name] = int(torch.Size(record["model"]["parameters"].get(name, shape)).numel())
    load = [0] * world
    assigned: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda name: (-sizes[name], name)):
        least = min(range(world), key=lambda rank: (load[rank], rank))
        assigned[least].append(name)
        load[least] += sizes[name]
    return assigned


def _write_share(record: dict, tag_dir: str, staging: str, rank: int, world: int) -> dict:
    """Write this rank's parameters (and, on rank 0, the global optimizer state and model states); returns
    {relative path: digest} of what it wrote, flushed to disk."""
    from deepspeed.checkpoint.constants import CAT_DIM, EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, PARAM

    assembler = Assembler(record, tag_dir)
    expert_rows = record["model"]["expert_rows"]
    written = {}

    def save(relative: str, payload) -> None:
        path = os.path.join(staging, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(payload, path)
        written[relative] = durable.digest_file(path, flush=True)

    for name in shares(record, world)[rank]:
        for key in OPTIMIZER_KEYS:
            tensor = assembler.whole(name, key)
            if name in expert_rows:
                if tensor.shape[0] != expert_rows[name]:
                    raise ValueError(f"{name}: put together {tensor.shape[0]} experts, the model has {expert_rows[name]}")
                payload = {PARAM: tensor, CAT_DIM: 0, EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: expert_rows[name]}
            else:
                payload = {PARAM: tensor}
            save(f"zero/{name}/{key}.pt", payload)
        durable.fsync_dir(os.path.join(staging, "zero", name))
    if rank == 0:
        save("zero/optimizer_state.pt", assembler.global_state())
        model_states = record["ranks"][0]["files"]["model_states"]["name"]  # step count, LR scheduler, client state
        shutil.copyfile(os.path.join(tag_dir, model_states), os.path.join(staging, model_states))
        written[model_states] = durable.digest_file(os.path.join(staging, model_states), flush=True)
    durable.fsync_dir(os.path.join(staging, "zero"))
    durable.fsync_dir(staging)
    return written
