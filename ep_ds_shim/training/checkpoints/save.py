"""`engine.save_checkpoint` of an EP engine: DeepSpeed writes every rank's files, and the checkpoint appears only
once all of them are on disk.

1. Every rank agrees on the tag and the directory (a one-rank call fails within EP_DS_SHIM_TIMEOUT, naming the
   ranks that never came).
2. DeepSpeed's own `save_checkpoint` writes each rank's model and optimizer states under a hidden staging tag
   (``.<tag>.incoming-<id>``), with `latest` left alone.
3. Each rank flushes its files to disk and digests them; the ranks agree on the outcome. A failure anywhere: the
   staging tag is removed and every rank raises the same error; the previous checkpoint is untouched.
4. Global rank 0 writes the record (`manifest.py`) into the staging tag, puts it in place of ``<tag>`` (renamed, or
   swapped atomically with an existing one: write-then-swap) and only then points `latest` at it.
"""

from __future__ import annotations

import json
import os
import re
import uuid

import torch.distributed as dist

from ...distributed import exchange
from ...errors import CheckpointIntegrityError
from ...version import __version__
from . import describe, durable, manifest
from .agree import AFTER_WRITE_TIMEOUT, agree, described, summary

LATEST = "latest"
STAGING = re.compile(r"^\.(?P<tag>.+)\.(?P<kind>incoming|outgoing)-[0-9a-f]+$")


def staging_name(tag: str, kind: str, token: str) -> str:
    """Hidden sibling names of a tag: DeepSpeed's loaders and the Trainer's `global_step*` glob never see them."""
    return f".{tag}.{kind}-{token}"


def save_checkpoint(engine, original, record, save_dir, tag=None, client_state=None, save_latest=True,
                    exclude_frozen_parameters=False):
    if not save_dir:
        raise ValueError(f"save_dir must be a non-empty string, got {save_dir!r}")
    tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
    save_dir = os.path.abspath(os.fspath(save_dir))
    token = _begin(engine, save_dir, tag)
    staging = staging_name(tag, "incoming", token)
    written, groups = _write_every_rank(engine, original, record, save_dir, staging, tag, dict(client_state or {}),
                                        exclude_frozen_parameters)
    problem = None
    if dist.get_rank() == 0:
        try:
            staging_dir = os.path.join(save_dir, staging)
            durable.write_json_atomic(manifest.path_in(staging_dir), _record(engine, record, tag, groups, written))
            durable.fsync_dir(staging_dir)
            durable.put_in_place(staging_dir, os.path.join(save_dir, tag),
                                 outgoing=os.path.join(save_dir, staging_name(tag, "outgoing", token)))
            if save_latest:
                durable.write_atomic(os.path.join(save_dir, LATEST), tag.encode())
            remove_leftovers(save_dir)
        except Exception as error:  # noqa: BLE001 - every rank raises it below
            problem = described(error)
    what = f"save_checkpoint({save_dir!r}, tag={tag!r})"
    agree("checkpoint_save_commit", problem, what=what, error=CheckpointIntegrityError,
          prefix=f"{what}: every rank wrote its files, but putting the checkpoint in place failed: ",
          timeout=AFTER_WRITE_TIMEOUT)
    return True


def _begin(engine, save_dir: str, tag: str) -> str:
    """Every rank saves the same tag into the same directory, which can take it; returns the save's token."""
    prefix = f"save_checkpoint into {save_dir!r} did not start; nothing was written. "
    begun = agree("checkpoint_save_begin", _destination_problem(engine, save_dir, tag), what="save_checkpoint",
                  error=CheckpointIntegrityError, prefix=prefix,
                  payload={"tag": tag, "dir": save_dir, "token": uuid.uuid4().hex[:12]})
    if len({(payload["tag"], payload["dir"]) for payload in begun.values()}) > 1:
        raise CheckpointIntegrityError(prefix + "every rank must save the same tag into the same directory: " + "; ".join(
            f"rank {rank}: tag {payload['tag']!r} in {payload['dir']!r}" for rank, payload in sorted(begun.items())))
    return begun[0]["token"]


