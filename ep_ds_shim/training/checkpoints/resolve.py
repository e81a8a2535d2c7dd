"""Which checkpoint a `load_checkpoint(load_dir, tag)` call means, and its record, or what is wrong with it.

Each rank resolves on its own (its `latest`, its view of the directory); `load.py` then makes the ranks agree.
Problems are `Problem`s: a checkpoint that is missing or incomplete (`integrity`), or one this job cannot resume
(`layout`: written at another ZeRO stage). DeepSpeed itself returns ``(None, None)`` for a missing `latest` and a
training loop then starts from scratch; here it is an error.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from . import manifest
from .save import LATEST, STAGING


@dataclass
class Problem(Exception):
    kind: str  # "integrity" or "layout"
    message: str

    def __str__(self) -> str:
        return self.message


def resolve(load_dir, tag) -> tuple[str, dict]:
    """(tag, record) of the checkpoint to load; raises `Problem`."""
    load_dir = os.fspath(load_dir)
    if not os.path.exists(load_dir):
        raise Problem("integrity", f"there is no checkpoint directory {load_dir}")
    if not os.path.isdir(load_dir):
        raise Problem("integrity", f"{load_dir} is a file, not a checkpoint directory")
    if tag is None:
        latest = os.path.join(load_dir, LATEST)
        if not os.path.isfile(latest):
            raise Problem("integrity", (
                f"{load_dir} has no {LATEST!r} file naming the checkpoint to resume (DeepSpeed alone would return "
                f"(None, None) and training would start from scratch); {_tags_found(load_dir)}"))
        with open(latest) as handle:
            tag = handle.read().strip()
    tag = str(tag)
    tag_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(tag_dir):
        raise Problem("integrity", f"{load_dir} has no checkpoint tag {tag!r}{_interrupted_swap(load_dir, tag)}; "
                                   f"{_tags_found(load_dir)}")
    try:
        return tag, manifest.read(tag_dir)
    except manifest.ManifestProblem as problem:
        raise _without_record(tag_dir, str(problem)) from None


def _tags_found(load_dir) -> str:
    tags = sorted(name for name in os.listdir(load_dir)
                  if not name.startswith(".") and os.path.isfile(manifest.path_in(os.path.join(load_dir, name))))
    return f"tags with a record there: {tags}; pass tag=<one of them>" if tags else "it holds no recorded checkpoint"


def _interrupted_swap(load_dir, tag) -> str:
    """A save that replaced an existing tag on a file system without atomic exchange, and died between its two
    renames, leaves the old and the new copy under hidden names (`durable.put_in_place`)."""
    copies = {}
    for name in os.listdir(load_dir):
        match = STAGING.match(name)
        if match and match["tag"] == tag and os.path.isfile(manifest.path_in(os.path.join(load_dir, name))):
            copies[match["kind"]] = os.path.join(load_dir, name)
    if "outgoing" not in copies:
        return ""
    kept = [f"{copies['outgoing']} holds the previous one"] + (
        [f"{copies['incoming']} the new one"] if "incoming" in copies else [])
    return (f": a save that replaced it was interrupted; both copies are complete ({', '.join(kept)}): rename the "
            f"one to resume to {os.path.join(load_dir, tag)}")


def _without_record(tag_dir: str, found: str) -> Problem:
    """A tag directory without a usable record: say what wrote it, from DeepSpeed's file names alone."""
    names = sorted(os.listdir(tag_dir))
    zero3 = [name for name in names if re.match(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$", name)]
    other_stage = [name for name in names if re.match(r"^mp_rank_\d+_model_states\.pt$", name)]
    if other_stage:
        stage = "1 or 2" if glob.glob(os.path.join(glob.escape(tag_dir), "*optim_states.pt")) else "0"
        return Problem("layout", (
            f"{tag_dir} was written at ZeRO stage {stage} (its files: {names[:4]}): ep-ds-shim trains EP models at "
            "ZeRO stage 3 only, and a checkpoint of another stage holds its optimizer state partitioned another way. "
            "Load its weights with from_pretrained (export it with the job that wrote it) and start a new run"))
    if not zero3 and found.endswith(f"no record {manifest.NAME}"):
        return Problem("integrity", f"{tag_dir} holds no DeepSpeed checkpoint (found {names[:6] or 'nothing'})")
    if found.endswith(f"no record {manifest.NAME}"):
        return Problem("integrity", (
            f"{tag_dir} has no record {manifest.NAME}: either its save never finished (the record is written last, "
            "once every rank's files are on disk) or it was written without ep-ds-shim 0.3's save_checkpoint (ep-ds-"
            "shim 0.2 partitioned ZeRO-3 differently). It cannot be checked without unpickling it, so it is not "
            "loaded: resume from an earlier tag, or from an export (ep_ds_shim.save_pretrained with the version "
            "that wrote it)"))
    return Problem("integrity", f"{tag_dir}: {found}")