def _write_every_rank(engine, original, record, save_dir, staging, tag, client_state, exclude_frozen_parameters):
    """DeepSpeed writes every rank's files under the staging tag; each rank flushes and digests its own; the ranks
    agree. Returns every rank's outcome and ZeRO-3's partition structure; on any failure every rank raises."""
    problem, files, groups, partition_ranks = None, None, [], []
    try:
        original(engine, save_dir, staging, client_state, save_latest=False,
                 exclude_frozen_parameters=exclude_frozen_parameters)
        files = own_files(engine, save_dir, staging)
        groups, partition_ranks = describe.partitions(engine)
    except Exception as error:  # noqa: BLE001 - every rank raises it below
        problem = described(error)
    written = exchange("checkpoint_save_written", {
        "problem": problem, "files": files, "partition_ranks": partition_ranks, "ep_rank": record.layout.ep_rank,
        "structure": durable.digest_bytes(json.dumps(groups, sort_keys=True).encode()),
    }, what="the end of save_checkpoint on every rank", timeout=AFTER_WRITE_TIMEOUT)
    failed = {rank: outcome["problem"] for rank, outcome in written.items() if outcome["problem"]}
    if not failed and len({outcome["structure"] for outcome in written.values()}) != 1:
        failed = {0: "the ranks' ZeRO-3 partition structures differ"}
    if failed:
        if dist.get_rank() == 0:
            durable.remove_tree(os.path.join(save_dir, staging))
        raise CheckpointIntegrityError(
            f"save_checkpoint({save_dir!r}, tag={tag!r}) failed; nothing was put in place and the previous checkpoint "
            f"(if any) is untouched. {summary(failed)}")
    return written, groups


def _record(engine, record, tag: str, groups: list, written: dict) -> dict:
    """The checkpoint's JSON record (`manifest.py`)."""
    return {
        "format": manifest.FORMAT, "version": manifest.VERSION, "tag": tag, "step": int(engine.global_steps),
        "global_samples": int(engine.global_samples), "zero_stage": int(engine.zero_optimization_stage()),
        "precision": describe.precision(engine),
        "layout": {"world_size": dist.get_world_size(), "dp_size": record.layout.dp_size, "ep_size": record.ep_size},
        "nvme_offload": bool(engine.zero_nvme_offload_optimizer()),
        "model": describe.model(engine, record), "optimizer": describe.optimizer(engine), "partitions": groups,
        "ranks": [{"rank": rank, "ep_rank": written[rank]["ep_rank"], "files": written[rank]["files"],
                   "partition_ranks": written[rank]["partition_ranks"]} for rank in sorted(written)],
        "written_by": _versions(),
    }


def own_files(engine, save_dir, tag) -> dict:
    """This rank's files, by DeepSpeed's own names for them, flushed to disk: {role: {name, sha256, bytes}}."""
    paths = {"model_states": engine._get_ckpt_name(save_dir, tag),
             "optim_states": engine._get_zero_ckpt_name(save_dir, tag)}
    files = {}
    for role, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DeepSpeed did not write {path}")
        files[role] = {"name": os.path.basename(path), **durable.digest_file(path, flush=True)}
    return files


def _destination_problem(engine, save_dir: str, tag: str) -> str | None:
    if not tag or tag in (".", "..", LATEST) or tag.startswith(".") or os.sep in tag or (os.altsep and os.altsep in tag):
        return f"tag {tag!r} is not a plain directory name (no path separators, not hidden, not {LATEST!r})"
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        return f"{save_dir} exists and is not a directory"
    target = os.path.join(save_dir, tag)
    if os.path.lexists(target) and not os.path.isdir(target):
        return f"{target} exists and is not a directory"
    if engine.checkpoint_engine.is_decoupled():
        return ("this DeepSpeed checkpoint engine writes in the background (decoupled), so the files may not exist "
                "when save_checkpoint returns; use DeepSpeed's default checkpoint engine with EP models")
    if engine.use_node_local_storage():
        return ('"checkpoint": {"use_node_local_storage": true} writes each node\'s files to its own disk; EP '
                "checkpoints need one directory every rank can read")
    return None


def remove_leftovers(save_dir: str) -> None:
    """Staging directories of saves that never finished (a rank died): partial ones, and complete copies of a tag
    that exists. A complete copy of a missing tag stays: it is what a save interrupted mid-swap left (`resolve.py`)."""
    for name in os.listdir(save_dir):
        match = STAGING.match(name)
        if not match:
            continue
        path = os.path.join(save_dir, name)
        complete = os.path.isfile(manifest.path_in(path))
        if not complete or os.path.isdir(os.path.join(save_dir, match["tag"])):
            durable.remove_tree(path)


def _versions() -> dict:
    import deepspeed
    import torch

    return {"ep_ds_shim": __version__, "deepspeed": deepspeed.__version__, "torch": torch.__version__}
